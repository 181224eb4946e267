"""``python -m geartask``: the same as the ``geartask`` command."""

from .main import cli

cli()

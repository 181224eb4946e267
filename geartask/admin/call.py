"""One run of a ``manage`` command: what it was asked, the config, where it writes, the fleet."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from ..config import Config
    from ..fleet import Admin


@dataclass
class Call:
    """Every command is ``run(call) -> exit status``, registered on its parser with
    ``set_defaults(func=run)``; ``admin`` is set for the commands that ask the job servers."""

    args: argparse.Namespace  # always has ``json`` and ``timeout`` (main's namespace defaults)
    config: Config
    out: TextIO
    err: TextIO
    inp: TextIO
    admin: Admin | None = None

    @property
    def fleet(self) -> Admin:
        assert self.admin is not None, f"{self.args.command} was registered without fleet=True"
        return self.admin

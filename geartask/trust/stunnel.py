"""stunnel in front of the local gearmand lives with the local server: geartask.server.stunnel."""

from ..server.stunnel import Stunnel, TlsFrontedServer  # noqa: F401

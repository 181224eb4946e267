"""The Gearman connection layer: the wire protocol, connections, and every quirk of pygearman.

This is the only geartask package that imports ``gearman`` (pygearman, the maintained
python-gearman for Python >= 3.9; gearman3 0.2.1 dies at its first socket read there).
We take pygearman's packet codec and constants, but drive the sockets ourselves, because
pygearman 0.2.6's loops get in the way of what a reliable job system needs:

* Its worker sends PRE_SLEEP after *every* job and waits for a NOOP, an extra round trip
  per job; and with two or more servers a worker can sleep forever waiting for a NOOP that
  never comes (the old python-gearman starvation bug). Our worker loop grabs again at once
  after a job, sleeps only on NO_JOB, and re-sends GRAB_JOB after every poll timeout.
* ``submit_job``/``submit_multiple_jobs`` wait for completion only when ``poll_timeout`` is a
  number (``None`` means "don't wait" in places and "wait forever" in others). Our
  ``Connection.recv`` takes an explicit deadline everywhere; ``None`` is never a timeout.
* The server sends function names as bytes, and pygearman matches abilities by equality, so
  a worker registered with ``str`` names silently never receives a job. Everything that goes
  on the wire is encoded here (``to_bytes``) and function names coming back are decoded.
* Its packet codec (``pack_binary_command``/``parse_binary_command``) is on every job's path
  and slow for it (its parser also works only on ``array.array``/``memoryview`` buffers):
  ``pack`` and ``parse_response`` below do the same checks against its parameter table.
* pygearman's admin client knows only a few text commands and can't time out reliably;
  ``admin_command`` speaks the text protocol with a deadline and knows which replies are
  one line and which end with a ".".
"""

from __future__ import annotations

from .codec import *  # noqa: F401,F403
from .codec import HEADER, HEADER_SIZE, MAGIC_REQ, MAGIC_RES, SUBMIT_JOB_EPOCH, Packet, error_text, pack, parse_response  # noqa: F401
from .backoff import REFUSED_EVENT, Backoff, OutageLog  # noqa: F401
from .connection import (CONNECT_TIMEOUT, HANDLE_FIRST, MAX_PACKET, MAX_TEXT_REPLY, RECONNECT_MAX,  # noqa: F401
                         RECONNECT_MIN, Connection, Keepalive, admin_command, keepalive_for, wait_readable)
from .dial import (ConnectError, Dial, TLSError, dial, forget_tls, is_refusal, parse_address,  # noqa: F401
                   registered_tls, tls_error, tls_for, tls_reason, tls_refusal, use_tls)

"""Start a command with glibc's ``posix_spawn``, called through ctypes: the cheapest start the
kernel offers, with the same guarantees as ``subprocess.Popen(..., start_new_session=True,
close_fds=True)``.

Why not Popen: Python's own fork_exec and ``os.posix_spawn`` hold the GIL while the child
execs (about 100 µs per command), so a worker's other threads stop for every command it
starts; a ctypes call lets go of the GIL. glibc's posix_spawn is a vfork-style clone (no
copy of the worker's page tables) that reports a failed exec or chdir as an errno.

The child: leads a new session (setsid), stdin from /dev/null, stdout and stderr to the
given fd, every other fd closed (``addclosefrom_np``, glibc >= 2.34), SIGPIPE and SIGXFSZ
back to their defaults (as Popen's ``restore_signals``), the caller's signal mask, and
``cwd`` (``addchdir_np``, glibc >= 2.29). ``available()`` is False where any of that is
missing; veryeasyprocess then uses Popen, so nothing depends on this module being usable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading
from typing import Mapping, Sequence

_SETSIGDEF = 0x04  # glibc's POSIX_SPAWN_SETSIGDEF
_SETSID = 0x80  # glibc's POSIX_SPAWN_SETSID (glibc >= 2.26)
_BUFFER = 1024  # bytes for posix_spawnattr_t (336 on x86-64 glibc) and file actions (80)


class _Libc:
    """glibc's spawn functions and the per-process constants (attributes, /dev/null)."""

    def __init__(self):
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name, use_errno=True)  # CDLL: each call releases the GIL
        self.spawn = libc.posix_spawn
        self.spawn.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self.fa_init = libc.posix_spawn_file_actions_init
        self.fa_destroy = libc.posix_spawn_file_actions_destroy
        self.fa_dup2 = libc.posix_spawn_file_actions_adddup2
        self.fa_closefrom = libc.posix_spawn_file_actions_addclosefrom_np  # AttributeError: too old
        self.fa_chdir = libc.posix_spawn_file_actions_addchdir_np
        self.fa_chdir.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.attr = ctypes.create_string_buffer(_BUFFER)
        defaults = ctypes.create_string_buffer(_BUFFER)
        if (libc.posix_spawnattr_init(self.attr) or libc.sigemptyset(defaults)
                or libc.sigaddset(defaults, int(signal.SIGPIPE))
                or libc.sigaddset(defaults, int(signal.SIGXFSZ))
                or libc.posix_spawnattr_setsigdefault(self.attr, defaults)
                or libc.posix_spawnattr_setflags(self.attr, ctypes.c_short(_SETSIGDEF | _SETSID))):
            raise OSError("posix_spawn attributes could not be set")
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


_libc: _Libc | None = None
_unusable = False
_lock = threading.Lock()


def _load() -> _Libc | None:
    global _libc, _unusable
    if _libc is not None or _unusable:  # the per-command path: no lock once decided
        return _libc
    with _lock:
        if _libc is None and not _unusable:
            try:
                _libc = _Libc()
            except (OSError, AttributeError, TypeError):  # not glibc, or older than 2.34
                _unusable = True
    return _libc


def available() -> bool:
    """True where spawn() can give every guarantee Popen gives (Linux, glibc >= 2.34)."""
    return _load() is not None


class _EnvCache:
    """The child's environment as a C array, rebuilt only when the mapping changes: a
    worker's commands nearly all get the same one, and building it is most of the cost."""

    def __init__(self):
        self.cached: tuple[dict, object] | None = None  # (mapping, array): one attribute, swapped whole

    def get(self, env: Mapping[bytes, bytes]):
        cached = self.cached
        if cached is not None and cached[0] == env:
            return cached[1]
        source = dict(env)
        array = _env_array(source)
        self.cached = (source, array)
        return array


def _env_array(env: Mapping[bytes, bytes]):
    # As Popen refuses them: a C string ends at the first NUL, so one would cut a value short.
    items = []
    for k, v in env.items():
        if b"=" in k:
            raise ValueError("illegal environment variable name")
        if b"\0" in k or b"\0" in v:
            raise ValueError("embedded null byte")
        items.append(k + b"=" + v)
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


_envs = _EnvCache()


def spawn(executable: bytes, argv: Sequence[bytes], env: Mapping[bytes, bytes], stdout: int | None,
          cwd: bytes | None = None, cache_env: bool = True, stderr: int | None = -1) -> int:
    """Start ``executable`` (a path with a slash: no PATH search) and return its pid; OSError
    with the errno the child's exec (or chdir) failed with. ``stdout`` and ``stderr`` are
    descriptors above 2, or None to keep ours; ``stderr`` -1 (the default): the same as stdout."""
    if stderr == -1:
        stderr = stdout
    lib = _libc or _load()
    if lib is None:
        raise RuntimeError("posix_spawn is not usable here; check available() first")
    if any(b"\0" in a for a in argv) or b"\0" in executable or (cwd is not None and b"\0" in cwd):
        raise ValueError("embedded null byte")
    envp = _envs.get(env) if cache_env else _env_array(env)
    args = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
    actions = ctypes.create_string_buffer(_BUFFER)
    if lib.fa_init(actions):
        raise OSError(ctypes.get_errno() or 12, "posix_spawn_file_actions_init failed")
    try:
        if (lib.fa_dup2(actions, lib.devnull, 0)
                or (stdout is not None and lib.fa_dup2(actions, stdout, 1))
                or (stderr is not None and lib.fa_dup2(actions, stderr, 2))
                or lib.fa_closefrom(actions, 3)
                or (cwd is not None and lib.fa_chdir(actions, cwd))):
            raise OSError(12, "posix_spawn file actions could not be set")
        pid = ctypes.c_int(0)
        err = lib.spawn(ctypes.byref(pid), executable, actions, lib.attr, args, envp)
    finally:
        lib.fa_destroy(actions)
    if err:
        raise OSError(err, os.strerror(err), os.fsdecode(executable))
    return pid.value


def _forget_after_fork() -> None:
    # The child of an os.fork keeps working copies of everything (memory and fds): nothing to do,
    # except that a lock held by another thread at fork time must not stay held forever.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)

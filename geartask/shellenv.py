"""Which programs and environment variables the shell task's config may name (the config checks
it when loading, the shell task again per job; below both, so the config never loads the shell).

A job may set only the variables in ``worker.shell.env_allow``; the ones below are refused
there even if listed, because they make a loader, a shell, an interpreter or a common tool
load or run code of the job's choosing (docs/shell.md explains each group).
"""

from __future__ import annotations

import os
import re

from .errors import ConfigError

# What glibc itself ignores for setuid programs (its "unsecure" list), the shells' and
# interpreters' start-up variables, and tools that run a command named in a variable.
NEVER_NAMES = frozenset({
    "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH", "NIS_PATH",
    "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TMPDIR", "TZDIR",
    "PATH", "IFS", "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS", "PS4", "CDPATH", "GLOBIGNORE", "PROMPT_COMMAND",
    "ZDOTDIR", "HOME",
    "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH", "TCLLIBPATH", "PHPRC", "PHP_INI_SCAN_DIR",
    "EDITOR", "VISUAL", "PAGER", "MANPAGER", "LESSOPEN", "LESSCLOSE", "BROWSER", "SSH_ASKPASS", "SUDO_ASKPASS",
})
NEVER_PREFIXES = ("LD_", "DYLD_", "MALLOC_", "BASH_FUNC_", "PYTHON", "PERL", "RUBY", "GEM_", "NODE_", "NPM_",
                  "LUA_", "GIT_", "XDG_", "GEARTASK_")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def never_passed(name: str) -> bool:
    """True for a variable no job may set, whatever env_allow says (in any letter case)."""
    upper = name.upper()
    return upper in NEVER_NAMES or upper.startswith(NEVER_PREFIXES)


def check_shell_config(allow: list[str], env_allow: list[str], path: str | None = None) -> None:
    """ConfigError naming the key for an allow entry that is not a bare name or a plain
    absolute path, or an env_allow entry that is not a variable name or is never passed."""
    for i, entry in enumerate(allow):
        plain_absolute = os.path.isabs(entry) and os.path.normpath(entry) == entry and entry != "/"
        if "\0" in entry or ("/" in entry and not plain_absolute):
            raise ConfigError(f"{entry!r} is neither a program name nor a plain absolute path",
                              path, f"worker.shell.allow[{i}]")
    for i, name in enumerate(env_allow):
        key = f"worker.shell.env_allow[{i}]"
        if not _NAME.match(name):
            raise ConfigError(f"{name!r} is not an environment variable name", path, key)
        if never_passed(name):
            raise ConfigError(f"{name} can make a loader, shell, interpreter or tool load or run what a job "
                              "chooses; a job may never set it (see docs/shell.md)", path, key)

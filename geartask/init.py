"""``geartask init [DIR]``: a commented config.yaml and a plugins/ folder with an example plugin."""

from __future__ import annotations

import os
import shlex
from importlib import resources
from pathlib import Path
from typing import Sequence

from .cli import ArgumentParser
from .errors import EXIT_OK, UsageError

FILES = {"config.yaml": "config.yaml", "plugins/example.py": "example.py"}  # written -> template
NEXT_STEPS = ("geartask manage server start", "geartask worker --name w1 &", "geartask send plugin example")


def init(folder: Path, force: bool = False, secure: bool = False) -> list[Path]:
    """Write the starter files into ``folder``; refuse to overwrite unless ``force``. ``secure``:
    also a CA, a host certificate and a signing key, and a config that uses them (trust/fleet.py)."""
    targets = {folder / rel: name for rel, name in FILES.items()}
    for path in targets:  # a symlink (dangling or not) would send the write out of the folder
        for part in (path, *[q for q in path.parents if folder in (q, *q.parents) and q != folder]):
            if part.is_symlink():
                raise UsageError(f"{part} is a symbolic link; nothing written (init writes only plain files "
                                 f"inside {folder})")
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise UsageError(f"{existing[0]} already exists; nothing written (use --force to overwrite)")
    templates = resources.files("geartask") / "templates"
    written: list[Path] = []
    texts = {name: templates.joinpath(name).read_text(encoding="utf-8") for name in FILES.values()}
    if secure:
        from .trust import fleet
        fleet.check_free(folder, force)
        written, texts["config.yaml"] = fleet.write_secure(folder, texts["config.yaml"], force)
    for path, name in targets.items():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as f:  # O_NOFOLLOW: a link made since the check is refused too
                f.write(texts[name].encode("utf-8"))
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="geartask init", description=__doc__)
    parser.add_argument("folder", nargs="?", default=".", metavar="DIR", help="where to write (default: here)")
    parser.add_argument("--force", action="store_true", help="overwrite files that exist")
    parser.add_argument("--secure", action="store_true",
                        help="also a CA, a host certificate and a signing key: TLS and signed jobs on")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    for path in init(folder, args.force, args.secure):
        print(f"wrote {path}")
    # One command a line, so the hint works pasted into a shell: `cd x && a && b &` would run
    # the cd in a background subshell and leave the shell where it was.
    steps = ([] if args.folder == "." else [f"cd {shlex.quote(args.folder)}"]) + list(NEXT_STEPS)
    print("next, in this shell:\n" + "".join(f"  {step}\n" for step in steps), end="")
    return EXIT_OK

"""``geartask init [DIR]``: a commented config.yaml and a plugins/ folder with an example plugin."""

from __future__ import annotations

import shlex
from importlib import resources
from pathlib import Path
from typing import Sequence

from .cli import ArgumentParser
from .errors import EXIT_OK, UsageError

FILES = {"config.yaml": "config.yaml", "plugins/example.py": "example.py"}  # written -> template
NEXT_STEPS = ("geartask manage server start", "geartask worker --name w1 &", "geartask send plugin example")


def init(folder: Path, force: bool = False) -> list[Path]:
    """Write the starter files into ``folder``; refuse to overwrite unless ``force``."""
    targets = {folder / rel: name for rel, name in FILES.items()}
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise UsageError(f"{existing[0]} already exists; nothing written (use --force to overwrite)")
    templates = resources.files("geartask") / "templates"
    written = []
    for path, name in targets.items():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(templates.joinpath(name).read_text(encoding="utf-8"), encoding="utf-8")
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="geartask init", description=__doc__)
    parser.add_argument("folder", nargs="?", default=".", metavar="DIR", help="where to write (default: here)")
    parser.add_argument("--force", action="store_true", help="overwrite files that exist")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    for path in init(folder, args.force):
        print(f"wrote {path}")
    # One command a line, so the hint works pasted into a shell: `cd x && a && b &` would run
    # the cd in a background subshell and leave the shell where it was.
    steps = ([] if args.folder == "." else [f"cd {shlex.quote(args.folder)}"]) + list(NEXT_STEPS)
    print("next, in this shell:\n" + "".join(f"  {step}\n" for step in steps), end="")
    return EXIT_OK

"""``geartask init [DIR]``: a commented config.yaml and a plugins/ folder with an example plugin."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

from .cli import ArgumentParser
from .errors import EXIT_OK, UsageError

FILES = {"config.yaml": "config.yaml", "plugins/example.py": "example.py"}  # written -> template


def init(folder: Path, force: bool = False, secure: bool = False) -> list[Path]:
    """Write the starter files into ``folder``; refuse to overwrite unless ``force``. ``secure``:
    also a CA, a host certificate and a signing key, and a config that uses them (trust/fleet.py)."""
    targets = {folder / rel: name for rel, name in FILES.items()}
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise UsageError(f"{existing[0]} already exists; nothing written (use --force to overwrite)")
    templates = resources.files("geartask") / "templates"
    written, texts = [], {name: templates.joinpath(name).read_text(encoding="utf-8") for name in FILES.values()}
    if secure:
        from .trust import fleet
        fleet.check_free(folder, force)
        written, texts["config.yaml"] = fleet.write_secure(folder, texts["config.yaml"], force)
    for path, name in targets.items():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(texts[name], encoding="utf-8")
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
    where = "" if args.folder == "." else f"cd {args.folder} && "
    print(f"next: {where}geartask manage server start && geartask worker --name w1 &  then: geartask send plugin example")
    return EXIT_OK

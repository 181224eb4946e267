"""One name per command (issue 22): `geartask send|worker|manage` in help, hints, the dashboard
and the docs. The old scripts still work and are named once: README's paragraph on the
original design's commands."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

from helpers import PYTHON, REPO

OLD = re.compile(r"send_job_client|manage_client|runworkers|worker_client")
ONE_PLACE = "The commands of the original design work the same from a clone:"


def _paragraph_spans(text: str) -> list[tuple[int, int]]:
    start = text.index(ONE_PLACE)
    return [(start, text.index("\n\n", start))]


def test_docs_name_the_commands_one_way():
    hits = []
    for path in sorted([*(REPO / "docs").glob("*.md"), *(REPO / "deploy").glob("*.md"), REPO / "README.md"]):
        text = path.read_text()
        allowed = _paragraph_spans(text) if path.name == "README.md" and path.parent == REPO else []
        for m in OLD.finditer(text):
            if not any(a <= m.start() < b for a, b in allowed):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{path.relative_to(REPO)}:{line}: {text.splitlines()[line - 1].strip()[:100]}")
    assert not hits, "old script names outside README's one paragraph:\n" + "\n".join(hits)
    assert OLD.search(_paragraph(REPO / "README.md")), "README must still say the old scripts work"


def test_scripts_run_the_commands_by_their_one_name():
    """scripts/ (the demo, the installers) is what a new user runs first: geartask send|worker|manage."""
    hits = []
    for path in sorted((REPO / "scripts").iterdir()):
        if path.is_file() and path.suffix in (".sh", ".py", ""):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if OLD.search(line):
                    hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not hits, "old script names in scripts/:\n" + "\n".join(hits)


def _paragraph(path: Path) -> str:
    text = path.read_text()
    (a, b), = _paragraph_spans(text)
    return text[a:b]


def _user_strings(tree: ast.AST) -> list[ast.Constant]:
    """String constants a user can see: not docstrings, not prog()'s old-script argument,
    not main.py's COMMANDS table (it maps the old names)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant):
            skip.add(id(body[0].value))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "prog":
            skip.update(id(n) for n in ast.walk(node))
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMMANDS" for t in node.targets):
            skip.update(id(n) for n in ast.walk(node))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in skip]


def test_the_package_says_geartask_in_its_messages_and_pages():
    hits = []
    for path in sorted((REPO / "geartask").rglob("*.py")):
        for const in _user_strings(ast.parse(path.read_text())):
            if OLD.search(const.value):
                hits.append(f"{path.relative_to(REPO)}:{const.lineno}: {const.value[:100]!r}")
    for path in sorted((REPO / "geartask").rglob("*.html")) + sorted((REPO / "geartask" / "templates").glob("*")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if OLD.search(line):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not hits, "old script names in what the package shows:\n" + "\n".join(hits)


@pytest.mark.parametrize("command,script", [("send", "send_job_client/send_job_client.py"),
                                            ("manage", "manage_client/manage_client.py"),
                                            ("worker", "worker_client/runworkers.py")])
def test_help_names_the_command_as_it_was_run(command, script):
    r = subprocess.run([PYTHON, "-m", "geartask", command, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(f"usage: geartask {command} "), r.stdout[:200]
    r = subprocess.run([PYTHON, "-m", "geartask", command, *(["status"] if command != "worker" else []), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage: geartask " + command in r.stdout
    r = subprocess.run([PYTHON, str(REPO / script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(f"usage: {Path(script).name} "), r.stdout[:200]
    top = subprocess.run([PYTHON, "-m", "geartask", "--help"], capture_output=True, text=True, timeout=60)
    assert not OLD.search(top.stdout), top.stdout

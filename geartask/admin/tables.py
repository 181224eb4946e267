"""Plain-text tables for the manager's readable output (no dependency, no colour)."""

from __future__ import annotations

from typing import Any, Sequence

from ..display import printable


def _cell(value: Any) -> str:
    """One cell's text; a peer's text (client ids, function names) escaped, so it can neither
    forge a row with a newline nor drive the terminal with an escape sequence."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value else "0"
    if isinstance(value, (list, tuple)):
        return " ".join(printable(v) for v in value) or "-"
    return printable(value)


def render(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[str] = ()) -> str:
    """Columns padded to their widest cell; columns named in ``right`` are right-aligned (numbers)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(printable(h))] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        out = []
        for i, v in enumerate(values):
            last = i == len(values) - 1
            if headers[i] in right:
                out.append(v.rjust(widths[i]))
            else:
                out.append(v if last else v.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [line([printable(h) for h in headers]), line(["-" * w for w in widths])]
    lines += [line(r) for r in cells]
    return "\n".join(lines)

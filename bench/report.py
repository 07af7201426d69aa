"""Write a benchmark's markdown between `<!-- {name}:begin -->` / `<!-- {name}:end -->` markers, so a
re-run replaces its own section of docs/benchmarks.md and leaves the rest alone."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(path: str | Path, name: str, body: str) -> str:
    """Replace (or append) section `name` of the markdown file; returns the marked text."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = f"{begin}\n{body}\n{end}"
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    new = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: text, old, flags=re.S) \
        if begin in old else old + "\n" + text + "\n"
    path.write_text(new, encoding="utf-8")
    return text

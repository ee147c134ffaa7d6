"""Shared by the benchmarks: write a generated block into docs/BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path


def write_block(docs: Path, name: str, section: str, body: str) -> None:
    """Replace the block of benchmark ``name`` (between its markers) in ``docs``, or add it
    under ``section`` (created at the end when missing). Text around the block is kept."""
    begin = f"<!-- bench/{name}: generated block, begin -->"
    end = f"<!-- bench/{name}: generated block, end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    docs = Path(docs)
    text = docs.read_text(encoding="utf-8") if docs.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        a, rest = text.split(begin, 1)
        text = a + block + rest.split(end, 1)[1]
    elif section in text:
        a, b = text.split(section, 1)
        text = a + section + "\n\n" + block + "\n" + b
    else:
        text = text.rstrip() + f"\n\n{section}\n\n{block}\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text, encoding="utf-8")

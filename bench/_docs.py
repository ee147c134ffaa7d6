"""Shared by the benchmarks: write a generated block into docs/BENCHMARKS.md; run the Qt event
loop for a while (:func:`spin`); name the CPU (:func:`cpu_model`)."""

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


def spin(seconds: float, until=None) -> None:
    """Run the Qt event loop for ``seconds`` (or until ``until()`` is true)."""
    import time

    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    deadline = time.monotonic() + seconds
    poll = QTimer()
    poll.setInterval(10)
    poll.timeout.connect(lambda: loop.quit() if (until is not None and until())
                         or time.monotonic() >= deadline else None)
    poll.start()
    loop.exec()
    poll.stop()


def cpu_model() -> str:
    """The CPU's model name (``lscpu``), for the machine line of a benchmark block."""
    import platform
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"

"""Rebuild the parity cases from checkouts of the authors' repositories.

    python tests/data/parity/regenerate.py --checkouts DIR [--python PY] [--only NAME ...]

``DIR`` holds one checkout per repository, named ``owner+name`` (as ``fetch`` names them) or
``name``; each ``make_<family>.py`` is run as ``PY make_<family>.py --checkout DIR/<repo>`` and
refuses a checkout at another commit than the one it pins. ``PY`` is the throwaway
environment with torch and what the authors' code imports (each script's docstring says).
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _repo(script: Path) -> str:
    """The ``REPO = "owner/name"`` a make script declares."""
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "REPO"
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{script.name}: no REPO = 'owner/name' line")


def _checkout(root: Path, repo: str) -> Path:
    owner, name = repo.split("/")
    for cand in (root / f"{owner}+{name}", root / name, root / repo):
        if cand.is_dir():
            return cand
    raise SystemExit(f"no checkout of {repo} under {root} (expected {owner}+{name} or {name})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkouts", type=Path, required=True)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--only", nargs="*", default=None, help="make_<NAME>.py to run")
    args = ap.parse_args(argv)
    scripts = sorted(HERE.glob("make_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem.removeprefix("make_") in args.only]
    for script in scripts:
        repo = _repo(script)
        cmd = [args.python, str(script), "--checkout", str(_checkout(args.checkouts, repo))]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

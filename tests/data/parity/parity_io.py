"""Helpers shared by the ``make_*.py`` parity scripts (run in a throwaway environment).

Only numpy, json and torch: the environment that runs the authors' code need not have
napari-milview installed.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def commit_of(checkout: str | Path) -> str:
    """The 40-hex commit checked out in ``checkout`` (a git work tree).

    Raises
    ------
    SystemExit
        ``checkout`` is not a git work tree.
    """
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True,
                             capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"{checkout}: not a git checkout ({exc})") from None
    if not re.fullmatch(r"[0-9a-f]{40}", out):
        raise SystemExit(f"{checkout}: unexpected commit {out!r}")
    return out


def require_commit(checkout: str | Path, pinned: str) -> str:
    """Refuse a checkout at another commit than the pinned one (prefix match)."""
    got = commit_of(checkout)
    if not got.startswith(pinned):
        raise SystemExit(f"{checkout} is at {got}, the fixtures are pinned to {pinned}: "
                         f"`git -C {checkout} checkout {pinned}` first")
    return got


def make_bags(dim: int, sizes: tuple[int, ...] = (7, 64, 301), seed: int = 0) -> list[np.ndarray]:
    """Seeded bags ``[N, dim]`` float32 (standard normal; one of 7 instances included)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, dim)).astype(np.float32) for n in sizes]


def write_case(name: str, *, arch: str, paper: str, repo: str, commit: str, script: str,
               checkpoint: str, bags: list[np.ndarray], probs: list[np.ndarray],
               sources: dict[str, dict[str, Any]], refs: list[dict[str, np.ndarray]],
               heatmap_source: str, probabilities: str = "softmax",
               load: dict[str, Any] | None = None, sidecar: str | None = None,
               tolerance: float = 1e-4, notes: str = "") -> Path:
    """Write ``<name>/case.json`` and ``<name>/reference.npz`` (the checkpoint is the
    caller's, already saved in ``HERE / name`` the authors' way).

    Parameters
    ----------
    bags : list of ndarray [N_i, D] float32
    probs : list of ndarray [C]
    sources : our source name -> {"key": reference key, "definition": text}
    refs : per bag, reference key -> ndarray [N_i]
    """
    folder = HERE / name
    if not (folder / checkpoint).is_file():
        raise SystemExit(f"{folder / checkpoint}: write the checkpoint first")
    arrays: dict[str, np.ndarray] = {}
    for i, (x, p, r) in enumerate(zip(bags, probs, refs, strict=True)):
        arrays[f"bag{i}__features"] = np.asarray(x, np.float32)
        arrays[f"bag{i}__probs"] = np.asarray(p, np.float64).reshape(-1)
        for s in sources.values():
            v = np.asarray(r[s["key"]], np.float64).reshape(-1)
            if v.shape[0] != x.shape[0]:
                raise SystemExit(f"{name}: source {s['key']} has {v.shape[0]} values for "
                                 f"{x.shape[0]} instances")
            arrays[f"bag{i}__{s['key']}"] = v
    np.savez_compressed(folder / "reference.npz", **arrays)
    case = {"arch": arch, "paper": paper, "repo": repo, "commit": commit, "script": script,
            "checkpoint": checkpoint, "load": load or {}, "probabilities": probabilities,
            "sources": sources, "heatmap_source": heatmap_source, "tolerance": tolerance,
            "notes": notes}
    if sidecar:
        case["sidecar"] = sidecar
    (folder / "case.json").write_text(json.dumps(case, indent=2) + "\n")
    return folder

"""Parity with the authors' code: every case under tests/data/parity (see its README).

Each case holds a checkpoint written the way the authors' training script writes it and the
probabilities and attention/instance sources their own forward pass produced, recorded at a
pinned commit by ``tests/data/parity/make_*.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_milview.mil.checkpoint import load_model

PARITY = Path(__file__).resolve().parents[1] / "data" / "parity"
CASES = sorted(p.parent for p in PARITY.glob("*/case.json"))


def _case(folder: Path) -> dict:
    return json.loads((folder / "case.json").read_text())


def _bags(folder: Path) -> dict[int, dict[str, np.ndarray]]:
    bags: dict[int, dict[str, np.ndarray]] = {}
    with np.load(folder / "reference.npz") as z:
        for key in z.files:
            head, name = key.split("__", 1)
            bags.setdefault(int(head.removeprefix("bag")), {})[name] = z[key]
    return bags


@pytest.mark.parametrize("folder", CASES, ids=[c.name for c in CASES])
def test_case_names_its_source(folder):
    case = _case(folder)
    assert re.fullmatch(r"[0-9a-f]{40}", case["commit"]), "pin a full 40-hex commit"
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", case["repo"])
    assert (PARITY / case["script"]).is_file(), f"{case['script']} regenerates this case"
    assert case["heatmap_source"] in case["sources"]
    assert (folder / case["checkpoint"]).is_file()


@pytest.mark.parametrize("folder", CASES, ids=[c.name for c in CASES])
def test_matches_the_authors_outputs(folder):
    case = _case(folder)
    sidecar = folder / case["sidecar"] if case.get("sidecar") else None
    model, card = load_model(folder / case["checkpoint"], sidecar=sidecar, **case["load"])
    assert card.arch == case["arch"]
    tol = float(case.get("tolerance", 1e-4))
    bags = _bags(folder)
    assert bags, "no reference bags"
    for i, ref in sorted(bags.items()):
        with torch.inference_mode():
            out = model.forward_attention(torch.from_numpy(ref["features"]))
        np.testing.assert_allclose(out.probs.double().numpy(), ref["probs"], atol=tol, rtol=0,
                                   err_msg=f"{folder.name} bag {i}: probabilities")
        for ours, spec in case["sources"].items():
            np.testing.assert_allclose(out.source(ours).double().numpy(), ref[spec["key"]],
                                       atol=tol, rtol=0,
                                       err_msg=f"{folder.name} bag {i}: source {ours}")


def test_every_architecture_has_a_parity_case():
    """Every registered architecture (and alias) is checked against its authors' code."""
    from napari_milview.mil import ALIASES, available_models

    covered = {_case(c)["arch"] for c in CASES}
    covered |= {_case(c)["load"].get("arch") for c in CASES} - {None}
    canonical = set(available_models(include_aliases=False))
    missing = sorted((canonical | set(ALIASES)) - covered
                     - {a for a, (target, _) in ALIASES.items() if target in covered
                        and a.startswith(target)})
    assert not missing, f"no parity case for {missing}"

"""Parity cases from mahmoodlab/CLAM: ``clam_sb`` and ``clam_mb``.

    python make_clam.py --checkout /tmp/authors/mahmoodlab+CLAM

Repository ``mahmoodlab/CLAM`` at :data:`COMMIT` (GPLv3: nothing of it is copied here; its
``models/model_clam.py`` is imported from the checkout at run time). Extra packages: none
(``model_clam`` imports torch and numpy only; it is loaded by file because
``models/__init__.py`` imports the patch encoders).

What it does, per case:

* builds the model with the authors' class the way ``utils/core_utils.train`` builds it
  from ``main.py``'s defaults (``--drop_out 0.25``, ``--model_size small``, ``--B 8``,
  ``--inst_loss`` None -> ``nn.CrossEntropyLoss``), except ``embed_dim=128`` (``--embed_dim``;
  the 512/256 hidden sizes are hard-coded) to keep the files small; ``subtyping`` as
  ``main.py`` sets it for more than two classes;
* saves it as ``core_utils`` does: ``torch.save(model.state_dict(),
  "s_{fold}_checkpoint.pt")`` (a bare state_dict), fold 0;
* runs the authors' forward in eval mode under ``torch.inference_mode`` on
  ``parity_io.make_bags(128)`` (as ``create_heatmaps.infer_single_slide``: ``logits, Y_prob,
  Y_hat, A_raw, _ = model(features)``) and records ``Y_prob`` (softmax of the logits) and
  ``A_raw`` (per class for MB) together with ``softmax_N(A_raw)``, the pooling weights.

The paper's heatmap (``create_heatmaps.infer_single_slide``) is ``A_raw`` for SB and
``A_raw[Y_hat]`` for MB, the raw score of the predicted class's branch, stored in the
blockmap and shown as rank percentiles.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parity_io  # noqa: E402

REPO = "mahmoodlab/CLAM"
COMMIT = "53e2409d4a8189c682c173382964a85f114f923c"
PAPER = "Lu et al., Nat. Biomed. Eng. 2021 (CLAM)"
EMBED_DIM = 128


def _build(model_clam, arch: str, n_classes: int):
    """As ``core_utils.train`` with main.py's defaults (see the module docstring)."""
    model_dict = {"dropout": 0.25, "n_classes": n_classes, "embed_dim": EMBED_DIM,
                  "size_arg": "small", "k_sample": 8}
    if n_classes > 2:
        model_dict["subtyping"] = True
    cls = model_clam.CLAM_SB if arch == "clam_sb" else model_clam.CLAM_MB
    return cls(**model_dict, instance_loss_fn=torch.nn.CrossEntropyLoss())


def _case(model_clam, arch: str, n_classes: int, commit: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = _build(model_clam, arch, n_classes)
    name = f"clam_{arch.split('_')[1]}_mahmoodlab"
    folder = parity_io.HERE / name
    folder.mkdir(exist_ok=True)
    ckpt = "s_0_checkpoint.pt"
    torch.save(model.state_dict(), folder / ckpt)
    model.eval()
    bags = parity_io.make_bags(EMBED_DIM)
    probs, refs, preds = [], [], []
    for x in bags:
        with torch.inference_mode():
            logits, y_prob, y_hat, a_raw, _ = model(torch.from_numpy(x))
        probs.append(y_prob[0].numpy())
        preds.append(int(y_hat.item()))
        a_raw = a_raw.double()  # [K, N]
        ref = {}
        for k in range(a_raw.shape[0]):
            tag = "" if arch == "clam_sb" else f"_{k}"
            ref[f"A_raw{tag}"] = a_raw[k].numpy()
            ref[f"A_softmax{tag}"] = torch.softmax(a_raw[k], dim=0).numpy()
        refs.append(ref)
    if arch == "clam_sb":
        sources = {
            "raw/attention": {"key": "A_raw", "definition": "A_raw[0], the pre-softmax "
                              "attention CLAM_SB.forward returns (model(h)[3]); "
                              "create_heatmaps stores it in the blockmap"},
            "attention": {"key": "A_softmax", "definition": "softmax over N of A_raw[0], "
                          "the weights CLAM_SB pools the bag with"},
        }
        heat = "raw/attention"
        notes = ("CLAM's heatmap is A_raw (raw/attention) shown as rank percentiles, which "
                 "equal those of our default 'attention' (softmax is monotone).")
    else:
        sources = {}
        for c in range(n_classes):
            sources[f"raw/class/{c}"] = {
                "key": f"A_raw_{c}", "definition": f"A_raw[{c}], class {c}'s row of the "
                "pre-softmax attention CLAM_MB.forward returns (model(h)[3])"}
            sources[f"class/{c}"] = {
                "key": f"A_softmax_{c}", "definition": f"softmax over N of A_raw[{c}], the "
                f"weights class {c}'s branch pools the bag with"}
        if len(set(preds)) != 1:
            raise SystemExit(f"{name}: the bags predict different classes {preds}; the "
                             "heatmap source must be one name")
        heat = f"raw/class/{preds[0]}"
        notes = (f"CLAM's heatmap is A_raw[Y_hat] (create_heatmaps.infer_single_slide), i.e. "
                 f"raw/class/{{predicted}}; every bag here predicts class {preds[0]}. Shown as "
                 "rank percentiles, which equal those of our default class/{predicted}.")
    parity_io.write_case(
        name, arch=arch, paper=PAPER, repo=REPO, commit=commit, script=Path(__file__).name,
        checkpoint=ckpt, bags=bags, probs=probs, sources=sources, refs=refs,
        heatmap_source=heat, probabilities="softmax (Y_prob = F.softmax(logits))",
        notes=f"{notes} Built as core_utils.train with main.py's defaults (drop_out 0.25, "
              f"small, B 8, CE instance loss), embed_dim {EMBED_DIM}, {n_classes} classes; "
              "saved as core_utils saves it (bare state_dict, s_0_checkpoint.pt).")
    print(f"{name}: predictions {preds}, probs {[np.round(p, 4).tolist() for p in probs]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=Path, required=True)
    args = ap.parse_args(argv)
    commit = parity_io.require_commit(args.checkout, COMMIT)
    # the authors' module from the checkout, by file: models/__init__.py imports the patch
    # encoders (timm, CONCH, UNI), which the aggregator does not need
    spec = importlib.util.spec_from_file_location(
        "model_clam", args.checkout.resolve() / "models" / "model_clam.py")
    model_clam = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_clam)

    _case(model_clam, "clam_sb", 2, commit, seed=0)
    _case(model_clam, "clam_mb", 3, commit, seed=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DSMIL parity cases from the authors' ``binli123/dsmil-wsi`` (``dsmil.py``, ``train_tcga.py``).

    python make_dsmil.py --checkout /tmp/authors/binli123+dsmil-wsi

Needs torch and numpy only (``dsmil.py`` imports nothing else). Each model is built as
``train_tcga.py``'s ``init_model`` builds it (``FCLayer`` instance classifier,
``BClassifier``, ``MILNet``, orthogonal weights and zero biases), given a few optimiser
steps of the script's loss (``0.5 BCE(bag) + 0.5 BCE(max instance)``) on random bags so that
no bias is zero, and saved as its ``save_model`` saves it: ``torch.save(milnet.state_dict(),
'fold_0_1.pth')`` with the per-class thresholds as a JSON list in ``fold_0_1.json`` beside
it (the threshold values are made up; the file format is the script's).

Cases (feature size 128):

``dsmil_tcga_c2``
    two positive classes, ``--non_linearity 1`` (the default); probabilities as
    ``train_tcga.py`` evaluates at this commit: ``sigmoid(bag_prediction)``.
``dsmil_c16_c1``
    one positive class (``--num_classes 1``, the Camelyon16 set-up); the same scoring.
``dsmil_linear_v_mean``
    two classes with the linear query and the value projection
    (``BClassifier(nonlinear=False, passing_v=True)``, dropout 0), loaded with
    ``scoring="mean_bag_max_instance"`` and recorded as ``testing_tcga.py --average`` scores:
    ``(sigmoid(bag_prediction) + sigmoid(max_n instance))/2``.

Recorded sources, from the authors' ``MILNet.forward`` (eval mode): ``class/{c}`` =
``A[:, c]`` (the softmax attention ``attention_map.py`` draws for each class whose
probability reaches its threshold; the paper's heatmap), ``raw/instance/{c}`` = the instance
classifier's logits ``classes[:, c]`` and ``instance/{c}`` = their sigmoid.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import parity_io  # noqa: E402

REPO = "binli123/dsmil-wsi"
COMMIT = "80465ed534ac49b5e550833da56c27936f0b9440"
PAPER = ("Li, Li & Eliceiri, Dual-stream multiple instance learning network for whole slide "
         "image classification with self-supervised contrastive learning, CVPR 2021")
FEATS = 128


def _build(mil, n_classes: int, nonlinear: bool = True, passing_v: bool = False):
    """``train_tcga.py``'s ``init_model`` (on the CPU), with ``passing_v`` exposed."""
    i_classifier = mil.FCLayer(in_size=FEATS, out_size=n_classes)
    b_classifier = mil.BClassifier(input_size=FEATS, output_class=n_classes, dropout_v=0.0,
                                   nonlinear=nonlinear, passing_v=passing_v)
    milnet = mil.MILNet(i_classifier, b_classifier)

    def apply_sparse_init(m):
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d)):
            torch.nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                torch.nn.init.constant_(m.bias, 0)

    milnet.apply(apply_sparse_init)
    return milnet


def _train_a_little(milnet, n_classes: int, steps: int = 6) -> None:
    """A few steps of ``train_tcga.py``'s loss and optimiser on random bags."""
    criterion = torch.nn.BCEWithLogitsLoss()
    opt = torch.optim.Adam(milnet.parameters(), lr=1e-2, betas=(0.5, 0.9), weight_decay=1e-3)
    milnet.train()
    for _ in range(steps):
        feats = torch.randn(int(torch.randint(5, 40, ())), FEATS)
        label = torch.randint(0, 2, (1, n_classes)).float()
        opt.zero_grad()
        ins_prediction, bag_prediction, _, _ = milnet(feats)
        max_prediction, _ = torch.max(ins_prediction, 0)
        loss = (0.5 * criterion(bag_prediction.view(1, -1), label)
                + 0.5 * criterion(max_prediction.view(1, -1), label))
        loss.backward()
        opt.step()
    milnet.eval()


def _case(mil, name: str, seed: int, n_classes: int, thresholds: list[float],
          nonlinear: bool = True, passing_v: bool = False, average: bool = False) -> None:
    torch.manual_seed(seed)
    milnet = _build(mil, n_classes, nonlinear, passing_v)
    _train_a_little(milnet, n_classes)
    folder = HERE / name
    folder.mkdir(exist_ok=True)
    # train_tcga.py save_model: the state_dict, and the thresholds list beside it
    torch.save(milnet.state_dict(), folder / "fold_0_1.pth")
    with open(folder / "fold_0_1.json", "w") as f:
        json.dump([float(x) for x in thresholds], f)

    bags = parity_io.make_bags(FEATS)
    probs, refs = [], []
    with torch.no_grad():
        for x in bags:
            classes, bag_prediction, A, _ = milnet(torch.from_numpy(x))
            p = torch.sigmoid(bag_prediction).reshape(-1)
            if average:  # testing_tcga.py --average
                p = (p + torch.sigmoid(torch.max(classes, 0)[0]).reshape(-1)) / 2
            probs.append(p.numpy())
            ref = {}
            for c in range(n_classes):
                ref[f"A_{c}"] = A[:, c].numpy()
                ref[f"ins_{c}"] = classes[:, c].numpy()
                ref[f"ins_sigmoid_{c}"] = torch.sigmoid(classes[:, c]).numpy()
            refs.append(ref)
    sources = {}
    for c in range(n_classes):
        sources[f"class/{c}"] = {"key": f"A_{c}", "definition": (
            f"BClassifier attention A[:, {c}] (softmax over instances), drawn by "
            "attention_map.py for a class whose probability reaches its threshold")}
        sources[f"raw/instance/{c}"] = {"key": f"ins_{c}", "definition": (
            f"instance classifier logit classes[:, {c}] (MILNet.forward's first output)")}
        sources[f"instance/{c}"] = {"key": f"ins_sigmoid_{c}",
                                    "definition": f"sigmoid(classes[:, {c}])"}
    scoring = ("(sigmoid(bag_prediction) + sigmoid(max_n classes))/2, testing_tcga.py "
               "--average" if average else
               "sigmoid(bag_prediction) per class, train_tcga.py test() at this commit")
    parity_io.write_case(
        name, arch="dsmil", paper=PAPER, repo=REPO, commit=COMMIT,
        script=Path(__file__).name, checkpoint="fold_0_1.pth", sidecar="fold_0_1.json",
        bags=bags, probs=probs, sources=sources, refs=refs, heatmap_source="class/0",
        probabilities=scoring,
        load={"hparams": {"scoring": "mean_bag_max_instance"}} if average else {},
        notes=(f"{n_classes} positive class(es), feats_size {FEATS}, nonlinear query "
               f"{nonlinear}, passing_v {passing_v}. fold_0_1.json is train_tcga.py's "
               "per-class thresholds list (values made up). The paper's heatmap is "
               "class/{c} for each class over its threshold; our default source is the "
               "positive class with the highest probability."))
    print(f"wrote {folder}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=Path, required=True)
    args = ap.parse_args()
    parity_io.require_commit(args.checkout, COMMIT)
    sys.path.insert(0, str(args.checkout))
    import dsmil as mil  # the authors' module

    np.random.seed(0)
    _case(mil, "dsmil_tcga_c2", seed=0, n_classes=2, thresholds=[0.4581, 0.5827])
    _case(mil, "dsmil_c16_c1", seed=1, n_classes=1, thresholds=[0.5283])
    _case(mil, "dsmil_linear_v_mean", seed=2, n_classes=2, thresholds=[0.51, 0.47],
          nonlinear=False, passing_v=True, average=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

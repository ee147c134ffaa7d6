"""Parity cases for MHIM-MIL (Tang et al., ICCV 2023; MHIM-v2, IJCV 2025).

Repository DearCaat/MHIM-MIL, default branch ``master`` (MHIM-v2 code; the ICCV code is on
branch ``v1``), commit pinned below. Extra packages: ``einops`` (the authors'
``requirements.txt`` pins nothing; einops 0.8.2 with torch 2.13.0 on Python 3.11 was used).

    python make_mhim.py --checkout /tmp/authors/DearCaat+MHIM-MIL

The authors' ``modules/__init__.py`` imports every model of the repository (Mamba ...), so
the ``modules`` package is registered here without running it and ``modules.mhim`` is
imported from the checkout. The model is built as ``modules.build_mil`` builds
``--model mhim`` (its keyword arguments; ``attn_layer``, which the pinned ``MHIM.__init__``
no longer accepts, left out), with small widths (``input_dim`` 64, ``mlp_dim`` 64), the
feature activation of ``config/feat_cls.yaml`` (``act: gelu``) and ``--merge_enable``; the
teacher is a deep copy (as ``build_mil``). Every parameter is then perturbed (seeded) so that
biases and LayerNorms are not at their initial values, the teacher differently from the
student, and the file is saved as the pinned ``main.py`` saves the best model:
``{'model': student.state_dict(), 'teacher': teacher.state_dict(), 'epoch': e}`` as
``fold_0_model_best.pt``.

Recorded, in eval mode (the authors' ``validate`` calls ``model.forward_test(bag)`` and the
engine takes a softmax for classification):

* probabilities: ``softmax(forward_test(bag))``;
* ``attn`` backbone: ``forward_test(bag, return_attn=True)`` -> softmax attention, and with
  ``no_norm=True`` the pre-softmax logits;
* ``selfattn`` backbone: ``forward_test(bag, return_attn=True)`` -> per layer the
  class-token attention ``[1, H, N]``; per head and the mean over heads;
* ``pseudo_score``: ``forward_teacher(bag)`` with ``attn2score`` (MHIM-v2's instance score,
  computed with the module's own predictor);
* ``dsmil`` backbone (``mhim_dsmil``): ``forward_test`` returns ``[bag logits, max instance
  logits]``; the probabilities are ``softmax(0.5 bag + 0.5 max instance)`` as the engine's
  ``validate_func`` (``engines/common_mil.py``) averages them; ``class/{c}`` and
  ``raw/class/{c}`` from ``online_encoder.b_classifier`` on the projected bag and the
  ``i_classifier`` logits (softmax / ``no_norm``), ``instance/{c}`` the softmax over classes
  of those logits, ``attention`` / ``raw/attention`` ``forward_test(return_attn=True)`` with
  the module's ``cls_attn`` switched off (max over classes of the attention), and
  ``pseudo_score`` ``forward_teacher`` with ``attn2score`` (max over classes of the instance
  logits);
* ``merge_test`` case: the model trained with ``--merge_test`` runs the merge at inference;
  the attention over the N instances (the k merged tokens dropped) is recorded.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parity_io  # noqa: E402

REPO = "DearCaat/MHIM-MIL"
COMMIT = "9d0c91abeb1b39f91c161b47cf14bc44f5a89da3"
PAPER = ("Tang et al., Multiple instance learning framework with masked hard instance "
         "mining for whole slide image classification, ICCV 2023 (MHIM-v2: IJCV 2025)")
IN_DIM = 64
MLP_DIM = 64


def _import_mhim(checkout: Path):
    pkg = types.ModuleType("modules")
    pkg.__path__ = [str(checkout / "modules")]
    sys.modules["modules"] = pkg
    sys.path.insert(0, str(checkout))
    return importlib.import_module("modules.mhim")


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _build(mhim, baseline: str, n_classes: int, merge_test: bool):
    # modules.build_mil's keyword arguments for --model mhim (README's grid values)
    return mhim.MHIM(baseline=baseline, dropout=0.25, input_dim=IN_DIM, mlp_dim=MLP_DIM,
                     mask_ratio=0.0, n_classes=n_classes, temp_t=0.1, act="gelu", head=8,
                     mask_ratio_h=0.03, mask_ratio_hr=1.0, mask_ratio_l=0.0, mrh_sche=None,
                     da_act="relu", attn2score=True, merge_enable=True, merge_k=2,
                     merge_mm=0.9999, merge_ratio=0.8, merge_test=merge_test)


def make_case(mhim, name: str, baseline: str, n_classes: int, seed: int,
              merge_test: bool = False) -> None:
    torch.manual_seed(seed)
    model = _build(mhim, baseline, n_classes, merge_test)
    teacher = copy.deepcopy(model)
    teacher.merge_test = False
    _perturb(model, seed + 1)
    _perturb(teacher, seed + 2)
    folder = parity_io.HERE / name
    folder.mkdir(exist_ok=True)
    ckpt = "fold_0_model_best.pt"
    torch.save({"model": model.state_dict(), "teacher": teacher.state_dict(), "epoch": 7},
               folder / ckpt)
    model.eval()
    bags = parity_io.make_bags(IN_DIM)
    probs, refs = [], []
    for x in bags:
        n = x.shape[0]
        xb = torch.from_numpy(x)[None]
        r: dict[str, np.ndarray] = {}
        with torch.no_grad():
            logits, attn = model.forward_test(xb, return_attn=True)
            if baseline == "dsmil":  # [bag logits, max instance logits]
                logits = 0.5 * logits[0] + 0.5 * logits[1]
            probs.append(torch.softmax(logits, dim=-1)[0].numpy())
            if baseline == "dsmil":
                # validate_func (engines/common_mil.py) scores the plain forward_test:
                # 0.5 bag + 0.5 max instance logits, then the softmax
                out = model.forward_test(xb)[0]
                np.testing.assert_allclose(
                    probs[-1], torch.softmax(0.5 * out[0] + 0.5 * out[1], dim=-1)[0].numpy(),
                    rtol=0, atol=1e-7)
                enc = model.online_encoder
                feats = model.feature(xb)[0]
                cls = enc.i_classifier(feats)  # [N, C] instance logits
                _, a, _ = enc.b_classifier(feats, cls)
                _, raw, _ = enc.b_classifier(feats, cls, no_norm=True)
                for c in range(n_classes):
                    r[f"class{c}"] = a[:, c].numpy()
                    r[f"raw_class{c}"] = raw[:, c].numpy()
                    r[f"instance{c}"] = torch.softmax(cls, dim=1)[:, c].numpy()
                    r[f"raw_instance{c}"] = cls[:, c].numpy()
                enc.cls_attn = False
                r["attention"] = model.forward_test(xb, return_attn=True)[1][0].numpy()
                r["raw_attention"] = model.forward_test(
                    xb, return_attn=True, no_norm=True)[1][0].numpy()
                enc.cls_attn = True
            elif baseline == "attn":
                r["attention"] = attn[0, :n].numpy()
                _, raw = model.forward_test(xb, return_attn=True, no_norm=True)
                r["raw_attention"] = raw[0, :n].numpy()
            else:
                for layer, a in enumerate(attn, start=1):
                    a = a[0, :, :n]  # [H, N]
                    for h in range(a.shape[0]):
                        r[f"layer{layer}_head{h}"] = a[h].numpy()
                    r[f"layer{layer}_mean"] = a.mean(dim=0).numpy()
            if not merge_test:
                _, score = model.forward_teacher(xb)
                r["pseudo_score"] = score[0].numpy()
        refs.append(r)
    sources: dict[str, dict[str, str]] = {}
    if baseline == "dsmil":
        for c in range(n_classes):
            sources[f"class/{c}"] = {"key": f"class{c}", "definition":
                                     f"online_encoder.b_classifier(feature(x), "
                                     f"i_classifier(...))[1][:, {c}]: softmax attention"}
            sources[f"raw/class/{c}"] = {"key": f"raw_class{c}", "definition":
                                         "the same with no_norm=True"}
            sources[f"instance/{c}"] = {"key": f"instance{c}", "definition":
                                        f"softmax_C(i_classifier(feature(x)))[:, {c}]"}
            sources[f"raw/instance/{c}"] = {"key": f"raw_instance{c}", "definition":
                                            f"i_classifier(feature(x))[:, {c}]"}
        sources["attention"] = {"key": "attention", "definition":
                                "forward_test(return_attn=True) with cls_attn False: "
                                "max over classes of the softmax attention"}
        sources["raw/attention"] = {"key": "raw_attention", "definition":
                                    "the same with no_norm=True"}
        heatmap = "class/1"  # DSMIL's heatmap: the attention of the class shown
    elif baseline == "attn":
        sources["attention"] = {"key": "attention", "definition":
                                "forward_test(return_attn=True): softmax attention"}
        sources["raw/attention"] = {"key": "raw_attention", "definition":
                                    "forward_test(return_attn=True, no_norm=True)"}
        heatmap = "attention"
    else:
        for layer in (1, 2):
            for h in range(8):
                sources[f"layer{layer}/head/{h}"] = {
                    "key": f"layer{layer}_head{h}",
                    "definition": f"forward_test(return_attn=True)[1][{layer - 1}][0, {h}]: "
                                  "class-token Nystrom attention over the instances"}
            sources[f"layer{layer}/mean"] = {
                "key": f"layer{layer}_mean",
                "definition": f"mean over heads of forward_test(return_attn=True)[1]"
                              f"[{layer - 1}][0]"}
        heatmap = "layer1/mean"
    if not merge_test:
        sources["pseudo_score"] = {"key": "pseudo_score", "definition":
                                   "forward_teacher(bag)[1] with attn2score (MHIM-v2 "
                                   "get_pseudo_score / get_pseudo_score_trans)"
                                   + ("; dsmil: max over classes of the instance logits"
                                      if baseline == "dsmil" else "")}
    notes = (f"MHIM --baseline {baseline}, --merge_enable (k 2, mm 0.9999), act gelu "
             "(config/feat_cls.yaml), da_act relu; checkpoint {'model' (student), 'teacher', "
             "'epoch'} as main.py saves it; the student is loaded.")
    load: dict = {}
    if merge_test:
        notes += " Trained with --merge_test: the merge runs at inference (load hparams)."
        load = {"hparams": {"merge_test": True}}
    parity_io.write_case(
        name, arch="mhim", paper=PAPER, repo=REPO, commit=COMMIT, script="make_mhim.py",
        checkpoint=ckpt, bags=bags, probs=probs, sources=sources, refs=refs,
        heatmap_source=heatmap, load=load, notes=notes)
    print(f"wrote {folder}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=Path, required=True)
    args = ap.parse_args()
    parity_io.require_commit(args.checkout, COMMIT)
    mhim = _import_mhim(args.checkout.resolve())
    make_case(mhim, "mhim_abmil", "attn", 2, seed=13)
    make_case(mhim, "mhim_transmil", "selfattn", 3, seed=14)
    make_case(mhim, "mhim_transmil_merge_test", "selfattn", 2, seed=15, merge_test=True)
    make_case(mhim, "mhim_dsmil", "dsmil", 3, seed=16)


if __name__ == "__main__":
    main()

"""Parity cases for DTFD-MIL (Zhang et al., CVPR 2022) from the authors' own code.

    python make_dtfd.py --checkout /tmp/authors/hrzhang1123+DTFD-MIL

Repository ``hrzhang1123/DTFD-MIL`` (MIT) at the commit pinned below; it needs torch, numpy
and scikit-learn (``utils.py`` imports it). ``Main_DTFD_MIL.py`` imports tensorboard's
``SummaryWriter`` at module level, which inference never uses: a stub module stands in.

What it does, per case:

1. seeds torch and builds the four modules exactly as ``Main_DTFD_MIL.main`` does
   (``Classifier_1fc(mDim, num_cls)``, ``Attention_Gated(mDim)``,
   ``DimReduction(in_chn, mDim, numLayer_Res=0)``, ``Attention_with_Classifier(L=mDim,
   num_cls)``) with small sizes (in_chn 128, mDim 64); the tier-1 classifier's weights are
   scaled by 40 so that the derived instance probabilities spread away from 0.5;
2. saves them as the training script does: ``torch.save({'classifier', 'dim_reduction',
   'attention', 'att_classifier'}, '<log_dir>/best_model.pth')`` (state_dicts);
3. runs the authors' own inference function ``test_attention_DTFD_preFeat_MultipleMean``
   (eval mode, ``num_MeanInference`` 1) on ``parity_io.make_bags(128)``. That function splits
   a bag into pseudo-bags with ``random.shuffle`` of ``list(range(N))`` and
   ``np.array_split(..., numGroup)``; the module's ``random`` is replaced by an object whose
   ``shuffle`` writes ``numpy.random.default_rng(seed).permutation(N)`` into the list, which
   is the permutation ``napari_milview.mil.dtfd.pseudo_bag_split`` uses, so the authors'
   loop runs on our deterministic split and nothing else of theirs changes;
4. records, without changing their code: the second-tier probabilities (``eval_metric`` is
   replaced by a recorder: it receives ``gPred_1[:, -1]``, the last-class softmax of each
   slide; C = 2, so the first class is ``1 - p``); the derived instance probabilities
   (``get_cam_1d`` is wrapped: its ``[1, C, n]`` output, transposed and softmaxed over the
   classes as the authors do); the tier-1 attention of each instance (its
   ``tattFeats = a_k h_k`` row, the input ``get_cam_1d`` received, divided by ``h_k``,
   the ``dimReduction`` output a forward hook records: ``a_k = sum(a_k h_k) / sum(h_k)``);
   and the whole-bag attention logits (a forward hook on ``attention``).
"""

from __future__ import annotations

import argparse
import io
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parity_io  # noqa: E402

REPO = "hrzhang1123/DTFD-MIL"
COMMIT = "10964f4dcc27c65ce110a0e9a3b9240bff58da8a"
IN_DIM, M_DIM, N_CLASSES, NUM_GROUP = 128, 64, 2, 4

#: case name -> (distill type, total_instance, seed of the split, torch seed)
CASES = {
    "dtfd_afs": ("AFS", 4, 0, 0),
    "dtfd_maxmins": ("MaxMinS", 8, 7, 1),
}


def _import_authors(checkout: Path):
    """``Main_DTFD_MIL`` and the authors' model classes, with tensorboard stubbed."""
    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = object
    sys.modules["torch.utils.tensorboard"] = tb
    sys.path.insert(0, str(checkout))
    import Main_DTFD_MIL as main
    from Model.Attention import Attention_Gated, Attention_with_Classifier
    from Model.network import Classifier_1fc, DimReduction
    return main, Attention_Gated, Attention_with_Classifier, Classifier_1fc, DimReduction


def _permutation(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).permutation(n).tolist()


def make_case(name: str, authors, distill: str, total_instance: int, split_seed: int,
              torch_seed: int) -> None:
    main, Attention_Gated, Attention_with_Classifier, Classifier_1fc, DimReduction = authors
    torch.manual_seed(torch_seed)
    classifier = Classifier_1fc(M_DIM, N_CLASSES, 0.0)
    attention = Attention_Gated(M_DIM)
    dim_reduction = DimReduction(IN_DIM, M_DIM, numLayer_Res=0)
    att_cls = Attention_with_Classifier(L=M_DIM, num_cls=N_CLASSES, droprate=0.0)
    with torch.no_grad():
        classifier.fc.weight.mul_(40.0)
    folder = parity_io.HERE / name
    folder.mkdir(exist_ok=True)
    torch.save({"classifier": classifier.state_dict(),
                "dim_reduction": dim_reduction.state_dict(),
                "attention": attention.state_dict(),
                "att_classifier": att_cls.state_dict()}, folder / "best_model.pth")

    # -- record what the authors' inference function computes --------------------------
    cams: list[tuple[torch.Tensor, torch.Tensor]] = []
    mids: list[torch.Tensor] = []
    raws: list[torch.Tensor] = []
    metric_calls: list[torch.Tensor] = []
    get_cam_1d = main.get_cam_1d

    def cam_recorder(clf, features):
        cam = get_cam_1d(clf, features)
        cams.append((features[0].detach().clone(), cam[0].detach().clone()))
        return cam

    def metric_recorder(oprob, label):
        metric_calls.append(oprob.detach().clone())
        return (0.0,) * 6

    def shuffle(lst):
        lst[:] = _permutation(len(lst), split_seed)

    main.get_cam_1d = cam_recorder
    main.eval_metric = metric_recorder
    main.random = types.SimpleNamespace(shuffle=shuffle)
    h1 = dim_reduction.register_forward_hook(lambda m, i, o: mids.append(o.detach().clone()))
    h2 = attention.register_forward_hook(lambda m, i, o: raws.append(o.detach().clone()))

    bags = parity_io.make_bags(IN_DIM)
    params = types.SimpleNamespace(device="cpu", batch_size_v=1, num_MeanInference=1)
    writer = types.SimpleNamespace(add_scalar=lambda *a, **k: None)
    main.test_attention_DTFD_preFeat_MultipleMean(
        mDATA_list=([f"bag{i}" for i in range(len(bags))],
                    [torch.from_numpy(b) for b in bags], [0] * len(bags)),
        classifier=classifier, dimReduction=dim_reduction, attention=attention,
        UClassifier=att_cls, epoch=0, criterion=torch.nn.CrossEntropyLoss(reduction="none"),
        params=params, f_log=io.StringIO(), writer=writer, numGroup=NUM_GROUP,
        total_instance=total_instance, distill=distill)
    h1.remove()
    h2.remove()
    main.get_cam_1d = get_cam_1d

    assert len(metric_calls) == 2 and len(mids) == len(raws) == len(bags)
    assert len(cams) == NUM_GROUP * len(bags)
    p_last = metric_calls[1].double().numpy()  # gPred_1[:, -1], one per slide
    probs, refs = [], []
    for b, x in enumerate(bags):
        n = x.shape[0]
        chunks = np.array_split(np.array(_permutation(n, split_seed)), NUM_GROUP)
        att = np.full(n, np.nan)
        inst = np.full((n, N_CLASSES), np.nan)
        for g, idx in enumerate(chunks):
            feats, cam = cams[b * NUM_GROUP + g]  # [n_g, m], [C, n_g]
            assert feats.shape[0] == len(idx)
            if len(idx) == 0:
                continue
            inst[idx] = torch.softmax(cam.t(), dim=1).double().numpy()
            h = mids[b][torch.as_tensor(idx)].double()
            att[idx] = (feats.double().sum(1) / h.sum(1)).numpy()
        assert np.isfinite(att).all() and np.isfinite(inst).all()
        probs.append(np.array([1.0 - p_last[b], p_last[b]]))
        ref = {"tier1_attention": att, "raw_tier1_attention": raws[b][0].double().numpy()}
        ref.update({f"instance_{c}": inst[:, c] for c in range(N_CLASSES)})
        refs.append(ref)

    sources = {
        "tier1/attention": {
            "key": "tier1_attention",
            "definition": "softmax of the whole-bag gated attention logits within the "
                          "instance's pseudo-bag (tAA in the authors' test loop)"},
        "raw/tier1/attention": {
            "key": "raw_tier1_attention",
            "definition": "attention(midFeat, isNorm=False): whole-bag attention logits"},
    }
    for c in range(N_CLASSES):
        sources[f"instance/{c}"] = {
            "key": f"instance_{c}",
            "definition": f"derived instance probability of class {c} (paper section 3.3): "
                          "softmax over classes of get_cam_1d(classifier, a_k h_k)"}
    load = {} if (distill, total_instance, split_seed) == ("AFS", 4, 0) else {
        "hparams": {"distill": distill, "total_instance": total_instance, "seed": split_seed}}
    parity_io.write_case(
        name, arch="dtfd",
        paper="Zhang et al., DTFD-MIL: Double-Tier Feature Distillation Multiple Instance "
              "Learning, CVPR 2022",
        repo=REPO, commit=COMMIT, script=Path(__file__).name, checkpoint="best_model.pth",
        bags=bags, probs=probs, sources=sources, refs=refs,
        heatmap_source=f"instance/{N_CLASSES - 1}", probabilities="softmax", load=load,
        notes=(
            f"distill_type={distill}, numGroup_test={NUM_GROUP}, "
            f"total_instance_test={total_instance}, num_MeanInference=1, in_chn={IN_DIM}, "
            f"mDim={M_DIM}, numLayer_Res=0, droprates 0; tier-1 classifier weights x40. "
            "The authors split each bag at random (random.shuffle + np.array_split, a new "
            "split every call); here their own test function "
            "(test_attention_DTFD_preFeat_MultipleMean) ran with random.shuffle replaced so "
            f"that it yields numpy.random.default_rng({split_seed}).permutation(N), the "
            f"permutation our model uses with seed={split_seed}; everything else is theirs. "
            "Probabilities: their gPred_1 (softmax of the tier-2 logits; C=2, class 0 = "
            "1 - p). Instance probabilities: softmax over classes of their get_cam_1d "
            "output; tier-1 attention: their a_k h_k rows over h_k (dimReduction output)."),
    )


def main_() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=Path, required=True)
    args = ap.parse_args()
    commit = parity_io.require_commit(args.checkout, COMMIT)
    assert commit == COMMIT
    authors = _import_authors(args.checkout.resolve())
    for name, spec in CASES.items():
        make_case(name, authors, *spec)
        print(f"wrote {parity_io.HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main_())

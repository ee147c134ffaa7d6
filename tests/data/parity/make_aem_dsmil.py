"""AEM's DSMIL copy: parity case from ``dazhangyu123/AEM`` (``architecture/dsmil.py``, ``main.py``).

    python make_aem_dsmil.py --checkout /tmp/authors/dazhangyu123+AEM

Needs torch, numpy, scikit-learn, h5py and wandb (``utils/utils.py``, whose ``Struct`` and
``save_model`` are used, imports them). Both ``utils/utils.py`` and ``architecture/dsmil.py``
also import torchvision without using it for what runs here; when torchvision cannot be
imported, an empty stand-in module is registered under that name first.

The model is built as ``main.py --arch dsmil --pretrain medical_ssl`` builds it
(``D_feat 384``, ``D_inner 128``, ``n_class 2`` from ``config/camelyon_config.yml``):
``FCLayer(D_feat, n_class)``, ``BClassifier(conf, nonlinear=False)`` (query
``Linear(D_feat, D_inner)``), ``MILNet``; given a few AdamW steps of its loss
(``0.5 CE(max instance) + 0.5 CE(bag)`` plus ``lamda`` times the attention negative entropy),
then saved with its ``utils.save_model``: ``{'model', 'optimizer', 'epoch', 'config'}`` in
``checkpoint-best.pth``, the config a ``utils.utils.Struct``.

Recorded, from ``MILNet.forward(x[None])`` in eval mode as ``main.py``'s ``evaluate`` runs it:
the probabilities ``0.5 softmax(max_n instance_logits) + 0.5 softmax(bag_logit)``; sources
``raw/class/{c}`` = the returned attention ``A_out[c]`` (pre-softmax, [C, N]) and
``class/{c}`` = ``softmax(A_out, -1)[c]`` (what its bag embedding uses), ``raw/instance/{c}``
= ``instance_logits[:, c]`` and ``instance/{c}`` = ``softmax(instance_logits, 1)[:, c]``
(the classes are mutually exclusive here: cross-entropy).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import parity_io  # noqa: E402

REPO = "dazhangyu123/AEM"
COMMIT = "4a928a84354009f988e84f1382e55b7a669d2e73"
PAPER = ("Zhang et al., Attention Entropy Maximization for multiple instance learning "
         "(AEM), DSMIL backbone of Li et al., CVPR 2021")
NAME = "aem_dsmil"


def _torchvision_stand_in() -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken: the code run here never uses it
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.transforms"] = tv.transforms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=Path, required=True)
    args = ap.parse_args()
    parity_io.require_commit(args.checkout, COMMIT)
    _torchvision_stand_in()
    sys.path.insert(0, str(args.checkout))
    from architecture.dsmil import BClassifier, FCLayer, MILNet  # the authors' modules
    from utils.utils import Struct, save_model

    torch.manual_seed(5)
    np.random.seed(5)
    # the config main.py assembles: config/camelyon_config.yml + the arguments + the preset
    conf = Struct(
        train_epoch=50, B=1, warmup_epoch=0, wd=0.00001, min_lr=0, dataset="camelyon",
        n_class=2, data_dir="roi_feats", n_worker=8, pin_memory=False, n_shot=-1,
        config="config/camelyon_config.yml", seed=5, wandb_mode="disabled", arch="dsmil",
        lamda=0.1, pretrain="medical_ssl", lr=0.0001, subsampling=1.0,
    )
    conf.D_feat = 384
    conf.D_inner = 128

    i_classifier = FCLayer(conf.D_feat, conf.n_class)
    b_classifier = BClassifier(conf, nonlinear=False)
    model = MILNet(i_classifier, b_classifier)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.001, weight_decay=conf.wd)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    for _ in range(6):  # main.py's train_one_epoch loss, on random bags
        x = torch.randn(1, int(torch.randint(5, 40, ())), conf.D_feat)
        labels = torch.randint(0, conf.n_class, (1,))
        ins_preds, bag_preds, attn = model(x)
        max_preds, _ = torch.max(ins_preds, 0, keepdim=True)
        bag_loss = 0.5 * criterion(max_preds, labels) + 0.5 * criterion(bag_preds, labels)
        div_loss = torch.sum(F.softmax(attn, dim=-1) * F.log_softmax(attn, dim=-1)) \
            / attn.shape[0]
        loss = conf.lamda * div_loss + bag_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    folder = HERE / NAME
    folder.mkdir(exist_ok=True)
    save_model(conf=conf, model=model, optimizer=optimizer, epoch=3,
               save_path=str(folder / "checkpoint-best.pth"))

    bags = parity_io.make_bags(conf.D_feat)
    probs, refs = [], []
    with torch.no_grad():
        for x in bags:
            instance_logits, bag_logit, attn = model(torch.from_numpy(x)[None])
            max_preds, _ = torch.max(instance_logits, 0, keepdim=True)
            pred = 0.5 * torch.softmax(max_preds, dim=-1) + 0.5 * torch.softmax(bag_logit, dim=-1)
            probs.append(pred.reshape(-1).numpy())
            a = torch.softmax(attn, dim=-1)
            ins_p = torch.softmax(instance_logits, dim=1)
            ref = {}
            for c in range(conf.n_class):
                ref[f"A_{c}"] = a[c].numpy()
                ref[f"A_raw_{c}"] = attn[c].numpy()
                ref[f"ins_{c}"] = instance_logits[:, c].numpy()
                ref[f"ins_softmax_{c}"] = ins_p[:, c].numpy()
            refs.append(ref)
    sources = {}
    for c in range(conf.n_class):
        sources[f"class/{c}"] = {"key": f"A_{c}", "definition": (
            f"softmax over instances of the returned attention A_out[{c}] (the weights of "
            "the bag embedding)")}
        sources[f"raw/class/{c}"] = {"key": f"A_raw_{c}", "definition": (
            f"the returned attention A_out[{c}]: Q q_max / sqrt(D_inner), pre-softmax")}
        sources[f"raw/instance/{c}"] = {"key": f"ins_{c}",
                                        "definition": f"instance logits[:, {c}]"}
        sources[f"instance/{c}"] = {"key": f"ins_softmax_{c}",
                                    "definition": f"softmax(instance logits, 1)[:, {c}]"}
    parity_io.write_case(
        NAME, arch="dsmil", paper=PAPER, repo=REPO, commit=COMMIT,
        script=Path(__file__).name, checkpoint="checkpoint-best.pth", bags=bags, probs=probs,
        sources=sources, refs=refs, heatmap_source="class/1",
        probabilities="0.5 softmax(max instance logits) + 0.5 softmax(bag logits), main.py "
                      "evaluate()",
        notes=("main.py --arch dsmil --pretrain medical_ssl --lamda 0.1: D_feat 384, "
               "D_inner 128 (the linear query's size), 2 classes; saved by utils.save_model "
               "with the utils.utils.Struct config, from which our loader takes AEM's "
               "scoring. AEM draws no DSMIL heatmap; class/{predicted class} is our default."))
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

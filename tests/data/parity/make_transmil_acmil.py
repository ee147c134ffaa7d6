"""Parity case ``transmil_acmil``: ACMIL's copy of TransMIL (Zhang et al., ECCV 2024 repo).

    python make_transmil_acmil.py --checkout /tmp/authors/dazhangyu123+ACMIL

Environment (outside the repository, a second one: ACMIL pins another release):
``torch==2.13.0 numpy einops nystrom-attention==0.0.12 pyyaml``. The script refuses any
other nystrom-attention release.

What it does, the way ACMIL's ``Step3_WSI_classification.py --arch transmil`` does it:

* the config: ``config/camelyon_config.yml`` updated with the script's argument defaults
  (``arch='transmil'``, ``pretrain='medical_ssl'``, seed 5 ...) and the ``medical_ssl``
  preset ``D_feat = 384``, ``D_inner = 128`` (small dims: the checkpoint is under 1 MB),
  held in ACMIL's ``utils.utils.Struct``. ACMIL's ``utils/utils.py`` imports wandb,
  sklearn, h5py and torchvision; the script registers a module ``utils.utils`` of its own
  whose ``Struct`` is the same three-line attribute bag, so the pickle names
  ``utils.utils.Struct`` exactly as ACMIL's does;
* the model: ACMIL's ``architecture.transMIL.TransMIL(conf)`` (heads 8, dim_head
  ``D_inner // 8``, ``D_inner // 2`` = 64 landmarks), its ``AdamW`` optimizer, no training
  step (the optimizer state is empty; the weights are the seeded initialisation);
* saved as ACMIL's ``save_model`` saves: ``torch.save({'model', 'optimizer', 'epoch',
  'config'}, 'checkpoint-best.pth')``.

Its forward calls ``.cuda()`` on the class token; the script runs on the CPU and makes
``Tensor.cuda`` return the tensor itself.

Recorded per bag (``parity_io.make_bags(384)``: 7, 64 and 301 instances), in eval mode:
``softmax(logits)`` and the class-token attention rows as in ``make_transmil.py`` (each
layer's ``NystromAttention`` called with ``return_attn=True``; row p, instance columns, copies
folded back; layer means, layer 2's heads, rollout). Heatmap: layer 2's head mean.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parity_io  # noqa: E402
from make_transmil import SOURCES, capture, references  # noqa: E402

REPO = "dazhangyu123/ACMIL"
COMMIT = "e53d19c81f3892256d41962ffc4352cc91a4f834"
CASE = "transmil_acmil"
NYSTROM = "0.0.12"


def _struct_module():
    """A module ``utils.utils`` with ACMIL's ``Struct`` (an attribute bag) and nothing else."""
    utils = types.ModuleType("utils")
    mod = types.ModuleType("utils.utils")

    class Struct:
        def __init__(self, **entries):
            self.__dict__.update(entries)

    Struct.__module__ = "utils.utils"
    Struct.__qualname__ = "Struct"
    mod.Struct = Struct
    utils.utils = mod
    sys.modules["utils"], sys.modules["utils.utils"] = utils, mod
    return Struct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=Path, required=True)
    args = ap.parse_args()
    commit = parity_io.require_commit(args.checkout, COMMIT)
    if md.version("nystrom-attention") != NYSTROM:
        raise SystemExit(f"needs nystrom-attention=={NYSTROM} (ACMIL's pin), found "
                         f"{md.version('nystrom-attention')}")
    import yaml

    Struct = _struct_module()
    sys.path.insert(0, str(args.checkout))
    from architecture.transMIL import TransMIL

    torch.Tensor.cuda = lambda self, *a, **k: self  # the forward moves cls to CUDA

    # the config, as Step3_WSI_classification.py builds it (argument defaults)
    with open(args.checkout / "config" / "camelyon_config.yml") as f:
        c = yaml.load(f, Loader=yaml.FullLoader)
    c.update({"config": "config/camelyon_config.yml", "seed": 5, "wandb_mode": "disabled",
              "w_loss": 1.0, "arch": "transmil", "pretrain": "medical_ssl", "lr": 0.0001})
    conf = Struct(**c)
    conf.D_feat, conf.D_inner = 384, 128  # the medical_ssl preset
    torch.manual_seed(conf.seed)
    np.random.seed(conf.seed)

    net = TransMIL(conf)
    optimizer = torch.optim.AdamW(filter(lambda p: p.requires_grad, net.parameters()),
                                  lr=conf.lr, weight_decay=conf.wd)
    folder = parity_io.HERE / CASE
    folder.mkdir(exist_ok=True)
    ckpt_name = "checkpoint-best.pth"
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0,
                "config": conf}, folder / ckpt_name)

    net.eval()
    seen = capture(net)
    bags = parity_io.make_bags(conf.D_feat)
    probs, refs = [], []
    with torch.no_grad():
        for x in bags:
            seen.clear()
            logits = net(torch.from_numpy(x)[None])
            probs.append(torch.softmax(logits, dim=1)[0].double().numpy())
            refs.append(references(seen, x.shape[0], num_landmarks=conf.D_inner // 2))
            print(f"N={x.shape[0]}: probs {probs[-1].round(4)}")
    parity_io.write_case(
        CASE, arch="transmil", paper="TransMIL (Shao et al., NeurIPS 2021), ACMIL's copy",
        repo=REPO, commit=commit, script=Path(__file__).name, checkpoint=ckpt_name,
        bags=bags, probs=probs, sources=SOURCES, refs=refs, heatmap_source="layer2/mean",
        notes=(f"ACMIL's architecture/transMIL.py with nystrom-attention {NYSTROM} (its pin: "
               "the last n rows kept after front padding), D_feat 384 / D_inner 128 "
               "(medical_ssl preset). ACMIL's container {'model', 'optimizer', 'epoch', "
               "'config': utils.utils.Struct}; our loader must pick nystrom 'current' from "
               "the container alone (load = {})."
               " Neither the official repository nor ACMIL ships a TransMIL heatmap script "
               "(ACMIL's Step4 only visualises models that return attention scores), so the "
               "heatmap follows the paper's description: the class token's attention row of "
               "the last layer."))


if __name__ == "__main__":
    main()

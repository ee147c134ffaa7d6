"""Parity case for INS (Qu et al., TCSVT 2024) from the authors' ``miccaiif/INS``.

    python make_ins.py --checkout /tmp/authors/miccaiif+INS [--resnet-case DIR]

Needs torch and numpy only. The authors' ``resnet.py`` imports torchvision at the top but
uses it only for ImageNet weights (``pretrained=True``); ``model_feat.py`` builds the
encoder with ``pretrained=False`` (its ``args.dataset != 'cub200'``), so when torchvision is
not installed a placeholder module stands in for that import (it raises if anything of it is
used).

Builds the authors' ``model_feat.INS`` with their ``resnet.SupConResNet``. The published
instance encoder is a ResNet-18 (11 M parameters, twice: ``encoder_q`` and the momentum
``encoder_k``), whose checkpoint is ~90 MB, too large for the repository; on raw feature
vectors the authors' ``SupConResNet`` offers, commented out, a linear encoder
(``self.encoder = nn.Linear(..., 512)``), which the committed case ``ins_linear`` uses:
``SupConResNet`` with that line applied (a subclass setting it after the authors'
constructor). ``--resnet-case DIR`` also writes the ResNet-18 case (features viewed as
``[3, 32, D / 32]`` images, as the authors' ``train_onlybag_feat_by_bagcls.py`` feeds
them) into ``DIR`` for a local check.

The training scripts define ``save_checkpoint`` but never call it; their ``--resume`` reads
``checkpoint['state_dict']`` of the DistributedDataParallel model, the layout of PiCO's
``save_checkpoint({'epoch', 'arch', 'state_dict', 'optimizer'}, ...)`` that INS is built
from: the case is written that way (``module.`` keys, ``checkpoint.pth.tar``).

Records, per bag, the authors' inference (``train_withbag_cam.py`` ``test``): instance
probabilities ``softmax(model(x, args, eval_only=True)[0])`` and the bag probabilities as
their mean over instances.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parity_io  # noqa: E402

REPO = "miccaiif/INS"
COMMIT = "cd97ba2fa7df2a951f218e6de405f664129931c8"
PAPER = ("Qu et al., Rethinking MIL for WSI classification: a good instance classifier is "
         "all you need, IEEE TCSVT 2024 (arXiv 2307.02249)")
DIM = 64


def _placeholder_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        def _unused(*_a, **_k):
            raise RuntimeError("torchvision placeholder: not installed")
        tv = types.ModuleType("torchvision")
        tv.models = types.SimpleNamespace(resnet18=_unused)
        sys.modules["torchvision"] = tv


def _args() -> types.SimpleNamespace:
    # the attributes model_feat.INS reads; moco_queue and low_dim are constructor sizes
    return types.SimpleNamespace(dataset="cam16_mil", num_class=2, low_dim=32, arch="resnet18",
                                 moco_queue=64)


def _as_input(t: torch.Tensor, reshape: bool) -> torch.Tensor:
    """Features [N, D]; for the ResNet encoder viewed as [N, 3, 32, D / 32] images, as
    train_onlybag_feat_by_bagcls.py feeds them."""
    if not reshape:
        return t
    t = t.view(t.shape[0], 32, -1)
    return torch.repeat_interleave(t.unsqueeze(dim=1), repeats=3, dim=1)


def _save_like_training(model: nn.Module, path: Path) -> None:
    """DistributedDataParallel wrapper (one CPU process), then PiCO's save_checkpoint dict."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517", rank=0,
                                world_size=1)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = torch.optim.SGD(ddp.parameters(), 0.01, momentum=0.9, weight_decay=1e-3)
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": ddp.state_dict(),
                "optimizer": opt.state_dict()}, path)


def _case(name: str, out_dir: Path, base_encoder, reshape: bool, checkout: Path, commit: str,
          notes: str) -> None:
    from model_feat import INS

    args = _args()
    torch.manual_seed(0)
    model = INS(args, base_encoder)
    with torch.no_grad():  # trained-looking batch-norm statistics (ResNet case)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        # instance classifier scaled so the instance logits spread (std ~2, centred) on the
        # first bag: probabilities neither all 0.5 nor saturated
        x0 = _as_input(torch.from_numpy(parity_io.make_bags(DIM)[0]), reshape)
        model.eval()
        out = model(x0, args, eval_only=True)[0]
        d = out[:, 1] - out[:, 0]
        fc = model.encoder_q.fc
        fc.weight.mul_(2.0 / float(d.std()))
        fc.bias.mul_(2.0 / float(d.std()))
        d = (lambda o: o[:, 1] - o[:, 0])(model(x0, args, eval_only=True)[0])
        fc.bias[1] -= float(d.mean())
    model.train()
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    _save_like_training(model, folder / "checkpoint.pth.tar")
    model.eval()
    bags = parity_io.make_bags(DIM)
    probs, refs = [], []
    with torch.no_grad():
        for x in bags:
            out, _q = model(_as_input(torch.from_numpy(x), reshape), args, eval_only=True)
            p = torch.softmax(out, dim=1)  # [N, 2]
            probs.append(p.mean(dim=0).double().numpy())
            refs.append({"instance_0": p[:, 0].double().numpy(),
                         "instance_1": p[:, 1].double().numpy()})
    if out_dir == parity_io.HERE:
        parity_io.write_case(
            name, arch="ins", paper=PAPER, repo=REPO, commit=commit, script="make_ins.py",
            checkpoint="checkpoint.pth.tar", bags=bags, probs=probs, refs=refs,
            sources={"instance/0": {"key": "instance_0", "definition":
                                    "softmax(encoder_q.fc(encoder_q.encoder(x)))[:, 0]"},
                     "instance/1": {"key": "instance_1", "definition":
                                    "instance classifier positive probability (heatmap)"}},
            heatmap_source="instance/1", probabilities="mean over instances of the "
            "instance softmax (train_withbag_cam.py test)", load={}, notes=notes)
    else:  # a local check outside the repository: same files, the input dim passed
        saved = parity_io.HERE
        parity_io.HERE = out_dir
        try:
            parity_io.write_case(
                name, arch="ins", paper=PAPER, repo=REPO, commit=commit,
                script="make_ins.py", checkpoint="checkpoint.pth.tar", bags=bags,
                probs=probs, refs=refs,
                sources={"instance/0": {"key": "instance_0", "definition": "class 0"},
                         "instance/1": {"key": "instance_1", "definition": "class 1"}},
                heatmap_source="instance/1", probabilities="mean of instance softmax",
                load={"hparams": {"in_dim": DIM}}, notes=notes)
        finally:
            parity_io.HERE = saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=Path, required=True)
    ap.add_argument("--resnet-case", type=Path, default=None,
                    help="also write the ResNet-18 case (~90 MB) into this folder")
    args = ap.parse_args(argv)
    commit = parity_io.require_commit(args.checkout, COMMIT)
    sys.path.insert(0, str(args.checkout))
    _placeholder_torchvision()
    from resnet import SupConResNet

    class LinearSupConResNet(SupConResNet):
        """SupConResNet with its commented-out ``self.encoder = nn.Linear(..., 512)``."""

        def __init__(self, **kw):
            super().__init__(**kw)
            self.encoder = nn.Linear(DIM, 512)

    _case("ins_linear", parity_io.HERE, LinearSupConResNet, False, args.checkout, commit,
          notes="INS with the linear instance encoder that the authors' SupConResNet offers "
                "(commented out) for raw feature vectors; the published default is a "
                "ResNet-18 on the feature viewed as a [3, 32, D/32] image (make_ins.py "
                "--resnet-case, ~90 MB, not committed). Checkpoint: PiCO's save_checkpoint "
                "dict of the DDP model (INS defines save_checkpoint but never calls it); "
                "the training-only parts (encoder_k, queues, prototypes, projection head, "
                "teacher attention head, bag_classifier) are dropped on loading. Its size "
                "(~11 MB) comes from sizes the authors hard-code (512-d encoder output, the "
                "512-1024-1024 teacher head).")
    if args.resnet_case is not None:
        _case("ins_resnet18", args.resnet_case, SupConResNet, True, args.checkout, commit,
              notes="the authors' CIFAR-style ResNet-18 encoder on [3, 32, D/32] views")
    return 0


if __name__ == "__main__":
    sys.exit(main())

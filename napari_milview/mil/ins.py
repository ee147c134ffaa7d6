"""INS (Qu et al., IEEE TCSVT 2024): an instance classifier is all you need.

"Rethinking Multiple Instance Learning for Whole Slide Image Classification: A Good Instance
Classifier is All You Need" (arXiv 2307.02249); official code ``miccaiif/INS``. Training
couples weakly supervised contrastive learning (a MoCo key encoder and queue), prototype
pseudo-labels and the instance classifier; at inference only the instance classifier runs,
and the authors score a bag from its instance predictions (``train_withbag_cam.py``
``test``)::

    h_i = encoder_q.encoder(x_i)               [N, 512]
    p_i = softmax(encoder_q.fc(h_i))           [N, C]   instance class probabilities
    P   = mean_i p_i                            [C]      bag probabilities ("mean" pooling)

The authors also report max pooling of the positive probability (``max_i p_i[1]``; binary
only), available as ``pooling="max"``.

The instance encoder ``encoder_q.encoder`` of the published code is a ResNet-18 over each
feature vector reshaped to an image ``[3, 32, D / 32]`` (the vector viewed as 32 rows and
repeated over 3 channels, ``train_onlybag_feat_by_bagcls.py``): the authors' CIFAR-style
ResNet-18 (``resnet.py``; ``model_feat.py`` builds it) or torchvision's ResNet-18
(``model.py`` builds it with ImageNet weights, ``fc`` replaced by an identity). On raw
feature vectors (their TCGA script) the published ``SupConResNet`` offers, commented out, a
linear layer (``nn.Linear(D, 512)``) or a two-layer MLP as the encoder. All four are
accepted, recognised from the keys.

The training parts of an ``INS`` state_dict (momentum encoder ``encoder_k``, queues,
prototypes, the contrastive projection head ``encoder_q.head``, the attention "teacher"
heads, ``bag_classifier``, ``mlp``) take no part in the authors' inference: they are dropped
on loading, with a note.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._weights import strip_prefixes
from .base import MILModel, MILOutput, _shape, register_model

__all__ = ["INS"]

ENCODERS = ("resnet18", "resnet18_tv", "linear", "mlp")

#: top-level INS attributes used only in training (dropped by ``remap_keys``)
_TRAINING_PREFIXES = ("encoder_k.", "model_teacherHead.", "model_teacherHead2.",
                      "bag_classifier.", "mlp.", "encoder_q.head.")
_TRAINING_KEYS = ("queue", "queue_pseudo", "queue_partial", "queue_ptr", "prototypes",
                  "encoder_q.prototypes")


class _BasicBlock(nn.Module):
    """ResNet basic block; the projection shortcut is named ``shortcut`` (the authors'
    ``resnet.py``) or ``downsample`` (torchvision)."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut_name: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self._sc = shortcut_name
        proj = None
        if stride != 1 or cin != cout:
            proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                 nn.BatchNorm2d(cout))
        setattr(self, shortcut_name, proj)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        proj = getattr(self, self._sc)
        return torch.relu(out + (x if proj is None else proj(x)))


class _ResNet18(nn.Module):
    """ResNet-18 trunk + global average pool: ``[N, 3, H, W] -> [N, 512]``.

    ``stem="cifar"``: the authors' ``resnet.py`` (3x3 stride-1 ``conv1``, no max pool,
    ``shortcut``); ``stem="torchvision"``: 7x7 stride-2 ``conv1`` + 3x3 stride-2 max pool,
    ``downsample``.
    """

    def __init__(self, stem: str) -> None:
        super().__init__()
        tv = stem == "torchvision"
        self.stem = stem
        self.conv1 = (nn.Conv2d(3, 64, 7, 2, 3, bias=False) if tv
                      else nn.Conv2d(3, 64, 3, 1, 1, bias=False))
        self.bn1 = nn.BatchNorm2d(64)
        name = "downsample" if tv else "shortcut"
        cin = 64
        for i, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            setattr(self, f"layer{i}", nn.Sequential(_BasicBlock(cin, cout, stride, name),
                                                     _BasicBlock(cout, cout, 1, name)))
            cin = cout

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        if self.stem == "torchvision":
            x = nn.functional.max_pool2d(x, 3, 2, 1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x.mean(dim=(2, 3))


class _InstanceClassifier(nn.Module):
    """The authors' ``SupConResNet`` at inference: ``encoder`` then ``fc`` (the projection
    ``head`` is training-only)."""

    def __init__(self, encoder: nn.Module, width: int, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(width, n_classes)


@register_model
class INS(MILModel):
    """INS instance classifier; the bag score pools the instance class probabilities.

    Parameters
    ----------
    in_dim : int
        Feature dimension D (a multiple of 32 for the ResNet encoders).
    n_classes : int
        Number of classes C (the authors' ``--num-class``, 2).
    encoder : {"resnet18", "resnet18_tv", "linear", "mlp"}
        Instance encoder (see the module docstring).
    width : int
        Encoder output size (512: ResNet-18's, and the authors' linear / MLP layers).
    pooling : {"mean", "max"}
        Bag score from the instance probabilities: their mean (the authors' bag AUC), or
        the largest positive probability (binary only).

    State dict (the authors' ``INS`` names; encoder "linear", D 1024, C 2)
    ---------------------------------------------------------------------
    ``encoder_q.encoder.weight`` [512, 1024], ``encoder_q.encoder.bias`` [512],
    ``encoder_q.fc.weight`` [2, 512], ``encoder_q.fc.bias`` [2]. ResNet encoders:
    ``encoder_q.encoder.conv1.weight`` [64, 3, 3, 3] (torchvision: [64, 3, 7, 7]),
    ``encoder_q.encoder.bn1.*``, ``encoder_q.encoder.layer{1-4}.{0,1}.{conv,bn}{1,2}.*``
    and ``...layer{2-4}.0.shortcut.{0,1}.*`` (torchvision: ``downsample``). MLP:
    ``encoder_q.encoder.{0,2}.{weight,bias}``.

    Attention sources
    -----------------
    ``"instance/{c}"``: instance-classifier probability of class ``c`` [N] (not an
    attention). Default: ``"instance/1"`` for a binary model (the paper's heatmap: the
    instance classifier's positive probability), else ``"instance/{predicted class}"``.
    The bag probabilities are returned as ``MILOutput.probabilities``; ``logits`` are
    their logarithm.
    """

    arch = "ins"

    def __init__(self, in_dim: int = 512, n_classes: int = 2, encoder: str = "resnet18",
                 width: int = 512, pooling: str = "mean") -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"INS encoder must be one of {ENCODERS}, got {encoder!r}")
        if pooling not in ("mean", "max"):
            raise ValueError(f"INS pooling must be 'mean' or 'max', got {pooling!r}")
        if pooling == "max" and n_classes != 2:
            raise ValueError("INS max pooling scores the positive class: binary models only")
        if encoder.startswith("resnet"):
            if in_dim % 32:
                raise ValueError(f"INS ResNet encoders view a feature as 32 rows: in_dim "
                                 f"{in_dim} is not a multiple of 32")
            width = 512
        self._set_hparams(in_dim=in_dim, n_classes=n_classes, encoder=encoder, width=width,
                          pooling=pooling)
        if encoder == "linear":
            enc: nn.Module = nn.Linear(in_dim, width)
        elif encoder == "mlp":
            enc = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width))
        else:
            enc = _ResNet18("torchvision" if encoder == "resnet18_tv" else "cifar")
        self.encoder_q = _InstanceClassifier(enc, width, n_classes)

    def instance_probabilities(self, x: Tensor) -> Tensor:
        """Instance class probabilities.

        Parameters
        ----------
        x : Tensor, shape [N, D]

        Returns
        -------
        Tensor, shape [N, C]
            ``softmax(encoder_q.fc(encoder_q.encoder(x)))``.
        """
        if self.hparams["encoder"].startswith("resnet"):
            x = x.reshape(x.shape[0], 32, -1).unsqueeze(1).expand(-1, 3, -1, -1)  # [N,3,32,D/32]
        return torch.softmax(self.encoder_q.fc(self.encoder_q.encoder(x)), dim=1)

    def _forward(self, x: Tensor, with_sources: bool) -> MILOutput:
        p = self.instance_probabilities(x)  # [N, C]
        if self.hparams["pooling"] == "mean":
            probs = p.mean(dim=0)
        else:
            top = p[:, 1].max()
            probs = torch.stack([1.0 - top, top])
        logits = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
        sources = {f"instance/{c}": p[:, c] for c in range(self.n_classes)} if with_sources else {}
        default = "instance/1" if self.n_classes == 2 else f"instance/{int(probs.argmax())}"
        return MILOutput(logits=logits, sources=sources, default_source=default,
                         probabilities=probs)

    @classmethod
    def matches_state_dict(cls, sd: Mapping[str, Tensor]) -> bool:
        return ("encoder_q.fc.weight" in sd
                and any(k.startswith("encoder_q.encoder.") for k in sd))

    @classmethod
    def remap_keys(cls, sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Strip wrapper prefixes (the authors train under DistributedDataParallel:
        ``module.``) and drop the training-only parts of the ``INS`` module (listed in the
        module docstring), noting how many keys went."""
        out, notes = strip_prefixes(sd)
        dropped = [k for k in out if k in _TRAINING_KEYS or k.startswith(_TRAINING_PREFIXES)]
        for k in dropped:
            del out[k]
        if dropped:
            parts = sorted({"encoder_q.head" if k.startswith("encoder_q.head.")
                            else k if k.startswith("encoder_q.") else k.split(".")[0]
                            for k in dropped})
            notes.append(f"dropped {len(dropped)} INS training-only key(s) ({', '.join(parts)}): "
                         "not used by the instance classifier")
        return out, notes

    @classmethod
    def hparams_from_state_dict(cls, sd: Mapping[str, Tensor]) -> dict[str, Any]:
        n_classes, width = _shape(sd, "encoder_q.fc.weight", "INS")
        if "encoder_q.encoder.conv1.weight" in sd:
            k = _shape(sd, "encoder_q.encoder.conv1.weight", "INS")[-1]
            tv = any(".downsample." in key for key in sd)
            if (k == 7) != tv:
                raise ValueError(f"inconsistent INS ResNet encoder: conv1 kernel {k} with "
                                 f"{'downsample' if tv else 'shortcut'} shortcuts")
            # the feature dimension leaves no trace in a ResNet's weights
            return {"n_classes": n_classes, "width": width,
                    "encoder": "resnet18_tv" if tv else "resnet18"}
        if "encoder_q.encoder.weight" in sd:
            w, in_dim = _shape(sd, "encoder_q.encoder.weight", "INS")
            encoder = "linear"
        else:
            w, in_dim = _shape(sd, "encoder_q.encoder.0.weight", "INS")
            w2, w1 = _shape(sd, "encoder_q.encoder.2.weight", "INS")
            if (w2, w1) != (w, w):
                raise ValueError(f"inconsistent INS MLP encoder: [{w}, {in_dim}] then "
                                 f"[{w2}, {w1}]")
            encoder = "mlp"
        if w != width:
            raise ValueError(f"inconsistent INS state_dict: encoder output {w}, classifier "
                             f"input {width}")
        return {"in_dim": in_dim, "n_classes": n_classes, "width": width, "encoder": encoder}

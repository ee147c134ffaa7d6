"""Patch encoders: a registry of specs (dim, input size, mean/std, mpp) and their builders.

>>> from napari_milview.features.encoders import build_encoder, preprocess
>>> enc = build_encoder("demo")                        # doctest: +SKIP
>>> feats = enc(preprocess(patches, enc.spec))         # doctest: +SKIP  [B, enc.spec.dim]

Families (one module each; torch and timm are imported only when an encoder is built):

* ``demo`` (:mod:`.demo`): a tiny CNN whose weights ship with the package.
* ``resnet50_trunc`` (:mod:`.resnet`): ResNet-50 cut after ``layer3`` + average pool,
  1024-d (CLAM / TRIDENT), from a local torchvision-format state dict; plain torch.
* ``uni_v1``, ``uni2_h``, ``virchow2``, ``virchow2_cls``, ``hoptimus0``, ``hoptimus1``,
  ``h0_mini``, ``h0_mini_cls_mean`` (:mod:`.timm_vit`): timm ViTs built with
  ``pretrained=False`` and loaded strictly from a local file or Hugging Face snapshot
  folder (optional extra ``napari-milview[timm]``).
* ``torchscript`` (:mod:`.torchscript`): a user's ``torch.jit`` file; its spec comes from
  a JSON sidecar or from arguments. A path to an existing file given as the encoder name
  is treated as a TorchScript file.

Nothing here touches the network: weights always come from local files, read with
safetensors or ``torch.load(weights_only=True)`` (:func:`napari_milview._weights.
read_state_dict`, no unsafe fallback).

Every built encoder is an ``nn.Module`` in eval mode with an attribute ``spec``
(:class:`EncoderSpec`); ``forward(x)`` takes ``[B, 3, S, S]`` float32 normalised images
(``S = spec.input_size``, see :func:`preprocess`) and returns ``[B, spec.dim]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DEMO",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESNET50_TRUNC",
    "EncoderError",
    "EncoderSpec",
    "available_encoders",
    "build_encoder",
    "encoder_spec",
    "normalise_batch",
    "preprocess",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderError(ValueError):
    """An encoder that cannot be built: unknown name, missing or unfitting weights."""


@dataclass(frozen=True)
class EncoderSpec:
    """What a feature extractor needs and produces.

    Attributes
    ----------
    name : str
        Registry name (``available_encoders()``).
    dim : int
        Output feature dimension D.
    input_size : int
        Side S of the square image the network takes.
    mean, std : tuple of 3 floats
        Per-channel normalisation of ``[0, 1]`` RGB.
    mpp : float or None
        Microns per pixel the encoder was trained at (None: any).
    patch_px : int
        Default patch side to cut at ``mpp`` (resized to ``input_size`` when different).
    description : str
        One line for listings.
    family : str
        ``"demo"``, ``"resnet"``, ``"timm"`` or ``"torchscript"``.
    output : str
        Output post-processing, e.g. ``"cls + mean(patch tokens)"`` for Virchow2.
    interpolation : str
        ``torch.nn.functional.interpolate`` mode used by :func:`preprocess` to resize
        (``"bilinear"`` or ``"bicubic"``, antialiased).
    """

    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float | None
    patch_px: int
    description: str = ""
    family: str = ""
    output: str = "pooled features"
    interpolation: str = "bilinear"

    def patch_um(self) -> float | None:
        """Side of a patch in microns (``patch_px * mpp``), None when mpp is None."""
        return None if self.mpp is None else float(self.patch_px) * float(self.mpp)


#: the tiny CNN shipped with the package (``demo.py``; weights in ``napari_milview/assets``)
DEMO = EncoderSpec(
    name="demo", dim=64, input_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
    mpp=1.0, patch_px=64, family="demo", output="global average pool",
    description="tiny demo CNN trained on synthetic slides (lesion vs normal), 64-d",
)

#: CLAM / TRIDENT's ResNet-50 cut after layer3 (``resnet.py``)
RESNET50_TRUNC = EncoderSpec(
    name="resnet50_trunc", dim=1024, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    mpp=0.5, patch_px=256, family="resnet", output="layer3 -> adaptive average pool",
    description="ResNet-50 (ImageNet) truncated after layer3, 1024-d (CLAM / TRIDENT)",
)


def _registry() -> dict[str, EncoderSpec]:
    from .timm_vit import SPECS  # torch-free

    return {DEMO.name: DEMO, RESNET50_TRUNC.name: RESNET50_TRUNC, **SPECS}


#: other spellings -> registry names
ALIASES = {
    "uni": "uni_v1", "uni2": "uni2_h", "uni_v2": "uni2_h", "h_optimus_0": "hoptimus0",
    "h_optimus_1": "hoptimus1", "resnet50": "resnet50_trunc", "milview_demo": "demo",
    "h0mini": "h0_mini", "h0_mini_cls+mean": "h0_mini_cls_mean",
}


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    return ALIASES.get(key, key)


def available_encoders() -> list[str]:
    """Registry names, sorted (``"torchscript"`` included: its spec comes from a file)."""
    return sorted([*_registry(), "torchscript"])


def _is_file_name(name: Any) -> bool:
    return isinstance(name, (str, os.PathLike)) and (
        os.sep in str(name) or str(name).endswith((".pt", ".pth", ".jit", ".torchscript"))
    ) and Path(name).is_file()


def encoder_spec(name: str, *, weights: str | os.PathLike | None = None) -> EncoderSpec:
    """The spec of a registered encoder.

    Parameters
    ----------
    name : str
        A name from :func:`available_encoders` (case and ``-``/``_`` do not matter; a few
        aliases such as ``"uni"`` are accepted), or the path of a TorchScript file.
    weights : str or os.PathLike, optional
        For ``"torchscript"`` only: the file whose sidecar (or a probe) gives the spec.

    Returns
    -------
    EncoderSpec

    Raises
    ------
    EncoderError
        Unknown name, or ``"torchscript"`` without a file.
    """
    if _is_file_name(name):
        name, weights = "torchscript", name
    key = _canonical(name)
    if key == "torchscript":
        if weights is None:
            raise EncoderError("torchscript: the spec comes from the file; pass weights=<file>")
        from . import torchscript

        return torchscript.load(weights, device="cpu").spec
    specs = _registry()
    if key not in specs:
        raise EncoderError(f"unknown encoder {name!r}; available: "
                           f"{', '.join(available_encoders())}")
    return specs[key]


def _device(device: Any) -> torch.device:
    import torch

    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_encoder(name: str, *, weights: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu", **options: Any) -> torch.nn.Module:
    """Build an encoder and load its weights from a local file.

    Parameters
    ----------
    name : str
        A registry name (see :func:`encoder_spec`) or the path of a TorchScript file.
    weights : str or os.PathLike, optional
        ``demo``: defaults to the shipped weights. ``resnet50_trunc``: a torchvision-format
        ResNet-50 state dict (``.pth``/``.bin``/``.safetensors``). timm ViTs: a weights
        file or a local Hugging Face snapshot folder. ``torchscript``: the ``torch.jit``
        file. Required for all but ``demo``.
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``... or ``"auto"`` (CUDA when available).
    **options
        ``torchscript`` only: ``dim``, ``input_size``, ``mean``, ``std``, ``mpp``,
        ``patch_px``, ``name``, ``description`` (override the sidecar).

    Returns
    -------
    torch.nn.Module
        In eval mode on ``device``, with attribute ``spec``; ``forward(x [B, 3, S, S])
        -> [B, spec.dim]``.

    Raises
    ------
    EncoderError
        Unknown name; weights missing, unreadable or not fitting (missing / unexpected
        keys named); timm not installed for a ViT.
    """
    if _is_file_name(name) and weights is None:
        name, weights = "torchscript", name
    key = _canonical(name)
    dev = _device(device)
    if key == "torchscript":
        if weights is None:
            raise EncoderError("torchscript: pass weights=<TorchScript file>")
        from . import torchscript

        return torchscript.load(weights, device=dev, **options)
    if options:
        raise EncoderError(f"{name}: unexpected options {sorted(options)} "
                           "(only the torchscript encoder takes spec options)")
    spec = encoder_spec(key)  # raises for unknown names
    if spec.family == "demo":
        from . import demo

        model = demo.load(weights)
    elif spec.family == "resnet":
        from . import resnet

        model = resnet.load(weights)
    else:
        from . import timm_vit

        model = timm_vit.load(key, weights)
    return model.to(dev).eval()


def preprocess(batch: np.ndarray, spec: EncoderSpec) -> torch.Tensor:
    """uint8 RGB patches -> the normalised float tensor an encoder takes.

    Parameters
    ----------
    batch : np.ndarray, shape [B, H, W, 3], uint8
        RGB patches (also accepted: a single patch [H, W, 3]).
    spec : EncoderSpec
        Gives ``input_size`` S, ``mean``, ``std`` and ``interpolation``.

    Returns
    -------
    torch.Tensor, shape [B, 3, S, S], float32, in ``channels_last`` memory format
        ``(x / 255 - mean) / std``, resized (antialiased) to S x S when H or W differ.
        The pixels keep their interleaved (NHWC) order: no transposing copy, and on the CPU
        a ``channels_last`` convolution runs ~25 % faster than on NCHW input (see
        docs/BENCHMARKS.md, extraction). ``.contiguous()`` gives NCHW where needed.

    Raises
    ------
    ValueError
        Wrong dtype or shape.
    """
    import torch

    arr = np.asarray(batch)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"preprocess: expected uint8 patches [B, H, W, 3], got {arr.dtype} "
                         f"{list(arr.shape)}")
    return normalise_batch(torch.from_numpy(np.ascontiguousarray(arr)), spec)


def normalise_batch(x: torch.Tensor, spec: EncoderSpec) -> torch.Tensor:
    """The encoder's input step, on whatever device ``x`` is on (the pipeline sends uint8
    to the device and runs this there: a quarter of the bytes over PCIe, no float copy
    on the CPU).

    Parameters
    ----------
    x : torch.Tensor, shape [B, H, W, 3], uint8, contiguous
    spec : EncoderSpec

    Returns
    -------
    torch.Tensor, shape [B, 3, S, S], float32, channels_last
        As :func:`preprocess`.
    """
    import torch.nn.functional as F

    s = int(spec.input_size)
    x = x.float()  # [B, H, W, 3], one pass
    if x.shape[1:3] != (s, s) and x.shape[0] > 0:
        x = F.interpolate(x.permute(0, 3, 1, 2).div_(255.0), size=(s, s),
                          mode=spec.interpolation, antialias=True, align_corners=False)
        # back to an NHWC view of the result, in [0, 255] for the step below
        x = x.clamp_(0.0, 1.0).mul_(255.0).permute(0, 2, 3, 1).contiguous()
    _normalise_nhwc(x, spec)
    return x.permute(0, 3, 1, 2)


def _normalise_nhwc(x: torch.Tensor, spec: EncoderSpec) -> None:
    """In place: [B, H, W, 3] float32 contiguous in [0, 255] -> ``(x / 255 - mean) / std``.

    The per-channel scale and shift are tiled along a whole row ([W * 3]), so both passes
    run over contiguous memory with a long inner dimension (a broadcast over the last
    dimension of size 3 is ~4x slower)."""
    import torch

    b, h, w, _ = x.shape
    std = torch.tensor(spec.std, dtype=torch.float64)
    mean = torch.tensor(spec.mean, dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).to(torch.float32).repeat(w).to(x.device)
    shift = (-mean / std).to(torch.float32).repeat(w).to(x.device)
    rows = x.view(b * h, w * 3)
    rows.mul_(scale).add_(shift)


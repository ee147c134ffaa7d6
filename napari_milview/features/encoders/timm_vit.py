"""Pathology ViT foundation models through timm, from local weights only (optional extra).

Each model is built with ``timm.create_model(arch, pretrained=False, **kwargs)`` using the
kwargs of the reference table (``reference/algorithms.md`` section 7) and loaded with
``strict=True`` from a local file (``.safetensors`` / ``.bin`` / ``.pth``) or a local
Hugging Face snapshot folder holding ``model.safetensors`` or ``pytorch_model.bin`` (a
``models--org--name`` cache folder works too: its newest snapshot is used). ``hf-hub:``
names are never resolved and ``HF_HUB_OFFLINE=1`` is set while timm builds the model, so
nothing is downloaded. ``.bin`` / ``.pth`` files are read with ``torch.load(weights_only=
True)``.

=============  ==========================  =====  ==========================================
name           timm architecture           dim    output
=============  ==========================  =====  ==========================================
uni_v1         vit_large_patch16_224       1024   pooled (class token)
uni2_h         vit_giant_patch14_224       1536   pooled (class token)
virchow2       vit_huge_patch14_224        2560   class token ‖ mean of the patch tokens
virchow2_cls   vit_huge_patch14_224        1280   class token only (CTPLab)
hoptimus0/1    vit_giant_patch14_reg4_     1536   class token
               dinov2
h0_mini        vit_base_patch14_reg4_      768    class token
               dinov2
h0_mini_cls_   vit_base_patch14_reg4_      1536   class token ‖ mean of the patch tokens
mean           dinov2                             (registers excluded; the model card's
                                                  recommended embedding)
=============  ==========================  =====  ==========================================

H0-mini (Bioptimus / Owkin, distilled from H-optimus-0; Filiot et al., MICCAI 2025) is a
ViT-B/14 with 4 register tokens and a SwiGLU MLP (timm ``SwiGLUPacked`` + ``SiLU``,
``fc1`` 768 -> 4096 packed, ``fc2`` 2048 -> 768), 224 x 224 input at 0.5 um/px and
H-optimus' normalisation. The weights are gated on Hugging Face (``bioptimus/H0-mini``):
download them once with your account and pass the file or the snapshot folder.

Needs ``pip install napari-milview[timm]`` (timm >= 1.0; timm imports torchvision).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import IMAGENET_MEAN, IMAGENET_STD, EncoderError, EncoderSpec

__all__ = ["ARCHS", "SPECS", "find_weights", "load"]

_HOPT_MEAN = (0.707223, 0.578729, 0.703617)
_HOPT_STD = (0.211883, 0.230117, 0.177517)


def _spec(name: str, dim: int, desc: str, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
          output: str = "class token", interpolation: str = "bilinear") -> EncoderSpec:
    return EncoderSpec(name=name, dim=dim, input_size=224, mean=mean, std=std, mpp=0.5,
                       patch_px=224, description=desc, family="timm", output=output,
                       interpolation=interpolation)


SPECS: dict[str, EncoderSpec] = {s.name: s for s in (
    _spec("uni_v1", 1024, "UNI (MahmoodLab), ViT-L/16"),
    _spec("uni2_h", 1536, "UNI2-h (MahmoodLab), ViT-g/14 with 8 register tokens"),
    _spec("virchow2", 2560, "Virchow2 (Paige), ViT-H/14: class token + mean patch tokens",
          output="class token ‖ mean of patch tokens (registers excluded)",
          interpolation="bicubic"),
    _spec("virchow2_cls", 1280, "Virchow2 (Paige), ViT-H/14: class token only",
          interpolation="bicubic"),
    _spec("hoptimus0", 1536, "H-optimus-0 (Bioptimus), ViT-g/14 with 4 registers",
          mean=_HOPT_MEAN, std=_HOPT_STD),
    _spec("hoptimus1", 1536, "H-optimus-1 (Bioptimus), ViT-g/14 with 4 registers",
          mean=_HOPT_MEAN, std=_HOPT_STD),
    _spec("h0_mini", 768, "H0-mini (Bioptimus), ViT-B/14 with 4 registers: class token",
          mean=_HOPT_MEAN, std=_HOPT_STD),
    _spec("h0_mini_cls_mean", 1536,
          "H0-mini (Bioptimus), ViT-B/14: class token + mean patch tokens",
          mean=_HOPT_MEAN, std=_HOPT_STD,
          output="class token ‖ mean of patch tokens (registers excluded)"),
)}


def _archs() -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (timm architecture, kwargs); needs timm (for SwiGLUPacked)."""
    import torch
    from timm.layers import SwiGLUPacked

    uni2 = dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
                mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, reg_tokens=8,
                dynamic_img_size=True)
    virchow = dict(init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375,
                   global_pool="", dynamic_img_size=True, mlp_layer=SwiGLUPacked,
                   act_layer=torch.nn.SiLU)
    hopt = dict(num_classes=0, img_size=224, global_pool="token", init_values=1e-5,
                dynamic_img_size=True)
    # H0-mini: the model card's timm kwargs (SwiGLUPacked + SiLU) on a ViT-B/14 with 4
    # registers; mlp_ratio 16/3 gives the packed fc1 of 4096 (2 x 2048 hidden, DINOv2's
    # SwiGLU of ratio 4); global_pool "" keeps every token (post-processing picks them)
    h0 = dict(num_classes=0, img_size=224, global_pool="", init_values=1e-5,
              mlp_ratio=5.33334, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU,
              dynamic_img_size=True)
    return {
        "uni_v1": ("vit_large_patch16_224",
                   dict(init_values=1e-5, num_classes=0, dynamic_img_size=True)),
        "uni2_h": ("vit_giant_patch14_224", uni2),
        "virchow2": ("vit_huge_patch14_224", virchow),
        "virchow2_cls": ("vit_huge_patch14_224", virchow),
        "hoptimus0": ("vit_giant_patch14_reg4_dinov2", hopt),
        "hoptimus1": ("vit_giant_patch14_reg4_dinov2", hopt),
        "h0_mini": ("vit_base_patch14_reg4_dinov2", h0),
        "h0_mini_cls_mean": ("vit_base_patch14_reg4_dinov2", h0),
    }


#: timm architecture of each name (the kwargs need timm, see ``_archs``)
ARCHS = {"uni_v1": "vit_large_patch16_224", "uni2_h": "vit_giant_patch14_224",
         "virchow2": "vit_huge_patch14_224", "virchow2_cls": "vit_huge_patch14_224",
         "hoptimus0": "vit_giant_patch14_reg4_dinov2",
         "hoptimus1": "vit_giant_patch14_reg4_dinov2",
         "h0_mini": "vit_base_patch14_reg4_dinov2",
         "h0_mini_cls_mean": "vit_base_patch14_reg4_dinov2"}

#: names whose network returns every token [B, 1 + 4 registers + P, D]: class token only,
#: or class token ‖ mean of the patch tokens (the 4 registers excluded)
_TOKEN_OUTPUTS = {"virchow2": True, "virchow2_cls": False,
                  "h0_mini": False, "h0_mini_cls_mean": True}

#: where the weights of a gated model come from (added to the "needs local weights" error)
_WHERE = dict.fromkeys(
    ("h0_mini", "h0_mini_cls_mean"),
    " (the gated Hugging Face repository bioptimus/H0-mini: request access, then download "
    "model.safetensors, e.g. `huggingface-cli download bioptimus/H0-mini`, and pass the file "
    "or its snapshot folder)")

_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth")


def find_weights(path: str | os.PathLike, name: str) -> Path:
    """The weights file for ``path``: the file itself, or the one in a snapshot folder.

    Parameters
    ----------
    path : str or os.PathLike
        A weights file, a Hugging Face snapshot folder (``model.safetensors`` /
        ``pytorch_model.bin``), or a ``models--org--name`` cache folder (newest snapshot).
    name : str
        Encoder name, for messages.

    Raises
    ------
    EncoderError
        Nothing found (the message lists what was looked for).
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.exists():
        raise EncoderError(f"{name}: weights not found: {p}")
    folders = [p]
    snaps = p / "snapshots"
    if snaps.is_dir():
        folders += sorted((d for d in snaps.iterdir() if d.is_dir()),
                          key=lambda d: d.stat().st_mtime, reverse=True)
    for folder in folders:
        for fname in _FOLDER_FILES:
            if (folder / fname).is_file():
                return folder / fname
    raise EncoderError(f"{name}: no weights in folder {p} (looked for "
                       f"{', '.join(_FOLDER_FILES)} there and in snapshots/*)")


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` for the duration (restored afterwards)."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _post(name: str):
    """Output post-processing of ``name`` (None: the pooled output as it is)."""
    if name not in _TOKEN_OUTPUTS:
        return None
    import torch

    with_mean = _TOKEN_OUTPUTS[name]

    def tokens_out(tokens):  # [B, 1 + 4 registers + P, D] -> [B, 2 D] / [B, D]
        cls = tokens[:, 0]
        if not with_mean:
            return cls
        return torch.cat([cls, tokens[:, 5:].mean(dim=1)], dim=-1)

    return tokens_out


def load(name: str, weights: str | os.PathLike | None):
    """Build a timm ViT with ``pretrained=False`` and load local weights strictly.

    Parameters
    ----------
    name : str
        A key of :data:`SPECS`.
    weights : str or os.PathLike
        Local file or snapshot folder (:func:`find_weights`).

    Returns
    -------
    EncoderModule
        ``forward(x [B, 3, 224, 224]) -> [B, SPECS[name].dim]``.

    Raises
    ------
    EncoderError
        No or missing weights, timm not installed, unreadable file, or a strict-load
        mismatch (missing / unexpected keys named).
    """
    spec = SPECS[name]
    if weights is None:
        raise EncoderError(f"{name} needs local weights: pass weights=<.safetensors/.bin/"
                           ".pth file or a local Hugging Face snapshot folder>; nothing is "
                           f"downloaded{_WHERE.get(name, '')}")
    path = find_weights(weights, name)
    try:
        import timm
    except ImportError as exc:
        raise EncoderError(f"{name}: needs timm, which is not importable ({exc}); "
                           "pip install napari-milview[timm]") from None
    from ._common import EncoderModule, load_strict, read_weights

    arch, kwargs = _archs()[name]
    with _offline():
        net = timm.create_model(arch, pretrained=False, **kwargs)
    sd = read_weights(path, name)
    load_strict(net, sd, name, path)
    return EncoderModule(net, spec, _post(name)).eval()

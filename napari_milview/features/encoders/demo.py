"""The tiny demo encoder: a 4-stage CNN, 64 x 64 patches at 1 um/px -> 64-d.

Its weights ship as package data: ``napari_milview/assets/demo_encoder.safetensors`` (about
250 KB) plus a ``.json`` sidecar with the spec, the widths and the training recipe
(:func:`demo_encoder_path`; the demo ACMIL-GA trained on its features:
:func:`demo_model_path`). Both are made by ``sample_data/train_demo_model.py``: the CNN is
trained on synthetic slides to tell lesion patches from normal ones. It is meant for the
demo and the tests, not for real slides.

Architecture (``widths = (16, 32, 64, 64)``)::

    features = [Conv3x3(3 -> 16, stride 1) BN ReLU,
                Conv3x3(16 -> 32, stride 2) BN ReLU,
                Conv3x3(32 -> 64, stride 2) BN ReLU,
                Conv3x3(64 -> 64, stride 2) BN ReLU]     [B, 64, 8, 8] at 64 x 64
    out = global average pool                            [B, 64]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from napari_milview._weights import WeightsError, read_json_object, sidecar_path
from napari_milview.assets import demo_encoder_path, demo_model_path

from . import DEMO, EncoderError
from ._common import EncoderModule, load_strict, read_weights

__all__ = ["SPEC", "WIDTHS", "DemoEncoder", "demo_encoder_path", "demo_model_path", "load",
           "save"]

SPEC = DEMO
WIDTHS = (16, 32, 64, 64)

#: spec fields the sidecar must agree on with :data:`SPEC`
_CHECKED = ("dim", "input_size", "mean", "std", "mpp", "patch_px")


class DemoEncoder(nn.Module):
    """``forward(x [B, 3, H, W]) -> [B, widths[-1]]`` (H = W = 64 for the demo spec).

    Parameters
    ----------
    widths : sequence of int
        Output channels of the conv stages; the first has stride 1, the others stride 2.
    """

    def __init__(self, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.widths = tuple(int(w) for w in widths)

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] normalised -> [B, widths[-1]]."""
        return self.features(x).mean(dim=(2, 3))


def _read_sidecar(weights: Path) -> dict[str, Any]:
    side = sidecar_path(weights)
    if not side.is_file():
        raise EncoderError(f"demo: sidecar {side} missing (it holds the spec and widths)")
    try:
        data = read_json_object(side)
    except WeightsError as exc:
        raise EncoderError(f"demo: {exc}") from None
    spec = data.get("spec")
    if not isinstance(spec, dict) or not isinstance(data.get("widths"), list):
        raise EncoderError(f"demo: {side}: expected an object with 'spec' and 'widths'")
    for field in _CHECKED:
        want = getattr(SPEC, field)
        got = spec.get(field)
        if isinstance(want, tuple):
            got = tuple(got) if isinstance(got, list) else got
        if got != want:
            raise EncoderError(f"demo: {side}: spec {field}={got!r}, expected {want!r}")
    return data


def load(weights: str | os.PathLike | None = None) -> EncoderModule:
    """Load the demo encoder (the shipped weights by default).

    Parameters
    ----------
    weights : str or os.PathLike, optional
        A ``.safetensors`` written by :func:`save` (with its ``<stem>.json`` sidecar).

    Returns
    -------
    EncoderModule
        ``forward(x [B, 3, 64, 64]) -> [B, 64]``, eval mode, ``spec`` = :data:`SPEC`.

    Raises
    ------
    EncoderError
        Missing weights or sidecar, a sidecar that disagrees with :data:`SPEC`, or a key
        mismatch.
    """
    path = Path(demo_encoder_path() if weights is None else weights)
    sd = read_weights(path, "demo")
    net = DemoEncoder(tuple(_read_sidecar(path)["widths"]))
    load_strict(net, sd, "demo", path)
    return EncoderModule(net, SPEC).eval()


def save(net: DemoEncoder, path: str | os.PathLike, **extra: Any) -> Path:
    """Write ``net`` as safetensors plus the ``<stem>.json`` sidecar (spec, widths, ``extra``).

    Parameters
    ----------
    net : DemoEncoder
    path : str or os.PathLike
        Target ``.safetensors``.
    **extra
        JSON-serialisable fields added to the sidecar (e.g. ``training={...}``).

    Returns
    -------
    pathlib.Path
        The weights path.
    """
    from dataclasses import asdict

    from safetensors.torch import save_file

    if net.widths[-1] != SPEC.dim:
        raise EncoderError(f"demo: widths end in {net.widths[-1]}, the spec says {SPEC.dim}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "encoder": SPEC.name})
    side = {"spec": asdict(SPEC), "widths": list(net.widths), **extra}
    sidecar_path(path).write_text(json.dumps(side, indent=2, sort_keys=True) + "\n",
                                  encoding="utf-8")
    return path


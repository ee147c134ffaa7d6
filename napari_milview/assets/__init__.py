"""Package data: the demo encoder and demo MIL model (made by ``sample_data/train_demo_model.py``).

>>> from napari_milview.assets import demo_model_path
>>> demo_model_path().name
'demo_acmil.safetensors'

Each ``.safetensors`` has a ``.json`` sidecar next to it (the encoder's spec and the
model card, with the training recipe and validation metrics).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS", "demo_encoder_path", "demo_model_path"]

#: the folder holding the shipped files
ASSETS = Path(__file__).resolve().parent


def demo_encoder_path() -> Path:
    """The shipped demo encoder weights (``demo_encoder.safetensors``)."""
    return ASSETS / "demo_encoder.safetensors"


def demo_model_path() -> Path:
    """The shipped demo ACMIL-GA weights (``demo_acmil.safetensors``; card in ``.json``)."""
    return ASSETS / "demo_acmil.safetensors"

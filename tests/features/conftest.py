"""Writers for every feature-file layout, used by the bag tests (real files in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest


def rand_bag(n: int = 12, d: int = 8, seed: int = 0, step: int = 1024):
    """features [n, d] float32 and a grid of level-0 coords [n, 2] (x, y), step apart."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    idx = np.arange(n)
    coords = np.stack([(idx % 4) * step, (idx // 4) * step], axis=1).astype(np.int32)
    return feats, coords


class Writers:
    """Each method writes one layout the way its tool does and returns the path."""

    def __init__(self, root: Path):
        self.root = root

    def clam(self, name="slide_1", feats=None, coords=None, folder="h5_files"):
        """CLAM extract_features_fp: h5_files/{slide}.h5, no attributes."""
        if feats is None:
            feats, coords = rand_bag()
        p = self.root / folder / f"{name}.h5"
        p.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(p, "w") as f:
            f.create_dataset("features", data=feats, maxshape=(None, feats.shape[1]),
                             chunks=(32, feats.shape[1]))
            f.create_dataset("coords", data=coords, maxshape=(None, 2), chunks=(32, 2))
        return p

    def clam_patches(self, name="slide_1", coords=None, patch_size=256, patch_level=1,
                     downsample=(4.0, 4.0), folder="patches", **extra):
        """CLAM create_patches_fp: patches/{slide}.h5, geometry attributes on coords."""
        if coords is None:
            coords = rand_bag()[1]
        p = self.root / folder / f"{name}.h5"
        p.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(p, "w") as f:
            ds = f.create_dataset("coords", data=coords)
            ds.attrs["patch_size"] = patch_size
            ds.attrs["patch_level"] = patch_level
            if downsample is not None:
                ds.attrs["downsample"] = np.asarray(downsample)
            ds.attrs["downsampled_level_dim"] = np.array([1120, 864])
            ds.attrs["level_dim"] = np.array([1120, 864])
            ds.attrs["name"] = name
            ds.attrs["save_path"] = str(p.parent)
            for k, v in extra.items():
                ds.attrs[k] = v
        return p

    def trident(self, name="slide_1", feats=None, coords=None, encoder="conch_v15",
                patch_size_level0=1024, folder="20x_512px_0px_overlap/features_conch_v15"):
        """TRIDENT: features_{enc}/{slide}.h5, attributes on features and coords."""
        if feats is None:
            feats, coords = rand_bag(d=768)
            coords = coords.astype(np.int64)
        p = self.root / folder / f"{name}.h5"
        p.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(p, "w") as f:
            fd = f.create_dataset("features", data=feats)
            fd.attrs["name"] = name
            fd.attrs["savetodir"] = str(p.parent)
            if encoder is not None:
                fd.attrs["encoder"] = encoder
            cd = f.create_dataset("coords", data=coords)
            if patch_size_level0 is not None:
                cd.attrs["patch_size_level0"] = patch_size_level0
            cd.attrs["patch_size"] = 512
            cd.attrs["level0_magnification"] = 40
            cd.attrs["target_magnification"] = 20
            cd.attrs["overlap"] = 0
            cd.attrs["name"] = name
            cd.attrs["savetodir"] = str(p.parent)
            cd.attrs["level0_width"] = 8000
            cd.attrs["level0_height"] = 6000
        return p

    def acmil(self, slides: dict, pretrain="medical_ssl", name=None):
        """ACMIL: one h5, one group per slide with feat (float16), coords, attr label."""
        p = self.root / (name or f"patch_feats_pretrain_{pretrain}.h5")
        with h5py.File(p, "w") as f:
            for sid, (feats, coords, label) in slides.items():
                g = f.create_group(sid)
                g.create_dataset("feat", data=feats.astype(np.float16))
                g.create_dataset("coords", data=coords)
                g.attrs["label"] = label
        return p


@pytest.fixture
def write(tmp_path) -> Writers:
    return Writers(tmp_path)


@pytest.fixture
def bag_arrays():
    return rand_bag

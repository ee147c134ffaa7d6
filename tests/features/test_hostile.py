"""Hostile bags and checkpoints (issue 15), each a real file: one clear one-line error naming
the file (and the row, tensor or zip member), never a hang, a traceback, a silent zero or a
NaN passed off as a prediction.

Bags go through :func:`load_bag`, checkpoints through :func:`load_model`, both also through
``milview attend`` in a child process (a named pipe must not block it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from napari_milview._weights import WeightsError
from napari_milview.features.bag import FEATURE_LIMIT, Bag, BagError
from napari_milview.features.io import load_bag
from napari_milview.features.milview_h5 import save_bag
from napari_milview.mil import ModelCard, build_model
from napari_milview.mil.checkpoint import load_model, save_model
from napari_milview.pipeline import PredictionError, attend

from .conftest import rand_bag

D = 16


def _one_line(exc: BaseException, path: Path) -> str:
    msg = str(exc)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def _within(seconds: float, fn, *args, **kwargs):
    """Call ``fn`` in a thread; fail (instead of hanging the suite) when it blocks."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn.__name__} blocked for {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture
def good_bag(tmp_path) -> Path:
    feats, coords = rand_bag(n=12, d=D)
    return save_bag(Bag.from_arrays(feats, coords, patch_size_level0=256), tmp_path / "ok.h5")


@pytest.fixture
def model_file(tmp_path) -> Path:
    torch.manual_seed(0)
    model = build_model("abmil", in_dim=D, n_classes=2)
    card = ModelCard(arch="abmil", hparams=dict(model.hparams), classes=["a", "b"],
                     feature_dim=D)
    return save_model(model, card, tmp_path / "model.safetensors")


def _pt_weights(tmp_path: Path, name: str = "w.pt", edit=None) -> Path:
    torch.manual_seed(0)
    sd = build_model("abmil", in_dim=D, n_classes=2).state_dict()
    if edit is not None:
        edit(sd)
    path = tmp_path / name
    torch.save(sd, path)
    return path


def _flip_in_member(path: Path, member_suffix: str, n: int = 2) -> str:
    """Flip ``n`` bytes inside a zip member's stored data (zip CRC now wrong)."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    data = bytearray(path.read_bytes())
    off = info.header_offset
    start = off + 30 + int.from_bytes(data[off + 26:off + 28], "little") + \
        int.from_bytes(data[off + 28:off + 30], "little")
    for k in range(n):
        data[start + 3 + 5 * k] ^= 0xFF
    path.write_bytes(bytes(data))
    return info.filename


# ------------------------------------------------------------------------------ features
@pytest.mark.parametrize("value", [3e38, -3e38, np.nan, np.inf, 2 * FEATURE_LIMIT])
def test_overflowing_or_non_finite_row_refuses_the_bag(tmp_path, value):
    """A row of 3e38 is finite float32 but overflows in the model: like a NaN row, it
    refuses the whole bag before inference, naming the file, the row and the value."""
    feats, coords = rand_bag(n=12, d=D)
    feats[5] = value
    path = tmp_path / "bag.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords)
    with pytest.raises(BagError, match=r"1 of 12 patches have damaged features .*first row 5 "
                                       r"holds " + re.escape(f"{float(value):.3g}")) as err:
        load_bag(path, patch_size_level0=256)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_all_rows_overflowing_is_refused(tmp_path):
    feats, coords = rand_bag(n=6, d=D)
    feats[:] = 3e38
    with pytest.raises(BagError, match="6 of 6 patches .*beyond"):
        Bag.from_arrays(feats, coords, source="huge.h5 (test)")


def test_non_finite_model_output_is_never_a_prediction(good_bag):
    """Weights that overflow (finite, 3e38) give logits [inf, -inf] / probabilities NaN:
    attend raises one clear error instead of returning them."""
    bag = load_bag(good_bag)
    torch.manual_seed(0)
    model = build_model("abmil", in_dim=D, n_classes=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3e38)
    card = ModelCard(arch="abmil", hparams=dict(model.hparams), classes=["a", "b"],
                     feature_dim=D)
    with pytest.raises(PredictionError, match="non-finite .*no prediction") as err:
        attend(bag, model, card, device="cpu", model_name="huge.pt")
    assert "\n" not in str(err.value) and str(good_bag) in str(err.value)


def test_bag_edited_after_construction_still_cannot_give_nan(good_bag):
    bag = load_bag(good_bag)
    bag.features[0] = 3e38  # past the constructor's checks
    torch.manual_seed(0)
    model = build_model("abmil", in_dim=D, n_classes=2).eval()
    card = ModelCard(arch="abmil", hparams=dict(model.hparams), classes=["a", "b"],
                     feature_dim=D)
    with pytest.raises(PredictionError):
        attend(bag, model, card, device="cpu")
    with pytest.raises(BagError, match="beyond .*row 0"):
        bag.validate()


# ------------------------------------------------------------------------------ HDF5
def test_virtual_dataset_with_missing_source_is_refused(tmp_path):
    feats, coords = rand_bag(n=12, d=D)
    src = tmp_path / "source.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("features", data=feats)
    layout = h5py.VirtualLayout(shape=feats.shape, dtype="f4")
    layout[:] = h5py.VirtualSource(str(src.name), "features", shape=feats.shape)
    path = tmp_path / "virtual.h5"
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("features", layout, fillvalue=0)
        f.create_dataset("coords", data=coords)
    src.unlink()  # the data is gone: HDF5 would read zeros
    with pytest.raises(BagError, match="virtual dataset .*source.h5 are missing") as err:
        load_bag(path, patch_size_level0=256)
    _one_line(err.value, path)


def test_virtual_dataset_is_refused_even_with_its_source(tmp_path):
    feats, coords = rand_bag(n=12, d=D)
    with h5py.File(tmp_path / "source.h5", "w") as f:
        f.create_dataset("features", data=feats)
    layout = h5py.VirtualLayout(shape=feats.shape, dtype="f4")
    layout[:] = h5py.VirtualSource("source.h5", "features", shape=feats.shape)
    path = tmp_path / "virtual.h5"
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("features", layout)
        f.create_dataset("coords", data=coords)
    with pytest.raises(BagError, match="virtual dataset .*copy the data into the bag"):
        load_bag(path, patch_size_level0=256)


@pytest.mark.parametrize("rows", [2**31, 2**33, 2**36, 2**40])
def test_huge_declared_shape_refused_before_allocating(tmp_path, rows):
    """Declared 2^31..2^40 rows with no data written: refused, no 256 TiB MemoryError."""
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", shape=(rows, 64), dtype="f4", chunks=(1024, 64))
        f.create_dataset("coords", shape=(rows, 2), dtype="i8", chunks=(1024, 2))
    assert path.stat().st_size < 1e6
    with pytest.raises(BagError, match="declares shape .*refused before reading") as err:
        load_bag(path, patch_size_level0=256)
    _one_line(err.value, path)


def test_declared_but_never_written_is_refused(tmp_path):
    path = tmp_path / "empty_data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", shape=(100_000, 64), dtype="f4")  # contiguous, unwritten
        f.create_dataset("coords", shape=(100_000, 2), dtype="i8")
    with pytest.raises(BagError, match="holds no data"):
        load_bag(path, patch_size_level0=256)


def test_chunks_never_written_are_refused(tmp_path):
    feats, coords = rand_bag(n=12, d=D)
    path = tmp_path / "partial.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("features", shape=(12, D), dtype="f4", chunks=(4, D))
        ds[:8] = feats[:8]  # the last chunk never written: it would read as zeros
        f.create_dataset("coords", data=coords)
    with pytest.raises(BagError, match="only 2 of its 3 chunks were written"):
        load_bag(path, patch_size_level0=256)


def test_compressed_bag_still_reads(tmp_path):
    feats, coords = rand_bag(n=300, d=D)
    feats[:] = 0.5  # compresses far below its size, but is all there
    path = tmp_path / "gz.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats, compression="gzip", chunks=(64, D))
        f.create_dataset("coords", data=coords)
    assert load_bag(path, patch_size_level0=256).n == 300


# ------------------------------------------------------------------------------ file types
def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("name", ["x.h5", "x.pt"])
def test_named_pipe_bag_is_refused_unopened(tmp_path, name):
    path = _fifo(tmp_path / name)
    with pytest.raises(BagError, match=r"named pipe \(FIFO\)") as err:
        _within(20, load_bag, path, patch_size_level0=256)
    _one_line(err.value, path)


def test_symlink_loop_and_broken_link_bag(tmp_path):
    loop = tmp_path / "loop.h5"
    loop.symlink_to(loop)
    with pytest.raises(BagError, match="symlink loop"):
        load_bag(loop)
    dangling = tmp_path / "dangling.h5"
    dangling.symlink_to(tmp_path / "gone.h5")
    with pytest.raises(BagError, match="broken symlink"):
        load_bag(dangling)


@pytest.mark.parametrize("kind,match", [
    ("folder", "the sidecar is a folder"),
    ("fifo", r"the sidecar is a named pipe \(FIFO\)"),
    ("loop", "the sidecar is a symlink loop"),
])
@pytest.mark.parametrize("named", [False, True], ids=["beside", "named"])
def test_sidecar_that_is_not_a_regular_file(tmp_path, model_file, kind, match, named):
    """``model.json`` beside the weights (or named with --sidecar) as a folder, a FIFO or a
    link loop: refused by type without opening it (a FIFO would block a reader forever)."""
    side = model_file.with_suffix(".json") if not named else tmp_path / "card.json"
    side.unlink(missing_ok=True)  # save_model wrote a real one beside the weights
    if kind == "folder":
        side.mkdir()
    elif kind == "fifo":
        _fifo(side)
    else:
        side.symlink_to(side)
    with pytest.raises(WeightsError, match=match) as err:
        _within(20, load_model, model_file, sidecar=side if named else None)
    _one_line(err.value, side)


@pytest.mark.parametrize("kind,match", [
    ("folder", "checkpoint is a folder"),
    ("fifo", r"checkpoint is a named pipe \(FIFO\)"),
    ("loop", "checkpoint is a symlink loop"),
])
def test_checkpoint_that_is_not_a_regular_file(tmp_path, kind, match):
    path = tmp_path / "model.pt"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        _fifo(path)
    else:
        path.symlink_to(path)
    with pytest.raises(WeightsError, match=match) as err:
        _within(20, load_model, path)
    _one_line(err.value, path)


def test_missing_checkpoint_still_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(tmp_path / "nothing.pt")


# ------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_all_nan_weights_refused_naming_the_tensor(tmp_path, fmt):
    def nan_all(sd):
        for t in sd.values():
            t.fill_(float("nan"))

    path = _pt_weights(tmp_path, "nan.pt", nan_all)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        sd = torch.load(path, weights_only=True)
        path = tmp_path / "nan.safetensors"
        save_file(sd, str(path))
    with pytest.raises(WeightsError, match=r"tensor '.*' holds \d+ non-finite .*more tensor"
                       ) as err:
        load_model(path)
    _one_line(err.value, path)


def test_one_inf_weight_refused_naming_the_tensor(tmp_path):
    def one_inf(sd):
        sd["classifier.fc.weight"].view(-1)[3] = float("inf")

    path = _pt_weights(tmp_path, "inf.pt", one_inf)
    with pytest.raises(WeightsError, match=r"tensor 'classifier.fc.weight' holds 1 non-finite "
                                           r"value\(s\) .*first: inf"):
        load_model(path)


def test_flipped_storage_bytes_fail_the_zip_crc(tmp_path):
    """torch does not check storage CRCs: two flipped bytes would load as other weights."""
    path = _pt_weights(tmp_path)
    load_model(path)  # sound before
    member = _flip_in_member(path, "data/0")
    with pytest.raises(WeightsError, match="fails its CRC check") as err:
        load_model(path)
    assert repr(member) in _one_line(err.value, path)


def test_flipped_bytes_in_a_pt_bag(tmp_path):
    feats, coords = rand_bag(n=12, d=D)
    path = tmp_path / "bag.pt"
    torch.save({"features": torch.from_numpy(feats), "coords": torch.from_numpy(coords),
                "patch_size_level0": 256}, path)
    assert load_bag(path).n == 12
    _flip_in_member(path, "data/0")
    with pytest.raises(BagError, match="fails its CRC check") as err:
        load_bag(path)
    _one_line(err.value, path)


def test_zip_magic_then_garbage(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"PK\x03\x04" + np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match="not a readable zip archive") as err:
        load_model(path)
    _one_line(err.value, path)
    with pytest.raises(BagError, match="not a readable zip archive"):
        load_bag(path)


# ------------------------------------------------------------------------------ CLI
def _attend(tmp_path: Path, bag: Path, model: str, timeout: float = 120):
    cmd = [sys.executable, "-m", "napari_milview.cli", "attend", str(bag), "--model", model,
           "--patch-size-level0", "256", "--device", "cpu", "--out", str(tmp_path / "r.h5")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_cli_attend_on_hostile_files(tmp_path, good_bag, model_file):
    """Each: exit 2 and one line on stderr naming the file; a FIFO bag does not hang."""
    fifo_bag = _fifo(tmp_path / "x.h5")
    fifo_model = _fifo(tmp_path / "x.pt")
    nan_model = _pt_weights(tmp_path, "nan.pt",
                            lambda sd: sd["classifier.fc.weight"].fill_(float("nan")))
    feats, coords = rand_bag(n=12, d=D)
    feats[4, 1] = 3e38
    huge_bag = tmp_path / "huge.h5"
    with h5py.File(huge_bag, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords)
    cases = [(fifo_bag, str(model_file), "named pipe"),
             (huge_bag, str(model_file), "damaged features"),
             (good_bag, str(fifo_model), "named pipe"),
             (good_bag, str(tmp_path), "is a folder"),
             (good_bag, str(nan_model), "non-finite")]
    for bag, model, match in cases:
        proc = _attend(tmp_path, bag, model)
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(err) == 1, (bag, model, proc.stderr)
        assert match in err[0] and "Traceback" not in proc.stderr, err[0]
    proc = _attend(tmp_path, good_bag, str(model_file))
    assert proc.returncode == 0, proc.stderr
    assert all(np.isfinite(json.loads(proc.stdout.splitlines()[-1])["probabilities"]))


def test_refusal_names_the_row(tmp_path):
    feats, coords = rand_bag(n=8, d=D)
    feats[6, 2] = 3e38
    with pytest.raises(BagError, match="first row 6 holds 3e[+]38"):
        Bag.from_arrays(feats, coords, source="b.h5 (test)")


def test_named_pipe_result_file_is_refused_unopened(tmp_path):
    from napari_milview.result import ResultError, load_result

    path = _fifo(tmp_path / "result.h5")
    with pytest.raises(ResultError, match=r"named pipe \(FIFO\)"):
        _within(20, load_result, path)

"""The extraction / attention pipeline (``pipeline.py``) on real synthetic slides.

Real OpenSlide reads, real torch forwards. The encoder is the shipped demo encoder when it
loads, else a tiny random CNN with an ``EncoderSpec`` (same contract).
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_milview import pipeline
from napari_milview.features.bag import BagError
from napari_milview.features.encoders import EncoderSpec, build_encoder, preprocess
from napari_milview.pipeline import (
    THREAD_PREFIX,
    Cancelled,
    Progress,
    _forward,
    _Pace,
    attend,
    collect,
    extract_bag,
    resolve_device,
    torch_threads,
)
from napari_milview.slide import BadTileWarning, open_slide
from napari_milview.tissue import patch_grid, read_patches, tile_order

PATCH_PX = 64


class TinyEncoder(torch.nn.Module):
    """A small random CNN with the encoder contract ([B, 3, S, S] -> [B, dim])."""

    def __init__(self, dim: int = 16, size: int = PATCH_PX, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, dim, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.spec = EncoderSpec(name="tiny_test", dim=dim, input_size=size,
                                mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), mpp=1.0,
                                patch_px=size)
        self.eval()

    def forward(self, x):
        return self.net(x)


class OOMAbove(TinyEncoder):
    """Raises CUDA's out-of-memory error for batches larger than ``k`` (the retry path)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(len(x))
        if len(x) > self.k:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(x)


def make_encoder():
    """The shipped demo encoder when available, else the tiny random CNN."""
    try:
        return build_encoder("demo")
    except Exception:  # noqa: BLE001 - the demo weights are not shipped yet
        return TinyEncoder()


@pytest.fixture(scope="module")
def slide(svs):
    with open_slide(svs.path) as s:
        yield s


@pytest.fixture(scope="module")
def encoder():
    return make_encoder()


@pytest.fixture(scope="module")
def grid(slide, encoder):
    spec = encoder.spec
    return patch_grid(slide, patch_px=spec.patch_px, patch_um=spec.patch_px * (spec.mpp or 1.0))


def run(gen):
    """Drive ``gen``; return (progress list, bag)."""
    seen: list[Progress] = []
    bag = collect(gen, seen.append)
    return seen, bag


def direct_features(slide, grid, encoder) -> np.ndarray:
    """The same features without the pipeline: read all, preprocess, one forward."""
    x = preprocess(read_patches(slide, grid, np.arange(len(grid.coords))), encoder.spec)
    with torch.inference_mode():
        return encoder(x).numpy()


def test_extract_bag_features_coords_progress(slide, grid, encoder):
    n = len(grid.coords)
    assert n > 20
    seen, bag = run(extract_bag(slide, grid, encoder, batch_size=7, device="cpu", workers=2))
    assert bag.features.shape == (n, encoder.spec.dim)
    assert bag.features.dtype == np.float32
    np.testing.assert_array_equal(bag.coords, grid.coords)  # grid order kept
    assert bag.patch_size_level0 == grid.patch_size_level0
    assert bag.mpp == pytest.approx(grid.mpp)
    assert bag.encoder == encoder.spec.name
    assert bag.slide_id == Path(str(slide.path)).stem
    assert bag.meta["slide"] == str(slide.path) and bag.meta["bad_tiles"] == 0
    # rows line up with the patches: same as reading everything and one forward pass
    np.testing.assert_allclose(bag.features, direct_features(slide, grid, encoder),
                               rtol=1e-4, atol=1e-5)
    # progress: starts at 0, monotone, per batch, ends at the total
    dones = [p.done for p in seen]
    assert dones[0] == 0 and seen[0].features is None and "cpu" in seen[0].message
    assert dones == sorted(dones) and dones[-1] == n
    assert all(p.total == n and p.stage == "extract" for p in seen)
    batches = [p for p in seen if p.features is not None]
    assert [len(p.indices) for p in batches[:-1]] == [7] * (len(batches) - 1)
    # batches follow the tiles; their indices cover every row once and carry its features
    order = np.concatenate([p.indices for p in batches])
    np.testing.assert_array_equal(order, tile_order(slide, grid))
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    np.testing.assert_array_equal(np.concatenate([p.features for p in batches]),
                                  bag.features[order])


class Recorder(TinyEncoder):
    """Records, per forward, the calling thread and its torch thread budget."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def forward(self, x):
        self.calls.append((threading.current_thread().name, torch.get_num_threads()))
        return super().forward(x)


@pytest.mark.parametrize("budget, workers, streams, each", [(2, 2, 2, 1), (4, 2, 2, 2),
                                                             (1, 3, 1, 1), (2, 1, 1, 2)])
def test_cpu_workers_share_the_thread_budget(slide, grid, budget, workers, streams, each):
    """On the CPU the forwards run in the worker threads, never more streams than torch's
    thread budget, each with an equal share of it; the budget is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(budget)
    try:
        enc = Recorder()
        _, bag = run(extract_bag(slide, grid, enc, batch_size=8, device="cpu",
                                 workers=workers))
        assert torch.get_num_threads() == budget
    finally:
        torch.set_num_threads(before)
    names = {name for name, _ in enc.calls}
    assert all(name.startswith(THREAD_PREFIX) for name in names)
    assert len(names) <= streams and {t for _, t in enc.calls} == {each}
    np.testing.assert_allclose(bag.features, direct_features(slide, grid, TinyEncoder()),
                               rtol=1e-4, atol=1e-5)


def _extract_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def test_extraction_leaves_the_viewers_tiles_in_the_cache(svs, grid, encoder):
    """A viewer's cached tiles survive an extraction run through a cache that holds them
    plus the batches' shared edge tiles (2 per batch) and no more: the run's other tiles
    pass the cache by."""
    from napari_milview.slide.cache import TileCache

    viewer = [(0, r, c) for r in range(2) for c in range(4)]  # what a viewer shows
    n_batches = -(-len(grid.coords) // 64)
    with open_slide(svs.path, cache=TileCache((len(viewer) + 2 * n_batches) * 256 * 256 * 3)
                    ) as s:
        lv = s.info.levels[grid.read_level]
        assert len(set(map(tuple, grid.coords // (lv.downsample * 256)))) > 2 * n_batches
        for key in viewer:
            s.tile(*key)
        before = s.cache.misses
        bag = collect(extract_bag(s, grid, encoder, batch_size=64, device="cpu"))
        assert bag.n == len(grid.coords) and s.cache.misses > before  # tiles were decoded
        assert all(s.cache.get((s._key, *key)) is not None for key in viewer)


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_cancel_and_close_leave_no_threads(slide, grid, encoder, how):
    run(extract_bag(slide, grid, encoder, batch_size=8, device="cpu"))  # warm shared pools
    before = set(threading.enumerate())
    threads = torch.get_num_threads()
    stop = threading.Event()
    gen = extract_bag(slide, grid, encoder, batch_size=4, device="cpu", workers=2, cancel=stop)
    next(gen)  # start message
    first = next(gen)
    assert first.done == 4 and _extract_threads()  # the readers are running
    if how == "cancel":
        stop.set()
        with pytest.raises(Cancelled, match="cancelled"):
            next(gen)
    else:
        gen.close()
    assert not _extract_threads()
    assert set(threading.enumerate()) == before
    assert torch.get_num_threads() == threads  # the CPU workers' share given back


def test_cancel_before_start(slide, grid, encoder):
    stop = threading.Event()
    stop.set()
    gen = extract_bag(slide, grid, encoder, cancel=stop, device="cpu")
    next(gen)
    with pytest.raises(Cancelled):
        next(gen)
    assert not _extract_threads()


def test_oom_retry_halves_the_batch(slide, grid, encoder, monkeypatch):
    # no pacing of the CPU's forward calls (whole batches): the out-of-memory error alone
    # decides their size here
    monkeypatch.setattr(pipeline, "SUB_FORWARD_S", 1e9)
    monkeypatch.setattr(pipeline, "SUB_FORWARD_START", 16)
    ref = TinyEncoder()
    _, want = run(extract_bag(slide, grid, ref, batch_size=16, device="cpu"))
    enc = OOMAbove(k=5)
    # one worker: with several CPU workers, a forward already running keeps its batch size
    seen, bag = run(extract_bag(slide, grid, enc, batch_size=16, device="cpu", workers=1))
    np.testing.assert_allclose(bag.features, want.features, rtol=1e-5, atol=1e-6)
    msgs = [p.message for p in seen if p.message]
    assert any("out of memory" in m and "batch size 8" in m for m in msgs)
    assert any("batch size 4" in m for m in msgs)
    failed = [i for i, size in enumerate(enc.sizes) if size > 5]
    assert len(failed) == 2  # 16 then 8, once each: the smaller batch is kept
    assert enc.sizes[failed[-1] + 1:] and max(enc.sizes[failed[-1] + 1:]) <= 4
    assert bag.meta["forward_batch"] == 4
    # even one patch does not fit: the error comes out, not a silent empty bag
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run(extract_bag(slide, grid, OOMAbove(k=0), batch_size=4, device="cpu"))
    assert not _extract_threads()


def test_forward_chunks_directly():
    """uint8 patches in, the input step (normalise_batch) inside the forward, chunks halved
    on out-of-memory: the same features as preprocess + the encoder."""
    enc = OOMAbove(k=3)
    patches = np.random.default_rng(0).integers(0, 256, (10, PATCH_PX, PATCH_PX, 3), np.uint8)
    y, chunk, msgs = _forward(enc, torch.from_numpy(patches), 10, torch.device("cpu"))
    assert y.shape == (10, 16) and chunk == 2 and len(msgs) == 2
    with torch.inference_mode():
        want = TinyEncoder()(preprocess(patches, enc.spec)).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


class Counting(TinyEncoder):
    """Records the rows of every forward call; with ``stop`` it sets that event during its
    first call (a user pressing Cancel while the encoder runs)."""

    def __init__(self, stop: threading.Event | None = None):
        super().__init__()
        self.stop = stop
        self.rows: list[int] = []
        self._lock = threading.Lock()

    def forward(self, x):
        with self._lock:
            self.rows.append(len(x))
        if self.stop is not None:
            self.stop.set()
        return super().forward(x)


@pytest.mark.parametrize("workers", [1, 2])
def test_cancel_reaches_the_encoder_within_a_sub_batch(slide, grid, workers, monkeypatch):
    """Cancel set during the first sub-batch of a 32-patch batch: no worker starts another
    forward call, so the run stops with at most the call each worker had in flight, long
    before the batch is encoded; no reader thread is left."""
    monkeypatch.setattr(pipeline, "SUB_FORWARD_S", 0.0)  # one row per call after the first
    stop = threading.Event()
    enc = Counting(stop)
    before = torch.get_num_threads()
    torch.set_num_threads(workers)  # one forward stream per worker
    try:
        seen: list[Progress] = []
        with pytest.raises(Cancelled, match="cancelled"):
            collect(extract_bag(slide, grid, enc, batch_size=32, device="cpu",
                                workers=workers, cancel=stop), seen.append)
    finally:
        torch.set_num_threads(before)
    assert enc.rows[0] == pipeline.SUB_FORWARD_START < 32
    assert len(enc.rows) <= workers  # the first call, and one more only if it was running
    assert sum(enc.rows) < 32  # not even one batch was encoded
    assert [p.features for p in seen] == [None]  # no batch came out
    assert not _extract_threads()


def test_close_mid_forward_stops_the_workers(slide, grid, monkeypatch):
    """Closing the generator (a widget going away) while a worker is inside a forward call:
    the worker does at most one more sub-batch, and ``close`` returns with no reader left."""
    monkeypatch.setattr(pipeline, "SUB_FORWARD_S", 0.0)
    entered, release = threading.Event(), threading.Event()

    class Blocking(Counting):
        def forward(self, x):
            if sum(self.rows) >= 32 and not entered.is_set():  # batch 2's first call
                entered.set()
                release.wait(30)
            return super().forward(x)

    enc = Blocking()
    gen = extract_bag(slide, grid, enc, batch_size=32, device="cpu", workers=1)
    assert next(gen).done == 0  # the start message
    assert next(gen).done == 32  # batch 1; the worker goes on with batch 2
    assert entered.wait(30)
    closer = threading.Thread(target=gen.close)
    closer.start()
    release.set()
    closer.join(30)
    assert not closer.is_alive()
    assert sum(enc.rows) - 32 <= 2  # batch 2: the call in flight and at most one more
    assert not _extract_threads()


def test_sub_batches_give_the_one_shot_features(slide, grid, monkeypatch):
    """A run split into one-row forward calls gives the features of one forward over all
    patches (within float tolerance)."""
    monkeypatch.setattr(pipeline, "SUB_FORWARD_S", 0.0)
    enc = Counting()
    _, bag = run(extract_bag(slide, grid, enc, batch_size=16, device="cpu", workers=2))
    assert max(enc.rows) <= pipeline.SUB_FORWARD_START < 16  # really split
    assert sum(enc.rows) == len(grid.coords) and enc.rows.count(1) > len(enc.rows) // 2
    np.testing.assert_allclose(bag.features, direct_features(slide, grid, TinyEncoder()),
                               rtol=1e-4, atol=1e-5)


def test_pace_sizes_calls_to_their_cost():
    """Rows per CPU forward call: the start size, then as many as fit the target at the
    measured cost per row (a running estimate), within 1 and the batch."""
    pace = _Pace(target_s=0.2, start=4)
    assert pace.size(32) == 4 and pace.size(3) == 3
    pace.record(4, 0.4)  # 0.1 s a row
    assert pace.size(32) == 2
    pace.record(2, 0.02)  # 0.01 s a row: estimate (0.1 + 0.01) / 2
    assert pace.size(32) == int(0.2 / 0.055)
    for _ in range(10):
        pace.record(3, 0.0)
    assert pace.size(32) == 32  # a cheap encoder: whole batches
    pace.record(1, 5.0)
    assert pace.size(32) == 1  # never below one row


def test_forward_checks_stop_between_chunks():
    """The chunk loop (CUDA's path) stops before its next chunk once ``stop`` says so."""
    enc = Counting()
    patches = np.zeros((10, PATCH_PX, PATCH_PX, 3), np.uint8)
    with pytest.raises(Cancelled):
        _forward(enc, torch.from_numpy(patches), 3, torch.device("cpu"),
                 stop=lambda: bool(enc.rows))
    assert enc.rows == [3]
    y, _, _ = _forward(enc, torch.from_numpy(patches), 3, torch.device("cpu"),
                       stop=lambda: False)
    assert y.shape == (10, 16) and enc.rows[1:] == [3, 3, 3, 1]


def test_empty_grid_is_refused(slide, grid, encoder):
    empty = dataclasses.replace(grid, coords=np.zeros((0, 2), np.int64),
                                tissue_fraction=np.zeros(0, np.float32))
    with pytest.raises(BagError, match="no patches"):
        run(extract_bag(slide, empty, encoder, device="cpu"))


def test_wrong_encoder_output_is_refused(slide, grid):
    enc = TinyEncoder()
    enc.spec = dataclasses.replace(enc.spec, dim=32)  # says 32, gives 16
    with pytest.raises(BagError, match=r"returned shape \[\d+, 16\].*expected \[\d+, 32\]"):
        run(extract_bag(slide, grid, enc, device="cpu"))
    assert not _extract_threads()


def _zero_tile(src, dst, level_page: int, row: int, col: int, tile: int) -> None:
    """Copy ``src`` to ``dst`` with the first 16 bytes of one JPEG tile zeroed."""
    import tifffile

    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tf:
        page = tf.pages[level_page]
        per_row = -(-page.shape[1] // tile)
        off = page.dataoffsets[row * per_row + col]
    data[off:off + 16] = bytes(16)
    dst.write_bytes(bytes(data))


def test_corrupt_tile_still_gives_a_bag(tmp_path):
    from napari_milview.synthetic import write_synthetic_slide

    src = write_synthetic_slide(tmp_path / "ok.svs", width=1536, height=1024, mpp=0.25,
                                tile=128, levels=2, seed=3, lesion=False)
    enc = TinyEncoder()
    with open_slide(src.path) as s:  # 64-px patches at 0.25 um/px: read from level 0
        g = patch_grid(s, patch_px=PATCH_PX, patch_um=PATCH_PX * 0.25)
    assert g.read_level == 0 and len(g.coords) > 10
    x, y = g.coords[len(g.coords) // 2]
    bad = tmp_path / "bad.svs"
    _zero_tile(src.path, bad, 0, int(y) // 128, int(x) // 128, 128)
    with open_slide(bad) as s, warnings.catch_warnings():
        warnings.simplefilter("ignore", BadTileWarning)
        g2 = patch_grid(s, patch_px=PATCH_PX, patch_um=PATCH_PX * 0.25)
        np.testing.assert_array_equal(g2.coords, g.coords)
        seen, bag = run(extract_bag(s, g2, enc, batch_size=16, device="cpu"))
    assert bag.n == len(g.coords)
    assert bag.meta["bad_tiles"] >= 1
    assert any("unreadable tile" in p.message for p in seen)


def test_resolve_device():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


# ------------------------------------------------------------------------------- attend
def _model(dim: int, arch: str = "abmil", classes=("normal", "lesion")):
    from napari_milview.mil import ModelCard, build_model

    torch.manual_seed(0)
    model = build_model(arch, in_dim=dim, n_classes=len(classes))
    card = ModelCard(arch=arch, hparams=dict(model.hparams), classes=list(classes),
                     feature_dim=dim)
    return model, card


def test_attend_matches_the_model(slide, grid, encoder):
    _, bag = run(extract_bag(slide, grid, encoder, device="cpu"))
    model, card = _model(bag.dim, "acmil_ga")
    res = attend(bag, model, card, device="cpu", model_name="ckpt.safetensors")
    with torch.inference_mode():
        out = model.forward_attention(torch.from_numpy(bag.features))
    assert set(res.sources) == set(out.sources) and res.default_source == out.default_source
    for k, v in out.sources.items():
        np.testing.assert_allclose(res.sources[k], v.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.probabilities, torch.softmax(out.logits, -1).numpy(),
                               rtol=1e-5)
    np.testing.assert_array_equal(res.coords, bag.coords)
    assert res.patch_size_level0 == bag.patch_size_level0 and res.mpp == bag.mpp
    assert res.classes == ["normal", "lesion"] and res.model == "ckpt.safetensors"
    assert res.slide == str(slide.path) and res.encoder == bag.encoder
    assert res.summary()["n_instances"] == bag.n and "attend" in res.timings


def test_attend_dsmil_sigmoid_scores_and_positive_classes(slide, grid, encoder):
    _, bag = run(extract_bag(slide, grid, encoder, device="cpu"))
    model, card = _model(bag.dim, "dsmil")
    with torch.inference_mode():
        out = model.forward_attention(torch.from_numpy(bag.features))
    p = torch.sigmoid(out.logits)
    thr = [float(p[0]) - 1e-3, float(p[1]) + 1e-3]  # class 0 positive, class 1 not
    from napari_milview.mil import build_model

    decided = build_model("dsmil", **{**model.hparams, "thresholds": thr})
    decided.load_state_dict(model.state_dict())
    res = attend(bag, decided, card, device="cpu")
    np.testing.assert_allclose(res.probabilities, p.numpy(), rtol=1e-5)
    assert res.meta["positive"] == ["normal"]
    np.testing.assert_allclose(res.meta["thresholds"], thr)
    assert res.default_source == "class/0"
    # the decision is the result's: thresholds, positive classes, not the argmax
    np.testing.assert_allclose(res.thresholds, thr, rtol=1e-6)
    assert res.independent and not res.thresholds_assumed and res.positive == [0]
    assert res.summary()["positive"] == ["normal"]
    plain = attend(bag, model, card, device="cpu")  # no thresholds: 0.5, and it says so
    np.testing.assert_array_equal(plain.thresholds, [0.5, 0.5])
    assert plain.thresholds_assumed and "0.5 assumed" in plain.decision
    softmax = attend(bag, *_model(bag.dim), device="cpu")
    assert "positive" not in softmax.meta and softmax.thresholds is None
    assert not softmax.independent


def test_attend_refuses_wrong_dim_and_unknown_extent(slide, grid, encoder):
    from napari_milview.features.bag import Bag

    rng = np.random.default_rng(0)
    bag = Bag.from_arrays(rng.standard_normal((5, 8)), np.zeros((5, 2)), patch_size_level0=256)
    model, card = _model(12)
    with pytest.raises(BagError, match="8-d.*12-d"):
        attend(bag, model, card, device="cpu")
    no_extent = Bag.from_arrays(rng.standard_normal((5, 12)), np.zeros((5, 2)))
    with pytest.raises(BagError, match="patch extent unknown"):
        attend(no_extent, model, card, device="cpu")


def test_build_encoder_for_refuses_a_dimension_the_model_does_not_take():
    from napari_milview.mil import ModelCard
    from napari_milview.pipeline import build_encoder_for

    dim = build_encoder_for(ModelCard(arch="abmil", feature_dim=None), "demo").spec.dim
    assert build_encoder_for(ModelCard(arch="abmil", feature_dim=dim), "demo").spec.dim == dim
    with pytest.raises(ValueError, match=rf"gives {dim}-d features but the model 'm' expects "
                                         rf"{dim + 1}-d"):
        build_encoder_for(ModelCard(arch="abmil", feature_dim=dim + 1), "demo", model_name="m")


def test_torch_threads_overlapping_runs_restore_the_count():
    """Two runs holding a thread count that end in either order leave torch as it was."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        a, b = torch_threads(1), torch_threads(2)
        a.__enter__()
        assert torch.get_num_threads() == 1
        b.__enter__()
        assert torch.get_num_threads() == 2
        a.__exit__(None, None, None)  # the first ends first: the second still holds
        assert torch.get_num_threads() == 2
        b.__exit__(None, None, None)
        assert torch.get_num_threads() == 3
        with torch_threads(1), torch_threads(2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)

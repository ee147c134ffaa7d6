"""Cohort runs: planning and skipping, failure isolation, resumability, a killed worker.

Real parts throughout: synthetic SVS slides read by OpenSlide, the demo CNN encoder (seeded
random weights written here, so the tests do not depend on the shipped assets), an ACMIL-GA
checkpoint, and dask.distributed LocalClusters of worker processes on 127.0.0.1.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from napari_milview.cohort import (
    OUTPUTS,
    CohortConfig,
    Row,
    fingerprint,
    outputs,
    plan,
    process_slide,
    run_cohort,
)
from napari_milview.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(encoder weights, model checkpoint): the demo CNN and an ACMIL-GA on its 64-d output."""
    import torch

    from napari_milview.features.encoders.demo import DemoEncoder
    from napari_milview.features.encoders.demo import save as save_encoder
    from napari_milview.mil import ModelCard, build_model
    from napari_milview.mil.checkpoint import save_model

    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    enc = save_encoder(DemoEncoder(), d / "encoder.safetensors")
    model = build_model("acmil_ga", in_dim=64, n_classes=2, inner_dim=16, n_token=3, attn_dim=8)
    card = ModelCard(arch="acmil_ga", hparams=dict(model.hparams), classes=["normal", "lesion"],
                     feature_dim=64, encoder="demo")
    return str(enc), str(save_model(model, card, d / "model.safetensors"))


def _config(weights, **kw) -> CohortConfig:
    return CohortConfig(encoder="demo", weights=weights[0], model=weights[1], device="cpu", **kw)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    """Three tiny synthetic slides (1500 x 1200 px at 0.25 um/px)."""
    d = tmp_path_factory.mktemp("slides")
    return [write_synthetic_slide(d / f"s{i}.svs", width=1500, height=1200, mpp=0.25,
                                  levels=2, seed=i).path for i in range(3)]


@pytest.fixture(scope="module")
def corrupt(slides, tmp_path_factory) -> Path:
    """A truncated copy (first half) of a good slide."""
    p = tmp_path_factory.mktemp("bad") / "broken.svs"
    data = slides[0].read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "summary.csv"}


def _summary(out: Path) -> list[dict]:
    with open(out / "summary.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# -------------------------------------------------------------------------- fingerprint
def test_fingerprint_reads_the_ends_and_sees_changes(tmp_path):
    p = tmp_path / "f.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8))
    p.write_bytes(data)
    fp = fingerprint(p)
    assert fp == fingerprint(p) and fp["size"] == len(data)
    st = p.stat()
    for pos in (10, len(data) - 10):  # the first and the last MiB, with the same mtime
        changed = bytearray(data)
        changed[pos] ^= 0xFF
        p.write_bytes(changed)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert fingerprint(p)["sha256"] != fp["sha256"]
    p.write_bytes(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched
    assert fingerprint(p)["sha256"] == fp["sha256"] and fingerprint(p) != fp
    folder = tmp_path / "x.zarr"
    (folder / "0").mkdir(parents=True)
    (folder / "0" / "c").write_bytes(b"abc")
    f1 = fingerprint(folder)
    (folder / "0" / "d").write_bytes(b"d")
    assert fingerprint(folder) != f1 and fingerprint(folder)["size"] == 4
    with pytest.raises(FileNotFoundError, match="nope.svs"):
        fingerprint(tmp_path / "nope.svs")


def test_config_hash(weights, tmp_path):
    a = _config(weights)
    assert a.hash() == _config(weights).hash()
    assert a.hash() == _config(weights, batch_size=7, readers=1).hash()  # speed only
    assert a.hash() != _config(weights, top_k=5).hash()
    assert a.hash() != _config(weights, patch_um=32.0).hash()
    # the model file's content counts, not its name or mtime
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(Path(weights[1]).read_bytes())
    b = CohortConfig(encoder="demo", weights=weights[0], model=str(copy), device="cpu")
    assert b.to_dict()["model"] == str(copy) and b.hash() != a.hash()  # path is a field
    h = b.hash()
    copy.write_bytes(Path(weights[1]).read_bytes()[:-4] + b"\0\0\0\0")
    assert b.hash() != h


# ------------------------------------------------------------------------------ planning
def test_plan_expands_globs_and_csv(slides, tmp_path, weights):
    lst = tmp_path / "list.csv"
    rel = os.path.relpath(slides[1], tmp_path)
    lst.write_text(f"case,slide\na,{rel}\nb,{slides[2]}\nc,\n")
    jobs = plan([str(slides[0].parent / "s*.svs"), lst, slides[0]], tmp_path / "out",
                _config(weights))
    assert [j.slide for j in jobs] == [str(s) for s in slides]  # de-duplicated, in order
    assert [j.slide_id for j in jobs] == ["s0", "s1", "s2"]
    assert all(j.reason == "new" and not j.skip for j in jobs)
    assert (tmp_path / "out").is_dir()
    # same stem in two folders: two distinct output names
    other = tmp_path / "o" / "s0.svs"
    other.parent.mkdir()
    other.write_bytes(slides[0].read_bytes())
    ids = [j.slide_id for j in plan([slides[0], other], tmp_path / "out", _config(weights))]
    assert len(set(ids)) == 2 and all(i.startswith("s0-") for i in ids)
    bad = tmp_path / "bad.csv"
    bad.write_text("path\nx.svs\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*no 'slide' column"):
        plan([bad], tmp_path / "out", _config(weights))
    with pytest.raises(ValueError, match="matches no file"):
        plan([str(tmp_path / "*.ndpi")], tmp_path / "out", _config(weights))


def test_skip_logic(slides, tmp_path, weights):
    """What makes a finished slide run again, and what does not."""
    out = tmp_path / "out"
    cfg = _config(weights)
    slide = tmp_path / "one.svs"
    slide.write_bytes(slides[0].read_bytes())
    (job,) = plan([slide], out, cfg)
    row = process_slide(job)
    assert row.ok, row.message

    def reason(c=cfg):
        (j,) = plan([slide], out, c)
        assert j.skip == (j.reason == "done")
        return j.reason

    assert reason() == "done"
    assert reason(_config(weights, batch_size=3)) == "done"  # speed knobs do not count
    assert reason(_config(weights, top_k=3)) == "configuration changed"
    assert reason(_config(weights, min_tissue=0.5)) == "configuration changed"
    # the slide changes: size and mtime kept, a byte at the end flipped
    st = slide.stat()
    data = bytearray(slide.read_bytes())
    data[-1] ^= 0xFF
    slide.write_bytes(data)
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert reason() == "slide changed"
    data[-1] ^= 0xFF
    slide.write_bytes(data)
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert reason() == "done"
    files = outputs(out, "one")
    # a missing output
    heat = files["heatmap"].read_bytes()
    files["heatmap"].unlink()
    assert reason() == "output missing: one.heatmap.ome.tif"
    files["heatmap"].write_bytes(heat)
    assert reason() == "done"
    # an output that is not what the marker recorded (replaced by a half file)
    res = files["result"].read_bytes()
    files["result"].write_bytes(res[: len(res) // 2])
    assert reason() == "output changed: one.result.h5"
    files["result"].write_bytes(res)
    # a crash mid-run: outputs and a half-written temporary file, no marker -> rerun
    marker = files["done"].read_bytes()
    files["done"].unlink()
    (out / ".one.done.json.12345.dead.tmp").write_bytes(marker[:40])
    (out / ".one.result.h5.12345.beef.tmp").write_bytes(res[:100])
    assert reason() == "not finished"
    files["done"].write_bytes(marker[:40])  # a truncated marker
    assert reason() == "done marker unreadable"
    files["done"].write_bytes(marker)
    assert reason() == "done"


def test_process_slide_outputs(slides, tmp_path, weights):
    from napari_milview.features.io import load_bag
    from napari_milview.overlay.export import layers_from_sidecar, read_sidecar
    from napari_milview.result import load_result

    out = tmp_path / "out"
    (job,) = plan([slides[1]], out, _config(weights, top_k=5))
    row = process_slide(job)
    assert row.ok and row.message == "", row.message
    files = outputs(out, "s1")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files.values())
    result = load_result(files["result"])
    assert row.n_patches == result.n > 5
    assert row.predicted == result.predicted_class
    assert row.probabilities == pytest.approx(dict(zip(result.classes,
                                                       result.probabilities.tolist())),
                                              abs=1e-6)
    assert set(row.seconds) == {"open", "tissue", "extract", "attend", "export", "total"}
    assert result.slide == str(slides[1]) and Path(result.slide).is_absolute()
    bag = load_bag(files["bag"])
    np.testing.assert_array_equal(bag.coords, result.coords)
    assert bag.features.shape == (result.n, 64)
    gj = json.loads(files["geojson"].read_text())
    assert len(gj["features"]) == result.n + 5
    import tifffile

    with tifffile.TiffFile(files["heatmap"]) as tf:
        grid = tf.series[0].levels[0].asarray()
    assert np.isfinite(grid).sum() == result.n
    # the sidecar restores slide, heatmap and top-K, with absolute paths to slide and result
    doc = read_sidecar(files["sidecar"])
    assert doc["slide"] == str(slides[1]) and doc["result"] == str(files["result"])
    assert doc["extra"]["slide"] == str(slides[1])
    assert doc["extra"]["result"] == str(files["result"])
    assert doc["topk"]["k"] == 5
    kinds = [layer_type for _, _, layer_type in layers_from_sidecar(files["sidecar"])]
    assert kinds == ["image", "image", "shapes"]
    marker = json.loads(files["done"].read_text())
    assert marker["fingerprint"] == fingerprint(slides[1])
    assert marker["config_hash"] == job.config_hash
    assert marker["outputs"] == {k: files[k].stat().st_size for k in OUTPUTS}
    assert Row.from_dict(marker["row"]) == row


def test_process_slide_never_raises(tmp_path, corrupt, weights):
    (job,) = plan([corrupt, tmp_path / "missing.svs"], tmp_path / "out",
                  _config(weights))[:1]
    row = process_slide(job)
    assert row.status == "error" and "broken.svs" in row.message and "\n" not in row.message
    jobs = plan([tmp_path / "missing.svs"], tmp_path / "out", _config(weights))
    row = process_slide(jobs[0])
    assert row.status == "error" and "missing.svs" in row.message
    assert not any(p.name.endswith(".done.json") for p in (tmp_path / "out").iterdir())
    bad_model = CohortConfig(encoder="demo", weights=weights[0], model=str(tmp_path / "m.pt"))
    (job,) = plan([corrupt], tmp_path / "out", bad_model)
    row = process_slide(job)
    assert row.status == "error" and "m.pt" in row.message


# ------------------------------------------------------------------- runs on a cluster
@pytest.fixture(scope="module")
def first_run(slides, corrupt, weights, tmp_path_factory):
    """The good slides and the corrupt one on a LocalCluster of 2 worker processes."""
    out = tmp_path_factory.mktemp("cohort")
    seen: list[tuple[str, int, int]] = []
    report = run_cohort([*slides, corrupt], out, _config(weights), workers=2,
                        progress=lambda row, i, n: seen.append((row and row.slide_id, i, n)))
    return report, out, seen


@pytest.mark.slow
def test_corrupt_slide_is_isolated(first_run, slides, corrupt):
    report, out, seen = first_run
    assert (report.total, report.done, report.failed, report.skipped) == (4, 3, 1, 0)
    assert seen[0] == (None, 0, 4)  # before the first slide finishes
    assert [i for _, i, _ in seen] == [0, 1, 2, 3, 4] and {n for *_, n in seen} == {4}
    rows = {r.slide_id: r for r in report.rows}
    bad = rows["broken"]
    assert bad.status == "error" and str(corrupt) in bad.message
    assert "truncated" in bad.message
    assert all(rows[s.stem].ok for s in slides)
    assert len({rows[s.stem].worker for s in slides}) >= 1
    table = _summary(out)
    assert [r["slide"] for r in table] == [*map(str, slides), str(corrupt)]
    assert [r["status"] for r in table] == ["ok", "ok", "ok", "error"]
    assert table[3]["message"] == bad.message
    probs = json.loads(table[0]["probabilities"])
    assert set(probs) == {"normal", "lesion"} and sum(probs.values()) == pytest.approx(1)
    assert table[0]["predicted"] in probs and int(table[0]["n_patches"]) > 5
    assert float(table[0]["seconds_total"]) > 0
    assert not list(out.glob("broken.*"))  # nothing written for the bad slide
    assert report.slides_per_hour > 0 and report.seconds_processing > 0


@pytest.mark.slow
def test_second_run_skips_everything(first_run, slides, weights):
    _, out, _ = first_run
    before = _mtimes(out)
    report = run_cohort(slides, out, _config(weights, batch_size=5), workers=2)
    assert (report.total, report.skipped, report.done, report.failed) == (3, 3, 0, 0)
    assert report.seconds_startup == 0  # no cluster was started
    assert _mtimes(out) == before
    assert all(r.skipped and r.ok for r in report.rows)
    table = _summary(out)  # still complete: skipped rows + the earlier error row
    assert [r["status"] for r in table] == ["error", "ok", "ok", "ok"]
    assert [r["skipped"] for r in table] == ["no", "yes", "yes", "yes"]
    assert all(r["predicted"] for r in table[1:])


@pytest.mark.slow
def test_cli_run(first_run, slides, weights, capsys, tmp_path):
    from napari_milview.cli import main

    _, out, _ = first_run
    args = ["--encoder", "demo", "--weights", weights[0], "--model", weights[1],
            "--device", "cpu", "--out", str(out)]
    assert main(["run", str(slides[0].parent / "*.svs"), *args]) == 0
    cap = capsys.readouterr()
    line = json.loads(cap.out.strip().splitlines()[-1])
    assert line["skipped"] == 3 and line["done"] == 0 and line["failed"] == 0
    assert "skipped" in cap.err and "slides/hour" in cap.err
    assert main(["run", str(tmp_path / "*.svs"), *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "matches no file" in err[0]
    assert main(["run", str(slides[0]), *args, "--workers", "1", "--scheduler",
                 "tcp://127.0.0.1:1"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_worker_task_is_retried(tmp_path, weights):
    """SIGKILL the worker process holding a task: the task reruns elsewhere, all slides ok."""
    import dask
    from distributed import Client, LocalCluster

    slides = [write_synthetic_slide(tmp_path / "in" / f"k{i}.svs", width=2400, height=1800,
                                    mpp=0.25, levels=2, seed=10 + i).path for i in range(2)]
    cfg = _config(weights, patch_um=8.0)  # ~2500 patches: a task takes seconds
    with dask.config.set({"distributed.scheduler.allowed-failures": 3}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address=None) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        box: dict = {}

        def run() -> None:
            try:
                box["report"] = run_cohort(slides, tmp_path / "out", cfg,
                                           scheduler=cluster.scheduler_address)
            except BaseException as e:  # noqa: BLE001 - reported below
                box["error"] = e

        thread = threading.Thread(target=run)
        thread.start()
        killed = None
        deadline = time.monotonic() + 60
        while killed is None and time.monotonic() < deadline and thread.is_alive():
            busy = {w: keys for w, keys in client.processing().items() if keys}
            if busy:
                victim = sorted(busy)[0]
                killed = (pids[victim], list(busy[victim]))
                os.kill(pids[victim], signal.SIGKILL)
            else:
                time.sleep(0.05)
        thread.join(120)
    assert killed is not None, "no task was ever seen running"
    assert not thread.is_alive() and "error" not in box, box.get("error")
    report = box["report"]
    assert (report.done, report.failed) == (2, 0), [r.message for r in report.rows]
    workers = {r.worker.rsplit(":", 1)[1] for r in report.rows}
    assert str(killed[0]) not in workers  # the killed process finished nothing
    assert [r["status"] for r in _summary(tmp_path / "out")] == ["ok", "ok"]


def test_demo_model_note_only_off_synthetic_slides(svs, real_svs, tmp_path):
    """`milview run --model demo` on the real Aperio slide says the demo model was trained on
    synthetic slides (row message and result notes); on a synthetic slide it says nothing."""
    from napari_milview.cohort import CohortConfig, outputs, plan, process_slide
    from napari_milview.pipeline import DEMO_NOTE
    from napari_milview.result import load_result

    jobs = plan([svs.path, real_svs], tmp_path / "out", CohortConfig(model="demo",
                                                                      device="cpu"))
    synthetic, real = (process_slide(job) for job in jobs)
    assert synthetic.ok and real.ok, (synthetic.message, real.message)
    assert DEMO_NOTE not in synthetic.message and DEMO_NOTE in real.message
    result = outputs(tmp_path / "out", real.slide_id)["result"]
    assert DEMO_NOTE in load_result(result).meta["notes"]

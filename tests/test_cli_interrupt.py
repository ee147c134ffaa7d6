"""Ctrl-C during ``milview run``: one line saying so, exit 130, finished slides kept, and a
rerun resumes (a real ``milview run`` in a child process, interrupted as a terminal does:
SIGINT to its whole process group)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from napari_milview.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torch

    from napari_milview.features.encoders.demo import DemoEncoder
    from napari_milview.features.encoders.demo import save as save_encoder
    from napari_milview.mil import ModelCard, build_model
    from napari_milview.mil.checkpoint import save_model

    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    enc = save_encoder(DemoEncoder(), d / "encoder.safetensors")
    model = build_model("abmil", in_dim=64, n_classes=2)
    card = ModelCard(arch="abmil", hparams=dict(model.hparams), classes=["a", "b"],
                     feature_dim=64, encoder="demo")
    return str(enc), str(save_model(model, card, d / "model.safetensors"))


def _done(summary: Path) -> list[str]:
    if not summary.is_file():
        return []
    with open(summary, newline="") as fh:
        return [r["slide"] for r in csv.DictReader(fh) if r.get("status") == "ok"]


def test_ctrl_c_during_run_says_so_and_a_rerun_resumes(tmp_path, weights):
    slides = [write_synthetic_slide(tmp_path / f"s{i}.svs", width=1500, height=1200, mpp=0.25,
                                    levels=2, seed=i).path for i in range(6)]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "napari_milview.cli", "run", *map(str, slides),
           "--encoder", "demo", "--weights", weights[0], "--model", weights[1],
           "--device", "cpu", "--workers", "1", "--out", str(out)]
    # as in a terminal: SIGINT not ignored (a shell's background job, such as a CI step run
    # with `&`, passes SIGINT on as ignored, and Python then never raises KeyboardInterrupt)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not _done(out / "summary.csv") and proc.poll() is None:
        assert time.monotonic() < deadline, "no slide finished in 240 s"
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "KeyboardInterrupt" not in err and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(lines) == 1 and "rerun the same command to resume" in lines[0], err
    kept = _done(out / "summary.csv")
    assert 1 <= len(kept) < 6
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert report["skipped"] >= len(kept) and report["skipped"] + report["done"] == 6
    assert len(_done(out / "summary.csv")) == 6

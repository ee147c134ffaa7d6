"""Helpers shared by the dock widget tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _torch_imported():
    """In-process dock tests find torch imported, so a dock loads its model while it is
    built; the path where a worker imports torch first is tested in a child process
    (``test_failure_paths.test_docks_appear_before_torch_is_imported``)."""
    import torch  # noqa: F401


@pytest.fixture
def check_pause(qtbot):
    """``check(viewer, dock)``: with the dock's *Pause while I pan or zoom* ticked, a moving
    view holds its run between batches (the status says so) and the run goes on once the
    view rests; Cancel acts while it waits; unticked, the run config carries no pause.

    The view's motion is driven through the dock's ``Interaction`` (``until``: moving for
    ever, or at rest), so what is checked is the state, not a timing window; one real camera
    move checks that the camera is what the dock listens to."""
    from napari_milview._qt.navigation import viewer_camera

    def check(viewer, w) -> None:
        assert w.pause_check.isChecked() and w.run_config().pause is w.interaction
        camera = viewer_camera(viewer)
        w.interaction.until = 0.0
        camera.zoom = camera.zoom * 1.01
        assert w.interaction.active()  # the camera's move is seen
        w.interaction.until = float("inf")  # moving until told otherwise
        with qtbot.waitSignal(w.run_finished, timeout=60_000) as blocker:
            job = w.run()
            qtbot.waitUntil(lambda: "paused" in w.status.text().lower(), timeout=30_000)
            held = job.progress[0]
            qtbot.wait(300)  # the worker is blocked in the pause: nothing moves
            assert job.progress[0] == held, "a batch went through while the view moved"
            w.interaction.until = 0.0  # the view rests
            qtbot.waitUntil(lambda: job.progress[0] > held, timeout=30_000)
            w.interaction.until = float("inf")
            qtbot.waitUntil(lambda: "paused" in w.status.text().lower(), timeout=30_000)
            w.cancel()  # while paused
        assert blocker.args == ["cancelled"]
        assert job.progress[0] < job.progress[1]
        w.interaction.until = 0.0
        w.pause_check.setChecked(False)
        assert w.run_config().pause is None

    return check


#: What every child script starts with: a *shown* napari viewer (``viewer``), the app, the
#: notifications shown so far (``MESSAGES``), and helpers to let Qt run (``process``,
#: ``wait_until``), to list the threads a run may leave (``leftover_threads``) and to end
#: (``finish``: closes the viewer, checks no thread is left, prints ``CHILD-EXIT-OK``).
CHILD_PRELUDE = r'''
import faulthandler, json, os, sys, threading, time
faulthandler.enable()
import napari
from qtpy.QtCore import QThreadPool
from qtpy.QtWidgets import QApplication
from napari.utils.notifications import notification_manager

viewer = napari.Viewer(show=True)
viewer.window._qt_window.resize(1280, 900)
app = QApplication.instance()
MESSAGES = []
notification_manager.notification_ready.connect(
    lambda event: MESSAGES.append(str(getattr(event, "message", event))))


def process(ms=100):
    end = time.monotonic() + ms / 1000
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.005)


def wait_until(predicate, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        process(20)


def draw(ms=600):
    cam = viewer.camera
    end = time.monotonic() + ms / 1000
    while time.monotonic() < end:
        cam.center = (cam.center[0], cam.center[1] + 3.0)
        cam.zoom = cam.zoom * 1.01
        process(30)  # pan and zoom: napari draws the layers again and again


def leftover_threads():
    from napari_milview.pipeline import THREAD_PREFIX
    names = [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]
    busy = QThreadPool.globalInstance().activeThreadCount()
    return names + [f"{busy} busy QThreadPool thread(s)"] * (busy > 0)


def report(**kw):
    print("CHILD-REPORT " + json.dumps(kw), flush=True)


def finish():
    process(300)  # let every deferred step and draw run
    wait_until(lambda: not leftover_threads(), 10, "threads to end")
    viewer.close()
    process(100)
    print("CHILD-EXIT-OK", flush=True)
'''


@pytest.fixture
def shown_child(tmp_path):
    """``run(script, timeout=180) -> (stdout, reports)``: run ``script`` after
    :data:`CHILD_PRELUDE` (``viewer``, ``process``, ``wait_until``, ``draw``, ``report``,
    ``leftover_threads``) in a child Python under this display (Xvfb), so that a crash
    (a segfault while napari draws) fails the test instead of killing the suite. Asserts the
    child exited 0 after ``finish()``; ``reports`` are the dicts it passed to ``report``."""
    import json
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    def run(script: str, timeout: float = 180) -> tuple[str, list[dict]]:
        path = tmp_path / "child.py"
        path.write_text(CHILD_PRELUDE + "\n" + textwrap.dedent(script) + "\nfinish()\n")
        # the child imports the tree under test (a worktree, an unpacked sdist), not
        # whichever copy happens to be installed
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "QT_QPA_PLATFORM": "xcb",
               "PYTHONPATH": os.pathsep.join(filter(None, [root,
                                                           os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=str(tmp_path))
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "CHILD-EXIT-OK" in proc.stdout, (
            f"child exited {proc.returncode}:\n{out[-4000:]}")
        reports = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
                   if line.startswith("CHILD-REPORT ")]
        return out, reports

    return run

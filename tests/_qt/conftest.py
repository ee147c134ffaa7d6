"""Helpers shared by the dock widget tests."""

from __future__ import annotations

import time

import pytest


@pytest.fixture
def check_pause(qtbot):
    """``check(viewer, dock)``: with the dock's *Pause while I pan or zoom* ticked, camera
    moves hold its run between batches (the status says so), the run goes on once the view
    rests, Cancel acts while it waits; unticked, the run config carries no pause."""
    from napari_milview._qt.navigation import viewer_camera

    def check(viewer, w) -> None:
        assert w.pause_check.isChecked() and w.run_config().pause is w.interaction
        camera = viewer_camera(viewer)

        def move(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                camera.zoom = camera.zoom * 1.001
                qtbot.wait(30)

        with qtbot.waitSignal(w.run_finished, timeout=60_000) as blocker:
            job = w.run()
            qtbot.waitUntil(lambda: job.progress[0] > 0, timeout=30_000)
            move(0.3)  # the pause starts at the next batch
            held = job.progress[0]
            move(0.8)
            assert job.progress[0] == held, "a batch went through while the view moved"
            assert "paused" in w.status.text().lower()
            qtbot.waitUntil(lambda: job.progress[0] > held, timeout=10_000)  # the view rests
            move(0.3)
            w.cancel()  # while paused
        assert blocker.args == ["cancelled"]
        assert job.progress[0] < job.progress[1]
        w.pause_check.setChecked(False)
        assert w.run_config().pause is None

    return check

"""``milview demo``: napari with a slide, the navigation and MIL docks, and a run of the
demo model; optionally a screenshot of the finished view (the CLI parses the arguments)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def arrange_for_screenshot(mil) -> None:
    """Widen the right-hand docks, scroll the MIL dock to Run / Prediction / Display, and hide
    napari's toasts (e.g. "PyQt5 is deprecated" over the canvas)."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication, QDockWidget, QScrollArea

    window = mil.window()
    docks = [d for d in window.findChildren(QDockWidget) if d.isVisible()]
    right = Qt.DockWidgetArea.RightDockWidgetArea
    for area, width in ((right, 460), (Qt.DockWidgetArea.LeftDockWidgetArea, 280)):
        mine = [d for d in docks if window.dockWidgetArea(d) == area]
        if mine:
            window.resizeDocks(mine, [width] * len(mine), Qt.Orientation.Horizontal)
    scroll = mil.findChild(QScrollArea)
    if scroll is not None:
        scroll.verticalScrollBar().setValue(mil.run_button.parentWidget().y())
    for w in QApplication.allWidgets():
        if type(w).__name__ == "NapariQtNotification" and w.isVisible():
            w.hide()


def run_demo(path: Path, shot: Path | None, timeout: float, t0: float) -> int:
    """Open ``path`` and run the demo model; with ``shot``, wait for the result (at most
    ``timeout`` seconds), write the screenshot, print one JSON line and return the exit
    status; without, hand over to napari's event loop."""
    import napari
    from qtpy.QtCore import QEventLoop, QTimer

    viewer = napari.Viewer(title="napari-milview demo", show=shot is None)
    viewer.open(str(path), plugin="napari-milview")
    viewer.window.add_plugin_dock_widget("napari-milview", "Slide navigation")
    _, mil = viewer.window.add_plugin_dock_widget("napari-milview", "MIL attention")
    if shot is None:
        def start() -> None:
            if mil.run() is None:
                print(f"milview demo: the run did not start: {mil.status.text()}",
                      file=sys.stderr)

        if mil.ready:
            start()
        else:  # torch is being imported off the GUI thread
            mil.became_ready.connect(start)
        napari.run()
        return 0

    viewer.window.show()
    viewer.window.resize(1600, 1000)  # after show(), which restores the saved geometry
    loop = QEventLoop()
    ended: list[str] = []

    def wait(signal, seconds: float) -> bool:
        """Run the event loop until ``signal`` fires or ``seconds`` pass; True if it fired."""
        fired: list = []

        def on(*a):
            fired.append(a)
            loop.quit()

        timer = QTimer()
        timer.setSingleShot(True)
        timer.timeout.connect(loop.quit)
        signal.connect(on)
        timer.start(int(seconds * 1000))
        loop.exec()
        timer.stop()
        signal.disconnect(on)
        return bool(fired)

    mil.run_finished.connect(ended.append)
    if not mil.ready:
        wait(mil.became_ready, 120)  # the run's own timeout starts at Run
    if mil.run() is None:
        status = mil.status.text()
        viewer.close()
        print(f"milview demo: the run did not start: {status}", file=sys.stderr)
        return 1
    if not ended and not wait(mil.run_finished, timeout):
        status = mil.status.text()
        mil.stop_all()
        viewer.close()
        print(f"milview demo: no result after {timeout:g} s (timed out); last status: "
              f"{status}", file=sys.stderr)
        return 1
    if ended[0] != "done":
        status = mil.status.text()
        viewer.close()
        print(f"milview demo: the run {ended[0]}: {status}", file=sys.stderr)
        return 1
    gallery = mil.gallery
    if gallery is not None and gallery._reader.worker is not None:
        wait(gallery.loaded, 30)  # thumbnails (a few dozen level-0 reads)
    viewer.layers.selection.active = mil.heatmap_layer  # its colour bar and controls show
    arrange_for_screenshot(mil)
    for step in range(4):  # let the docks lay out (the canvas resizes), then frame and draw
        if step == 2:
            viewer.reset_view()  # the whole slide: tissue, heatmap and top-K boxes in view
        wait(mil.destroyed, 0.1)
    viewer.screenshot(str(shot), canvas_only=False, flash=False)
    r = mil.result
    viewer.close()
    print(json.dumps({
        "slide": str(path), "screenshot": str(shot), "predicted": r.predicted_class,
        "probabilities": {c: round(float(p), 4) for c, p in zip(r.classes, r.probabilities)},
        "seconds": round(time.perf_counter() - t0, 2)}))
    return 0

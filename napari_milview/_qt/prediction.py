"""The MIL dock's prediction panel and its display helpers (no state of the dock).

:class:`PredictionPanel` shows class probabilities as bars; :func:`fill_edge` pads a heatmap
grid for smooth display; :func:`source_groups` orders the attention-source picker.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QFont
from qtpy.QtWidgets import QGridLayout, QLabel, QProgressBar, QVBoxLayout, QWidget

__all__ = ["PredictionPanel", "fill_edge", "source_groups"]

def fill_edge(grid: np.ndarray) -> np.ndarray:
    """Fill the NaN cells that touch a scored cell with the mean of their scored neighbours.

    For smooth (linear) display: the GPU interpolates between neighbouring cells, and one
    NaN neighbour makes the result NaN (transparent), which would erase a whole ring of
    patches along every tissue edge. With this one-cell margin the scored cells stay fully
    drawn; cells further out stay NaN.

    Parameters
    ----------
    grid : np.ndarray
        [H, W] float32, NaN = no patch.

    Returns
    -------
    np.ndarray
        [H, W] float32, a copy (or ``grid`` itself when nothing needs filling).
    """
    from scipy import ndimage

    ok = np.isfinite(grid)
    if ok.all() or not ok.any():
        return grid
    kernel = np.ones((3, 3))
    total = ndimage.convolve(np.where(ok, grid, 0).astype(np.float64), kernel, mode="constant")
    count = ndimage.convolve(ok.astype(np.float64), kernel, mode="constant")
    out = grid.copy()
    fill = ~ok & (count > 0)
    out[fill] = (total[fill] / count[fill]).astype(np.float32)
    return out


def source_groups(names: list[str], default: str | None = None) -> list[tuple[str, list[str]]]:
    """Attention sources grouped for the picker: (group title, names), default first.

    Groups: softmax attention (``attention``, ``class/*``, ``branch/*``, ``head/*``,
    ``layer*``, ``rollout``), pre-softmax logits (``raw/*``), instance scores
    (``instance/*``). Empty groups are left out.
    """
    groups: dict[str, list[str]] = {"attention": [], "pre-softmax logits": [],
                                    "instance scores": []}
    for n in names:
        key = ("pre-softmax logits" if n.startswith("raw/") else
               "instance scores" if n.startswith("instance/") else "attention")
        groups[key].append(n)
    for members in groups.values():
        if default in members:
            members.remove(default)
            members.insert(0, default)
    return [(k, v) for k, v in groups.items() if v]


class PredictionPanel(QWidget):
    """Class probabilities as bars (predicted class bold), bag size, timings and device."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.grid = QGridLayout()
        self.grid.setColumnStretch(1, 1)
        self.grid.setHorizontalSpacing(6)
        self.grid.setVerticalSpacing(2)
        self.headline = QLabel("No prediction yet.")
        self.headline.setWordWrap(True)
        self.info = QLabel("")
        self.info.setWordWrap(True)
        self.info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.headline)
        layout.addLayout(self.grid)
        layout.addWidget(self.info)
        self.bars: list[QProgressBar] = []
        self.names: list[QLabel] = []
        self.values: list[QLabel] = []

    def clear(self, text: str = "No prediction yet.") -> None:
        while self.grid.count():
            item = self.grid.takeAt(0)
            if item.widget() is not None:
                item.widget().hide()
                item.widget().setParent(None)
        self.bars, self.names, self.values = [], [], []
        self.headline.setText(text)
        self.info.setText("")

    def set_result(self, result, partial: bool = False, ended: str = "") -> None:
        """Show ``result``'s probabilities [C], predicted class, N, timings and device.

        ``partial``: the model on the patches encoded so far; with ``ended`` (why the run
        stopped) the bars are greyed out and the headline says there is no prediction."""
        probs = np.asarray(result.probabilities, dtype=float)
        if len(self.bars) != len(probs):
            self.clear()
            for i in range(len(probs)):
                name, bar, value = QLabel(), QProgressBar(), QLabel()
                bar.setRange(0, 1000)
                bar.setTextVisible(False)
                bar.setMaximumHeight(12)
                value.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                value.setMinimumWidth(44)
                self.grid.addWidget(name, i, 0)
                self.grid.addWidget(bar, i, 1)
                self.grid.addWidget(value, i, 2)
                self.names.append(name)
                self.bars.append(bar)
                self.values.append(value)
        best = int(np.argmax(probs))
        for i, p in enumerate(probs):
            cls = result.classes[i] if i < len(result.classes) else str(i)
            font = QFont(self.names[i].font())
            font.setBold(i == best)
            self.names[i].setFont(font)
            self.values[i].setFont(font)
            self.names[i].setText(cls)
            self.bars[i].setValue(int(round(1000 * float(p))))
            self.values[i].setText(f"{float(p):.3f}")
        for bar in self.bars:
            bar.setEnabled(not ended)
        if partial and ended:
            self.headline.setText(f"<b>No prediction</b>: the run was {ended}. The heatmap "
                                  "shows the attention on the patches encoded until then.")
        elif partial:
            n_done = result.meta.get("n_done", result.n)
            self.headline.setText(f"<i>So far ({n_done} of {result.n} patches): "
                                  f"{result.predicted_class}</i>")
        else:
            self.headline.setText(f"Predicted: <b>{result.predicted_class}</b> "
                                  f"({float(probs[best]):.1%})")
        parts = [f"N = {result.n} patches"]
        order = {"extract": 0, "attend": 1}
        timings = sorted(result.timings.items(), key=lambda kv: order.get(kv[0], 2))
        parts += [f"{k} {v:.2f} s" for k, v in timings]
        parts.append(f"device {result.device}")
        if result.meta.get("nystrom") is not None:
            parts.append(f"Nystr\u00f6m {result.meta['nystrom']}")
        notes = result.meta.get("notes") or []
        self.info.setText(" \u00b7 ".join(parts) + "".join(f"<br>\u26a0 {n}" for n in notes))

"""The MIL dock's prediction panel and its display helpers (no state of the dock).

:class:`PredictionPanel` shows class probabilities as bars (a distribution: the argmax is the
prediction) or independent per-class scores with each class's threshold decision (DSMIL);
:func:`fill_edge` pads a heatmap grid for smooth display; :func:`source_groups` orders the
attention-source picker.
"""

from __future__ import annotations

import html

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


#: the caption above independent per-class scores
INDEPENDENT_NOTE = ("Independent per-class scores (each 0\u20131, not a distribution: they "
                    "need not sum to 1); a class is positive when its score reaches its "
                    "threshold.")


class PredictionPanel(QWidget):
    """Class probabilities as bars (predicted class bold), bag size, timings and device.

    Independent per-class scores (:attr:`Result.independent`, e.g. DSMIL's sigmoids) are
    captioned as such, each value shows its threshold (``0.830 \u2265 0.41``), the positive
    classes are bold and the headline is the threshold decision (:attr:`Result.decision`)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.grid = QGridLayout()
        self.grid.setColumnStretch(1, 1)
        self.grid.setHorizontalSpacing(6)
        self.grid.setVerticalSpacing(2)
        self.headline = QLabel("No prediction yet.")
        self.headline.setWordWrap(True)
        self.scale = QLabel("")  # says how to read the bars when they are not a softmax
        self.scale.setWordWrap(True)
        self.scale.setHidden(True)
        self.info = QLabel("")
        self.info.setWordWrap(True)
        self.info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.headline)
        layout.addWidget(self.scale)
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
        self.scale.setText("")
        self.scale.setHidden(True)
        self.info.setText("")

    def set_result(self, result, partial: bool = False, ended: str = "") -> None:
        """Show ``result``'s probabilities [C], predicted class, N, timings and device.

        Independent per-class scores: the thresholds, the positive classes and the decision.
        ``partial``: the model on the patches encoded so far; with ``ended`` (why the run
        stopped) the bars are greyed out and the headline says there is no prediction."""
        probs = np.asarray(result.probabilities, dtype=float)
        thr = result.decision_thresholds  # None: one distribution over exclusive classes
        bold = set(result.positive)
        if len(self.bars) != len(probs):
            self.clear()
            for i in range(len(probs)):
                name, bar, value = QLabel(), QProgressBar(), QLabel()
                bar.setRange(0, 1000)
                bar.setTextVisible(False)
                bar.setMaximumHeight(12)
                value.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                value.setMinimumWidth(44 if thr is None else 80)
                self.grid.addWidget(name, i, 0)
                self.grid.addWidget(bar, i, 1)
                self.grid.addWidget(value, i, 2)
                self.names.append(name)
                self.bars.append(bar)
                self.values.append(value)
        for i, p in enumerate(probs):
            cls = result.classes[i] if i < len(result.classes) else str(i)
            font = QFont(self.names[i].font())
            font.setBold(i in bold)
            self.names[i].setFont(font)
            self.values[i].setFont(font)
            self.names[i].setText(cls)
            self.bars[i].setValue(int(round(1000 * min(max(float(p), 0.0), 1.0))))
            if thr is None:
                self.values[i].setText(f"{float(p):.3f}")
                self.bars[i].setToolTip(f"p({cls}) = {float(p):.4f}")
            else:
                op = "\u2265" if i in bold else "<"
                self.values[i].setText(f"{float(p):.3f} {op} {float(thr[i]):.2f}")
                self.bars[i].setToolTip(f"score of {cls}: {float(p):.4f}; threshold "
                                        f"{float(thr[i]):.4f}"
                                        + (" (assumed)" if result.assumed_thresholds else ""))
        for bar in self.bars:
            bar.setEnabled(not ended)
        self.scale.setText(INDEPENDENT_NOTE if thr is not None else "")
        self.scale.setHidden(thr is None)
        if partial and ended:
            self.headline.setText(f"<b>No prediction</b>: the run was {ended}. The heatmap "
                                  "shows the attention on the patches encoded until then.")
        elif partial:
            n_done = result.meta.get("n_done", result.n)
            self.headline.setText(f"<i>So far ({n_done} of {result.n} patches): "
                                  f"{result.predicted_class}</i>")
        elif thr is not None:
            main, _, rest = result.decision.partition("; ")
            self.headline.setText(f"Decision: <b>{html.escape(main)}</b>"
                                  + (f"<br><i>{html.escape(rest)}</i>" if rest else ""))
        else:
            best = int(np.argmax(probs))
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

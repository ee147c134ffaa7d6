"""The staining dock's robustness results: one row per condition (predicted class, class
probabilities, top-K Jaccard with the reference) and the min-max range row, sized to fit the
dock without horizontal scrolling."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QHeaderView, QTableWidget, QTableWidgetItem, QWidget

__all__ = ["RobustnessTable"]


class RobustnessTable(QTableWidget):
    """Rows filled as the conditions finish (:meth:`start`, :meth:`fill`), then the report
    (:meth:`show_report`)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(0, 0, parent)
        self.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.verticalHeader().setVisible(False)
        self.horizontalHeader().setTextElideMode(Qt.TextElideMode.ElideRight)
        self.horizontalHeader().setMinimumSectionSize(24)
        self.setMinimumHeight(150)

    def start(self, conditions: list[str], classes: list[str], top_k: int) -> None:
        """Empty rows named for ``conditions`` under the run's headers."""
        self._heads(classes, top_k)
        self.setRowCount(len(conditions))
        for r, name in enumerate(conditions):
            self.setItem(r, 0, QTableWidgetItem(name))
        self._fit_columns()

    def fill(self, name: str, result) -> None:
        """The row of condition ``name`` once its ``result`` is in (Jaccard comes last)."""
        rows = [self.item(r, 0).text() if self.item(r, 0) else "" for r in range(self.rowCount())]
        r = rows.index(name) if name in rows else self.rowCount()
        self._set_row(r, [name, result.predicted_class,
                          *(f"{float(p):.4f}" for p in result.probabilities), "\u2026"])

    def show_report(self, report) -> None:
        """Every condition's row and the min-max range row of a finished ``report``."""
        rows = report.rows()
        self.setRowCount(0)
        self._heads(report.classes, report.top_k)
        for r, row in enumerate(rows):
            self._set_row(r, [row["condition"], row["predicted_class"],
                              *(f"{p:.4f}" for p in row["probabilities"]),
                              f"{row['jaccard']:.3f}"])
        self._set_row(len(rows), ["min-max range", "",
                                  *(f"{v:.4f}" for v in report.prob_range), ""])
        self._fit_columns(filled=True)

    def _heads(self, classes, top_k: int) -> None:
        heads = ["condition", "predicted", *(f"p({c})" for c in (list(classes) or
                                                                   ["class 0", "class 1"])),
                 f"Jaccard top-{top_k}"]
        self.clear()
        self.setColumnCount(len(heads))
        self.setHorizontalHeaderLabels(heads)

    def _fit_columns(self, filled: bool = False) -> None:
        """Fit the table to the dock: the condition column takes what is left, the others
        the width of their values (of a probability until ``filled``); long headers are
        elided and shown in full as tooltips."""
        head = self.horizontalHeader()
        head.setStretchLastSection(False)
        head.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        head.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        least = self.fontMetrics().horizontalAdvance("0.0000") + 12
        for c in range(self.columnCount()):
            item = self.horizontalHeaderItem(c)
            if item is not None:
                item.setToolTip(item.text())
            if c:
                hint = self.sizeHintForColumn(c)
                self.setColumnWidth(c, hint if filled else max(least, hint))

    def _set_row(self, r: int, values: list[str]) -> None:
        if r >= self.rowCount():
            self.setRowCount(r + 1)
        for c, text in enumerate(values):
            item = QTableWidgetItem(text)
            if c >= 2:
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.setItem(r, c, item)

"""The controls both docks are built from: a path field, the model picker, the encoder box and
the run box. Each part owns its widgets and says what changed through a Qt signal; the docks
lay them out and act on the signals.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QWidget,
)

from ._common import one_line, spin

__all__ = ["EncoderBox", "ModelPicker", "RunBox", "path_field", "pick_file"]

#: File dialog filters.
CHECKPOINTS = "Checkpoints (*.safetensors *.pt *.pth *.ckpt *.bin);;All files (*)"
WEIGHTS = "Weights (*.safetensors *.pt *.pth *.bin *.jit *.torchscript);;All files (*)"

#: The Nystrom variant box of a TransMIL model: (shown text, ``load_model(nystrom=...)``).
NYSTROM_ITEMS = (("0.0.9 (official TransMIL)", "0.0.9"),
                 ("current (\u2265 0.0.10, e.g. ACMIL)", "current"))
NYSTROM_TIP = (
    "Which nystrom-attention release TransMIL's attention reproduces. Both pad the tokens at "
    "the front to a multiple of the landmarks; 0.0.9 (pinned by the official TransMIL "
    "repository) then keeps the first n output rows, 0.0.10 and later (\u2018current\u2019, "
    "e.g. ACMIL's copy) the last n. The same weights give other probabilities (a few "
    "hundredths) and heatmaps: pick the release the model was trained with. Default: the "
    "model card's, else the checkpoint's layout (official Lightning .ckpt \u2192 0.0.9).")


def pick_file(parent: QWidget, title: str, filters: str) -> str:
    """A file chosen in an open dialog ('' when cancelled)."""
    path, _ = QFileDialog.getOpenFileName(parent, title, "", filters)
    return path


def path_field(edit: QLineEdit, pick: Callable[[], None]) -> QWidget:
    """``edit`` with a "..." button that calls ``pick``, as one widget."""
    w = QWidget()
    row = QHBoxLayout(w)
    row.setContentsMargins(0, 0, 0, 0)
    button = QPushButton("\u2026")
    button.setMaximumWidth(28)
    button.clicked.connect(pick)
    row.addWidget(edit, 1)
    row.addWidget(button)
    return w


class ModelPicker(QWidget):
    """The bundled demo model or a checkpoint file, loaded safely
    (``mil.checkpoint.load_model``) as soon as it is chosen, with its card shown.

    ``model`` is ``(model, card, name)`` or None; ``changed`` fires after every (re)load,
    with that tuple or None. :meth:`choose` loads the current choice (call it once torch is
    imported: ``JobDock._after_torch``).

    A TransMIL-family model (``card.nystrom`` set) shows a *Nystrom* box with the
    variant the loader chose; picking the other one reloads the model with that explicit
    choice (a new file starts from its own default again).
    """

    changed = Signal(object)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.model = None
        self.demo_radio = QRadioButton("Demo")
        self.demo_radio.setToolTip("The tiny ACMIL shipped with the package (for the demo "
                                   "encoder and synthetic slides)")
        self.file_radio = QRadioButton("File")
        self._group = QButtonGroup(self)
        self._group.addButton(self.demo_radio)
        self._group.addButton(self.file_radio)
        self.demo_radio.setChecked(True)
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText(".safetensors / .pt checkpoint")
        self.info = QLabel("Loading torch\u2026")
        self.info.setWordWrap(True)
        self.info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.nystrom_combo = QComboBox()
        for text, value in NYSTROM_ITEMS:
            self.nystrom_combo.addItem(text, value)
        self.nystrom_combo.setToolTip(NYSTROM_TIP)
        self.nystrom_row = QWidget()
        nrow = QHBoxLayout(self.nystrom_row)
        nrow.setContentsMargins(0, 0, 0, 0)
        nlabel = QLabel("Nystr\u00f6m")
        nlabel.setToolTip(NYSTROM_TIP)
        nrow.addWidget(nlabel)
        nrow.addWidget(self.nystrom_combo, 1)
        self.nystrom_row.setVisible(False)
        self._loaded: tuple[Path, str] | None = None
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.demo_radio)
        row.addWidget(self.file_radio)
        row.addWidget(path_field(self.model_edit, self.pick), 1)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow(row)
        form.addRow(self.nystrom_row)
        form.addRow(self.info)
        self._ready = False

    def start(self) -> None:
        """torch is imported: load the current choice now and follow later changes."""
        self._ready = True
        self.demo_radio.toggled.connect(self.choose)
        self.model_edit.editingFinished.connect(self.choose)
        self.nystrom_combo.activated.connect(self._nystrom_picked)
        self.choose()

    def _nystrom_picked(self, *_) -> None:
        """The user picked a Nystrom variant: reload the same file with it."""
        value = self.nystrom_combo.currentData()
        card = self.model[1] if self.model is not None else None
        if self._loaded is None or card is None or card.nystrom == value:
            return
        self.load(*self._loaded, nystrom=value)

    def pick(self) -> None:
        path = pick_file(self, "MIL checkpoint", CHECKPOINTS)
        if path:
            self.model_edit.setText(path)
            self.file_radio.setChecked(True)
            self.choose()

    def chosen(self) -> tuple[Path, str] | str:
        """(path, name) of the model the radio buttons pick, or a one-line reason."""
        if self.demo_radio.isChecked():
            from ..assets import demo_model_path

            path = demo_model_path()
            if not path.is_file():
                return f"demo model not installed ({path.name} missing)"
            return path, "demo"
        text = self.model_edit.text().strip()
        if not text:
            return "choose a checkpoint file"
        path = Path(text).expanduser()
        return path, str(path)

    def choose(self, *_) -> None:
        """Load the chosen model, so what was inferred is shown before running."""
        if not self._ready:
            return
        chosen = self.chosen()
        if isinstance(chosen, str):
            self._set(None, chosen)
            return
        self.load(*chosen)

    def load(self, path, name: str | None = None, nystrom: str | None = None) -> bool:
        """Load a checkpoint (safely) and show its card; False (and a message) on failure.

        ``nystrom``: TransMIL's nystrom-attention variant, ``"0.0.9"`` or ``"current"``
        (None: the card's, else what the checkpoint shows)."""
        from napari.utils.notifications import show_error

        from ..mil.checkpoint import load_model

        try:
            model, card = load_model(path, device="cpu", nystrom=nystrom)
        except Exception as e:  # noqa: BLE001 - shown as one line
            self._loaded = None
            self.nystrom_row.setVisible(False)
            self._set(None, f"not loaded: {one_line(e)}")
            show_error(f"Model: {one_line(e)}")
            return False
        self._loaded = (Path(path), name or str(path))
        self._show_nystrom(card)
        classes = ", ".join(card.classes) if card.classes else "?"
        parts = [f"<b>{card.arch}</b>", f"classes: {classes}",
                 f"{card.feature_dim}-d features" if card.feature_dim else "feature dim ?"]
        if card.patch_size_um:
            parts.append(f"patch {card.patch_size_um:g} \u00b5m")
        if card.encoder:
            parts.append(f"encoder {card.encoder}")
        if card.nystrom is not None:
            parts.append(f"Nystr\u00f6m {card.nystrom}")
        self._set((model, card, name or str(path)), " \u00b7 ".join(parts))
        return True

    def _show_nystrom(self, card) -> None:
        """Show the variant box for a TransMIL-family card (with why), hide it otherwise."""
        shown = card.nystrom is not None
        self.nystrom_row.setVisible(shown)
        if not shown:
            return
        i = self.nystrom_combo.findData(card.nystrom)
        self.nystrom_combo.blockSignals(True)
        self.nystrom_combo.setCurrentIndex(max(i, 0))
        self.nystrom_combo.blockSignals(False)
        why = [n for n in card.notes.split("; ") if n.startswith("nystrom ")]
        self.nystrom_combo.setToolTip(NYSTROM_TIP + (f"\n\nThis model: {why[-1]}" if why else ""))

    def _set(self, model, text: str) -> None:
        self.model = model
        self.info.setText(text)
        self.changed.emit(model)


class EncoderBox(QWidget):
    """Encoder, its weights file, the patch side in microns and what that means.

    :meth:`follow` takes a model card's encoder and patch size.
    """

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        from ..features.encoders import available_encoders

        self.encoder_combo = QComboBox()
        self.encoder_combo.addItems(available_encoders())
        self.encoder_combo.setToolTip("Patch encoder (its weights come from a local file; "
                                      "the demo's ship with the package)")
        self.weights_edit = QLineEdit()
        self.weights_edit.setPlaceholderText("weights file (the demo's are built in)")
        self.patch_um = spin(1.0, 4096.0, 64.0, decimals=1, step=8.0, suffix=" \u00b5m")
        self.patch_um.setToolTip("Patch side in microns (the encoder's by default)")
        self.patch_label = QLabel("")
        self.form = QFormLayout(self)
        self.form.setContentsMargins(0, 0, 0, 0)
        self.form.addRow("Encoder", self.encoder_combo)
        self.form.addRow("Weights", path_field(self.weights_edit, self.pick_weights))
        self.form.addRow("Patch", self.patch_um)
        self.form.addRow(self.patch_label)
        self.encoder_combo.currentTextChanged.connect(self._on_encoder)
        self.patch_um.valueChanged.connect(self._update_label)
        self._spec = None
        if self.encoder_combo.findText("demo") >= 0:
            self.encoder_combo.setCurrentText("demo")
        self._on_encoder(self.encoder_combo.currentText())

    def pick_weights(self) -> None:
        path = pick_file(self, "Encoder weights", WEIGHTS)
        if path:
            self.weights_edit.setText(path)

    def follow(self, card) -> None:
        """Use what the model was trained with: its encoder and patch size, when known."""
        if card.encoder and self.encoder_combo.findText(card.encoder) >= 0:
            self.encoder_combo.setCurrentText(card.encoder)
        if card.patch_size_um:
            self.patch_um.setValue(float(card.patch_size_um))

    @property
    def encoder(self) -> str:
        return self.encoder_combo.currentText()

    @property
    def weights(self) -> str | None:
        return self.weights_edit.text().strip() or None

    def _on_encoder(self, name: str) -> None:
        from ..features.encoders import EncoderError, encoder_spec

        try:
            spec = encoder_spec(name) if name != "torchscript" else None
        except EncoderError:
            spec = None
        self._spec = spec
        if spec is not None and spec.patch_um() is not None:
            self.patch_um.setValue(spec.patch_um())
        self._update_label()

    def _update_label(self, *_) -> None:
        spec = self._spec
        if spec is None:
            self.patch_label.setText("input size and mpp from the file's sidecar")
            return
        per_px = self.patch_um.value() / spec.patch_px
        self.patch_label.setText(f"{spec.dim}-d \u00b7 {spec.patch_px} px at {per_px:.3g} "
                                 f"\u00b5m/px ({10 / per_px:.3g}x)")


class RunBox(QWidget):
    """Device (CUDA devices offered where present), batch size, *Pause while I pan or zoom*,
    Run / Cancel and the status line."""

    def __init__(self, run_label: str, pause: QCheckBox, parent: QWidget | None = None):
        super().__init__(parent)
        self.device_combo = QComboBox()
        self.device_combo.setToolTip("auto: CUDA when available, else the CPU")
        self.device_combo.addItems(["auto", "cpu"])
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 4096)
        self.batch_spin.setValue(32)
        self.batch_spin.setToolTip("Patches read and encoded together")
        self.run_button = QPushButton(run_label)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.status = QLabel("Idle.")
        self.status.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.form = QFormLayout(self)
        self.form.setContentsMargins(0, 0, 0, 0)
        self.form.addRow("Device", self.device_combo)  # one per row: a dock's width is scarce
        self.form.addRow("Batch", self.batch_spin)
        self.form.addRow(pause)
        self.form.addRow(buttons)
        self.form.addRow(self.status)

    def fill_devices(self) -> None:
        """Add the CUDA devices torch sees (call once torch is imported)."""
        import torch

        if torch.cuda.is_available():
            self.device_combo.addItems([f"cuda:{i}" for i in range(torch.cuda.device_count())])

    @property
    def device(self) -> str:
        return self.device_combo.currentText() or "auto"


def scrolled(dock: QWidget, content: QWidget, min_width: int) -> None:
    """Make ``content`` the dock's only child, inside a frameless scroll area (a dock may be
    shorter than its controls), and give the dock ``min_width`` pixels at least."""
    from qtpy.QtWidgets import QScrollArea, QVBoxLayout

    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setWidget(content)
    scroll.setFrameShape(QScrollArea.Shape.NoFrame)
    outer = QVBoxLayout(dock)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(scroll)
    dock.setMinimumWidth(min_width)


def pick_data(combo: QComboBox, value, what: str) -> None:
    """Select the item of ``combo`` whose data is ``value``; KeyError naming ``what``."""
    i = combo.findData(value)
    if i < 0:
        raise KeyError(f"no {what} {value!r}")
    combo.setCurrentIndex(i)


def export_and_say(label: str, write: Callable[[], object], path) -> None:
    """Run ``write()``; say in a notification that ``label`` went to ``path``, or why not."""
    from napari.utils.notifications import show_error, show_info

    try:
        out = write()
    except Exception as e:  # noqa: BLE001 - shown as one line
        show_error(f"Export {label}: {one_line(e)}")
        return
    n = f"{len(out)} files in " if isinstance(out, list) else ""
    show_info(f"Exported {label}: {n}{path}")


class combo_data:  # noqa: N801 - used like ``property``
    """A read-only property: the data of the current item of the combo box stored in the
    attribute ``combo`` (``source = combo_data("source_combo", "The source shown.")``)."""

    def __init__(self, combo: str, doc: str):
        self.combo = combo
        self.__doc__ = doc

    def __get__(self, obj, cls=None):
        return self if obj is None else getattr(obj, self.combo).currentData()

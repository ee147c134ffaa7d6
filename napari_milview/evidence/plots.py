"""ROC / PR and deletion / insertion curves as PNG bytes (matplotlib, Agg canvas only).

The figures are drawn on a ``FigureCanvasAgg`` directly: pyplot and its global backend are
never touched, so this is safe in a Qt application (the dock shows the bytes as pixmaps) and
headless (the CLI writes them to files).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

__all__ = ["class_name", "curves_png", "roc_pr_png"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _fmt(v: Any) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def roc_pr_png(localisation: dict[str, Any], title: str = "", *, width: float = 8.0,
               height: float = 3.6) -> bytes:
    """ROC (left) and precision-recall (right) curves of one source.

    Parameters
    ----------
    localisation : dict
        :func:`~napari_milview.evidence.metrics.localisation`'s dict (``roc``, ``pr``,
        ``auroc``, ``average_precision``, ``n_positive``, ``n``).
    title : str

    Returns
    -------
    bytes
        A PNG image.
    """
    fig = _figure(width, height)
    ax1, ax2 = fig.subplots(1, 2)
    roc, pr = localisation["roc"], localisation["pr"]
    ax1.plot(roc["fpr"], roc["tpr"], color="C0", lw=1.8,
             label=f"AUROC {_fmt(localisation['auroc'])}")
    ax1.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="chance")
    ax1.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1),
            ylim=(0, 1.02), title="ROC (patches)")
    ax1.legend(loc="lower right", fontsize=8)
    ax2.step(pr["recall"], pr["precision"], where="post", color="C1", lw=1.8,
             label=f"AP {_fmt(localisation['average_precision'])}")
    n, n_pos = localisation.get("n", 0), localisation.get("n_positive", 0)
    if n:
        ax2.axhline(n_pos / n, color="0.6", lw=1, ls="--", label=f"prevalence {n_pos / n:.3f}")
    ax2.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
            title="precision-recall")
    ax2.legend(loc="lower left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _png(fig)


def class_name(index: int, classes: Any = None) -> str:
    """``classes[index]`` when there is one, else ``"class <index>"``."""
    i = int(index)
    if classes is not None and 0 <= i < len(classes) and str(classes[i]):
        return str(classes[i])
    return f"class {i}"


def curves_png(faithfulness: dict[str, Any], title: str = "", *, classes: Any = None,
               width: float = 8.0, height: float = 3.6) -> bytes:
    """Deletion (left) and insertion (right) curves of one ranking against the random mean
    (+- one standard deviation).

    Parameters
    ----------
    faithfulness : dict
        :func:`~napari_milview.evidence.faithfulness.deletion_insertion`'s dict.
    title : str
    classes : list[str], optional
        The result's class names: the y axis reads ``p(<classes[target]>)`` (default
        ``p(class <target>)``).

    Returns
    -------
    bytes
        A PNG image.
    """
    fig = _figure(width, height)
    axes = fig.subplots(1, 2)
    f = faithfulness["fractions"]
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        ax.plot(f, faithfulness[kind], color="C3" if kind == "deletion" else "C2", lw=1.8,
                label=f"by score, area {_fmt(faithfulness[f'{kind}_auc'])}")
        rm, rs = faithfulness[f"random_{kind}"], faithfulness.get(f"random_{kind}_std")
        if np.all(np.isfinite(rm)):
            ax.plot(f, rm, color="0.4", lw=1.2, ls="--",
                    label=f"random ({faithfulness['random_orders']}), area "
                          f"{_fmt(faithfulness[f'random_{kind}_auc'])}")
            if rs is not None and np.all(np.isfinite(rs)):
                ax.fill_between(f, rm - rs, rm + rs, color="0.6", alpha=0.25, lw=0)
        what = "removed" if kind == "deletion" else "kept"
        ax.set(xlabel=f"fraction of patches {what}",
               ylabel=f"p({class_name(faithfulness['target'], classes)})", xlim=(0, 1),
               ylim=(-0.02, 1.02), title=kind)
        ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _png(fig)

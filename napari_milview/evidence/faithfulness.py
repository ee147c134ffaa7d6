"""Does the prediction follow the heatmap? Deletion / insertion curves and "what if" runs.

Deletion and insertion (Petsiuk et al., RISE, BMVC 2018) for MIL: the aggregator is re-run on
the cached features of a bag with instances removed (deletion) or added (insertion) in
decreasing score order, and the predicted-class probability is tracked. For a MIL model
"removing a patch" is leaving its feature row out of the bag: no pixel changes. A faithful
map gives a low area under the deletion curve and a high one under the insertion curve; both
are compared with the mean of seeded random orders (xMIL, Hense et al., NeurIPS 2024: attention
is not necessarily faithful to the prediction; these curves measure it per slide).

Two ways to score the subsets, with the same numbers (the tests check it to 1e-5):

* ``"forward"``: any :class:`~napari_milview.mil.base.MILModel`, one ``model.forward`` per
  subset (``forward_attention(...).probs`` for a model that scores otherwise than by softmax);
* ``"pooled"``: models whose slide representation is a softmax-attention pooling of
  per-instance embeddings followed by a linear head (ABMIL, ACMIL-GA, CLAM-SB, CLAM-MB, in
  eval mode). The embeddings ``h`` [N, E] and attention logits ``e`` [K, N] are computed
  once (one full forward, the floor of any method) and, the head being linear, projected
  through it per instance: ``v_i = W h_i`` [C]. The logits of a subset S are then
  ``sum_{i in S} exp(e_i) v_i / sum_{i in S} exp(e_i) + b`` per branch, assembled from
  per-segment sums (one segment per curve step, each with its own max for stability)
  combined in float64. Cost per order: O(N K C) after the one forward.

The bag never becomes empty: deletion at fraction 1 keeps the lowest-scored patch and
insertion at fraction 0 starts from the highest-scored one.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .metrics import DEFAULT_TOPK

__all__ = ["deletion_insertion", "descending", "pooling_parts", "subset_probabilities",
           "what_if", "what_if_regions"]


def descending(scores: Any) -> np.ndarray:
    """[N] int64: patch indices by decreasing score (ties in bag order)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    return np.argsort(-s, kind="stable").astype(np.int64)


def _prepare(model: Any, features: Any):
    import torch

    x = features if isinstance(features, torch.Tensor) else torch.as_tensor(
        np.asarray(features))
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be [N, D] with N > 0, got {tuple(x.shape)}")
    ref = next(model.parameters(), None)
    if ref is not None:
        x = x.to(device=ref.device, dtype=ref.dtype)
    elif not x.is_floating_point():
        x = x.float()
    model.eval()
    return x


def _prob_fn(model: Any, x: Any):
    """A function ``idx -> probabilities [C]`` (float64 numpy) of the bag ``x[idx]``, and the
    full bag's probabilities."""
    import torch

    with torch.inference_mode():
        full = model.forward_attention(x)
    own = full.probabilities is not None

    def probs(idx: np.ndarray | None) -> np.ndarray:
        sub = x if idx is None else x[torch.as_tensor(idx, device=x.device)]
        with torch.inference_mode():
            if own:
                p = model.forward_attention(sub).probs
            else:
                p = torch.softmax(model.forward(sub).float(), dim=-1)
        return p.double().reshape(-1).cpu().numpy()

    return probs, full.probs.double().reshape(-1).cpu().numpy()


def pooling_parts(model: Any, x: Any):
    """``(v [N, Q], logits [K, N], head)`` for the pooled path, or None for other models.

    The slide logits of these models are linear in each branch's softmax-attention average
    of the instance embeddings ``h`` [N, E], so the linear head is applied to every instance
    once (``v = h W^T``, Q = C columns) and a sub-bag only averages ``v``:
    ``head(u [B, K, Q]) -> slide logits [B, C]`` where ``u[:, k]`` is branch k's
    softmax-attention average of ``v``. Only the exact classes (not subclasses), in eval mode
    (dropout is then the identity).
    """
    import torch

    from ..mil.abmil import ABMIL
    from ..mil.acmil import ACMIL_GA
    from ..mil.clam import CLAM_MB, CLAM_SB

    kind = type(model)
    if model.training or kind not in (ABMIL, ACMIL_GA, CLAM_SB, CLAM_MB):
        return None
    with torch.inference_mode():
        if kind in (ABMIL, ACMIL_GA):
            h = model.dimreduction(x)
            raw = model.attention(h)  # [K, N]
            fc = model.classifier.fc if kind is ABMIL else model.Slide_classifier.fc
            w, b = fc.weight, fc.bias
        else:
            net = model.attention_net
            h = net[2](net[1](net[0](x)))
            raw = net[3](h).transpose(0, 1)
            if kind is CLAM_SB:
                w, b = model.classifiers.weight, model.classifiers.bias
            else:
                w = torch.cat([c.weight for c in model.classifiers], dim=0)  # [C, E]
                b = torch.cat([c.bias for c in model.classifiers], dim=0)
        v = h @ w.T  # [N, C]
    w, b = w.detach(), b.detach()
    if kind in (ABMIL, CLAM_SB):
        def head(u):
            return u[:, 0] + b
    elif kind is ACMIL_GA:
        def head(u):
            return u.mean(dim=1) + b
    else:  # CLAM-MB: class c's logit from class c's branch
        def head(u):
            return torch.diagonal(u, dim1=1, dim2=2) + b
    return v, raw, head


class _Pooled:
    """Subset probabilities of a pooling model from per-segment sums (see the module doc)."""

    def __init__(self, parts):
        self.h, self.raw, self.head = parts

    def segments(self, order: np.ndarray, bounds: np.ndarray):
        """Per segment [bounds[j], bounds[j+1]) of ``order``: (max [S, K], sum exp(e - max)
        v [S, K, Q], sum exp(e - max) [S, K]), float64 numpy; no Python loop over segments
        (scatter/index_add in float64 on [K, N, Q], Q = C columns)."""
        import torch

        dev = self.h.device
        n = len(order)
        k = self.raw.shape[0]
        seg = torch.empty(n, dtype=torch.int64, device=dev)  # segment of each instance
        seg[torch.as_tensor(order, device=dev)] = torch.as_tensor(
            np.searchsorted(bounds, np.arange(n), side="right") - 1, device=dev)
        n_seg = len(bounds) - 1
        with torch.inference_mode():
            raw = self.raw.double()
            m = torch.full((k, n_seg), -torch.inf, dtype=raw.dtype, device=dev).scatter_reduce(
                1, seg.expand(k, -1), raw, "amax")
            w = torch.exp(raw - m[:, seg])  # [K, N]
            z = torch.zeros_like(m).index_add_(1, seg, w)
            v = self.h.double()
            sv = torch.zeros((k, n_seg, v.shape[1]), dtype=v.dtype, device=dev).index_add_(
                1, seg, w[:, :, None] * v[None])
        return (m.T.cpu().numpy(), sv.transpose(0, 1).cpu().numpy(), z.T.cpu().numpy())

    @staticmethod
    def _combine(m: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Pooled [K, Q] of the union of segments (rows of m [n, K], s [n, K, Q], z [n, K])."""
        top = m.max(axis=0)  # [K]
        f = np.exp(m - top)  # [n, K]
        return (f[:, :, None] * s).sum(axis=0) / (f * z).sum(axis=0)[:, None]

    def probabilities(self, order: np.ndarray, prefixes: list[int], suffixes: list[int]
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities [len, C] of the bags ``order[:p]`` for p in ``prefixes`` and
        ``order[t:]`` for t in ``suffixes`` (every p, t in 1..N-1 or p = N, t = 0)."""
        import torch

        n = len(order)
        bounds = np.unique(np.r_[0, n, prefixes, suffixes]).astype(np.int64)
        m, s, z = self.segments(order, bounds)
        where = {int(b): j for j, b in enumerate(bounds)}
        pooled = [self._combine(m[:where[p]], s[:where[p]], z[:where[p]]) for p in prefixes]
        pooled += [self._combine(m[where[t]:], s[where[t]:], z[where[t]:]) for t in suffixes]
        zt = torch.as_tensor(np.stack(pooled), dtype=self.h.dtype, device=self.h.device)
        with torch.inference_mode():
            p = torch.softmax(self.head(zt).double(), dim=-1).cpu().numpy()
        return p[:len(prefixes)], p[len(prefixes):]


def subset_probabilities(model: Any, features: Any, order: Any, prefixes: list[int],
                         suffixes: list[int], *, path: str = "auto"
                         ) -> tuple[np.ndarray, np.ndarray, str]:
    """Probabilities of the sub-bags ``order[:p]`` (p in ``prefixes``) and ``order[t:]``
    (t in ``suffixes``): arrays [len(prefixes), C], [len(suffixes), C] and the path used
    (``"pooled"`` or ``"forward"``; ``path="auto"`` picks pooled where it applies)."""
    x = _prepare(model, features)
    o = np.asarray(order, dtype=np.int64).reshape(-1)
    n = x.shape[0]
    if any(not 1 <= p <= n for p in prefixes) or any(not 0 <= t <= n - 1 for t in suffixes):
        raise ValueError("every sub-bag must keep at least one patch")
    parts = pooling_parts(model, x) if path in ("auto", "pooled") else None
    if path == "pooled" and parts is None:
        raise ValueError(f"{type(model).__name__} has no pooled path; use path='forward'")
    if parts is not None:
        a, b = _Pooled(parts).probabilities(o, list(prefixes), list(suffixes))
        return a, b, "pooled"
    probs, _ = _prob_fn(model, x)
    a = np.stack([probs(o[:p]) for p in prefixes])
    b = np.stack([probs(o[t:]) for t in suffixes])
    return a, b, "forward"


def stopper(cancel: Any, what: str = "faithfulness"):
    """``cancel`` (None, an object with ``is_set()`` such as a ``threading.Event``, or a
    callable returning True to stop) as a function raising
    :class:`~napari_milview.pipeline.Cancelled` ("<what> cancelled") once it says stop."""
    if cancel is None:
        return lambda: None
    is_set = cancel.is_set if hasattr(cancel, "is_set") else cancel
    if not callable(is_set):
        raise TypeError(f"cancel must have is_set() or be callable, got {type(cancel).__name__}")

    def check() -> None:
        if is_set():
            from ..pipeline import Cancelled

            raise Cancelled(f"{what} cancelled")

    return check


def deletion_insertion(model: Any, features: Any, order: Any, *, target: int | None = None,
                       steps: int = 50, random_orders: int = 5, seed: int = 0,
                       k: int | None = None, path: str = "auto", cancel: Any = None,
                       progress: Any = None) -> dict[str, Any]:
    """Deletion and insertion curves of one ranking, and of seeded random rankings.

    Parameters
    ----------
    model : MILModel
        Put in eval mode.
    features : Tensor or array [N, D]
        The bag the ranking refers to (bag order).
    order : array [N] int
        Patch indices by decreasing score (:func:`descending`).
    target : int, optional
        Class whose probability is tracked (default: the full bag's predicted class).
    steps : int
        Curve points at fractions ``n_j / N`` with ``n_j = round(j N / steps)``, j = 0..steps.
    random_orders : int
        Number of random permutations (``numpy.random.default_rng(seed)``) averaged as the
        baseline (>= 5 recommended; 0: none, the random curves are NaN).
    k : int, optional
        Size of the top-K sub-bag of ``topk_probability`` (default
        :data:`~napari_milview.evidence.metrics.DEFAULT_TOPK`, capped at N).
    path : "auto", "pooled" or "forward"
        How sub-bags are scored (module doc); the numbers are the same.
    cancel : threading.Event or callable, optional
        Checked before each sub-bag evaluation (``"forward"``: one model call; ``"pooled"``:
        one ordering, all its sub-bags at once): once ``cancel.is_set()`` (or ``cancel()``)
        is true, :class:`~napari_milview.pipeline.Cancelled` is raised.
    progress : callable, optional
        ``progress(done, total)`` after each sub-bag evaluation, in sub-bags: ``total`` =
        ``(random_orders + 1) * 2 (steps + 1) + 1`` (each ordering's deletion and insertion
        points, and the top-K sub-bag); ``done`` reaches ``total`` at the end.

    Returns
    -------
    dict
        ``fractions`` [S + 1]; ``deletion``, ``insertion`` [S + 1] (probability of ``target``
        after removing / keeping the first ``n_j`` patches of ``order``; at least one patch
        always stays); ``random_deletion``, ``random_insertion`` [S + 1] (mean over the random
        orders) and their ``*_std``; ``deletion_auc``, ``insertion_auc``,
        ``random_deletion_auc``, ``random_insertion_auc`` (trapezoid over the fractions, in
        [0, 1]); ``target``, ``baseline`` (the full bag's probability of ``target``),
        ``topk_probability`` (the top-K patches alone), ``k``, ``path``, ``seconds``.

    Raises
    ------
    napari_milview.pipeline.Cancelled
        ``cancel`` was set; nothing is returned.
    """
    t0 = time.perf_counter()
    check = stopper(cancel)
    check()
    x = _prepare(model, features)
    n = int(x.shape[0])
    o = np.asarray(order, dtype=np.int64).reshape(-1)
    if o.shape[0] != n or not np.array_equal(np.sort(o), np.arange(n)):
        raise ValueError(f"order must be a permutation of the {n} patches")
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if int(random_orders) < 0:
        raise ValueError(f"random_orders must be >= 0, got {random_orders}")
    counts = np.rint(np.arange(steps + 1) * n / steps).astype(np.int64)
    ins_len = np.maximum(counts, 1).tolist()  # insertion keeps order[:n_j]
    del_start = np.minimum(counts, n - 1).tolist()  # deletion keeps order[n_j:]
    kk = min(DEFAULT_TOPK if k is None else int(k), n)
    if kk <= 0:
        raise ValueError(f"k must be positive, got {k}")
    parts = pooling_parts(model, x) if path in ("auto", "pooled") else None
    if path == "pooled" and parts is None:
        raise ValueError(f"{type(model).__name__} has no pooled path; use path='forward'")
    pooled = None if parts is None else _Pooled(parts)
    probs = None if pooled is not None else _prob_fn(model, x)[0]
    total = (int(random_orders) + 1) * 2 * (steps + 1) + 1
    done = 0

    def tick(m: int) -> None:
        nonlocal done
        done += m
        if progress is not None:
            progress(done, total)

    def one(sub: np.ndarray) -> np.ndarray:
        check()
        p = probs(sub)
        tick(1)
        return p

    def curves(oo: np.ndarray, extra: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(deletion [S+1, C], insertion + extra prefixes [S+1+len(extra), C])"""
        if pooled is not None:
            check()
            ins, dele = pooled.probabilities(oo, ins_len + extra, del_start)
            tick(len(ins_len) + len(extra) + len(del_start))
        else:
            ins = np.stack([one(oo[:p]) for p in ins_len + extra])
            dele = np.stack([one(oo[t:]) for t in del_start])
        return dele, ins

    dele, ins = curves(o, [kk])
    full, top = ins[steps], ins[-1]  # counts[steps] = N: the full bag
    target = int(np.argmax(full)) if target is None else int(target)
    if not 0 <= target < full.size:
        raise ValueError(f"target {target} is not a class index (C = {full.size})")
    deletion, insertion = dele[:, target], ins[:steps + 1, target]
    rng = np.random.default_rng(seed)
    rd, ri = [], []
    for _ in range(int(random_orders)):
        d, i = curves(rng.permutation(n), [])
        rd.append(d[:, target])
        ri.append(i[:, target])
    fr = counts / n
    if rd:
        rd, ri = np.stack(rd), np.stack(ri)
    else:  # no random baseline asked for (the caller has one for this bag)
        rd = ri = np.full((1, fr.size), np.nan)

    def area(y: np.ndarray) -> float:
        return float(np.trapezoid(y, fr))

    return {
        "fractions": fr, "deletion": deletion, "insertion": insertion,
        "random_deletion": rd.mean(axis=0), "random_insertion": ri.mean(axis=0),
        "random_deletion_std": rd.std(axis=0), "random_insertion_std": ri.std(axis=0),
        "deletion_auc": area(deletion), "insertion_auc": area(insertion),
        "random_deletion_auc": area(rd.mean(axis=0)),
        "random_insertion_auc": area(ri.mean(axis=0)),
        "target": target, "baseline": float(full[target]),
        "topk_probability": float(top[target]),
        "k": kk, "steps": steps, "random_orders": int(random_orders), "seed": int(seed),
        "path": "pooled" if pooled is not None else "forward",
        "seconds": time.perf_counter() - t0,
    }


def what_if(model: Any, features: Any, inside: Any, mode: str = "without") -> dict[str, Any]:
    """The prediction without the patches ``inside`` (``mode="without"``), or from them alone
    (``mode="alone"``), next to the full bag's.

    Parameters
    ----------
    model : MILModel
    features : Tensor or array [N, D]
    inside : array [N] bool
        E.g. the patches of an annotation or of a region drawn in the viewer.
    mode : "without" or "alone"

    Returns
    -------
    dict
        ``probabilities`` [C] of the sub-bag, ``baseline`` [C] of the full bag, ``change``
        [C] = probabilities - baseline, ``n_kept``, ``mode``.

    Raises
    ------
    ValueError
        When the sub-bag would be empty.
    """
    x = _prepare(model, features)
    n = int(x.shape[0])
    m = np.asarray(inside, dtype=bool).reshape(-1)
    if m.shape[0] != n:
        raise ValueError(f"{m.shape[0]} flags for {n} patches")
    if mode not in ("without", "alone"):
        raise ValueError(f"mode must be 'without' or 'alone', got {mode!r}")
    keep = np.nonzero(~m if mode == "without" else m)[0]
    if keep.size == 0:
        raise ValueError("no patch left: " + ("every patch is inside" if mode == "without"
                                              else "no patch is inside"))
    probs, full = _prob_fn(model, x)
    p = probs(keep)
    return {"probabilities": p, "baseline": full, "change": p - full,
            "n_kept": int(keep.size), "mode": mode}


def what_if_regions(model: Any, features: Any, coords: Any, patch_size_level0: int,
                    regions: Any, *, fraction: float = 0.5) -> list[dict[str, Any]]:
    """:func:`what_if` for every region of an annotation file, and for all of them together.

    Parameters
    ----------
    model : MILModel
    features : Tensor or array [N, D]
        The cached features, in the order of ``coords``.
    coords : array [N, 2]
        Level-0 (x, y) of each patch's top-left corner.
    patch_size_level0 : int
    regions : Annotations or path
        GeoJSON / ASAP XML regions in level-0 pixels
        (:func:`~.annotations.read_annotations`); excluded regions (ASAP ``_2``) are cut
        out of the others and get no entry of their own.
    fraction : float
        A patch is in a region when that share of it is covered (:func:`~.annotations.
        patch_labels`; 0: any overlap).

    Returns
    -------
    list of dict
        First ``region = "all"`` (the union of the regions), then one per region in file
        order (``region`` = its name, else ``"<label> <k>"`` for the k-th region of that
        label, k from 1): ``label``, ``n_patches`` (inside), ``baseline`` [C] (the full
        bag), ``without`` [C] (the bag minus those patches), ``alone`` [C] (those patches
        only), ``change_without`` and ``change_alone`` [C] (minus the baseline), ``note``.
        ``without`` is None when every patch is inside, ``alone`` when none is (float64
        numpy arrays otherwise).
    """
    from .annotations import Annotations, patch_labels, patch_overlap, read_annotations

    ann = regions if hasattr(regions, "regions") else read_annotations(regions)
    x = _prepare(model, features)
    n = int(x.shape[0])
    c = np.asarray(coords)
    if c.shape[0] != n:
        raise ValueError(f"{c.shape[0]} coordinates for {n} feature rows")
    probs, base = _prob_fn(model, x)
    pos = [r for r in ann.regions if not r.exclude]
    if not pos:
        raise ValueError(f"{ann.source or 'regions'}: no region to leave out (only "
                         "exclusions or nothing)")
    excl = ann.exclusions()
    groups = [("all", "", Annotations(regions=pos + excl, source=ann.source))]
    seen: dict[str, int] = {}
    for r in pos:
        seen[r.label] = seen.get(r.label, 0) + 1
        name = r.name or f"{r.label or 'region'} {seen[r.label]}"
        groups.append((name, r.label, Annotations(regions=[r, *excl], source=ann.source)))
    out = []
    for name, label, a in groups:
        inside = np.asarray(patch_labels(patch_overlap(a, c, patch_size_level0), fraction),
                            dtype=bool)
        k = int(inside.sum())
        entry: dict[str, Any] = {"region": name, "label": label, "n_patches": k,
                                 "baseline": base, "without": None, "alone": None,
                                 "change_without": None, "change_alone": None, "note": ""}
        if k == n:
            entry["note"] = "every patch is inside: nothing left without it"
        else:
            entry["without"] = base.copy() if k == 0 else probs(np.nonzero(~inside)[0])
            entry["change_without"] = entry["without"] - base
        if k == 0:
            entry["note"] = "no patch inside"
        else:
            entry["alone"] = base.copy() if k == n else probs(np.nonzero(inside)[0])
            entry["change_alone"] = entry["alone"] - base
        out.append(entry)
    return out

"""MambaMIL (Yang et al., MICCAI 2024): Mamba layers with sequence reordering, then attention
pooling; a pure-PyTorch selective scan so it runs on CPU.

Official code: ``isyangshu/MambaMIL`` (``models/MambaMIL.py`` and its modified copy of
``mamba_ssm``: ``modules/srmamba.py``, ``bimamba.py``, ``mamba_simple.py``). The authors run
the fused CUDA path (``mamba_inner_fn`` / ``mamba_inner_fn_no_out_proj``); this module
recomputes the same thing step by step.

Forward (one bag, ``N`` instances, ``d = d_model`` (512 in the paper), ``e = expand * d``)::

    h = act(_fc1.0 x)                                      [N, d]   (GELU in main.py)
    for each layer l:  h = h + mixer_l(LayerNorm_l(h))     [N, d]
    h = norm(h)
    raw = attention.2(tanh(attention.0 h))                 [N]
    a = softmax_N(raw);  logits = classifier(a @ h)        [C]

One Mamba branch (``in_proj`` output ``xz`` [N, 2e] split into ``x``, ``z``)::

    u = silu(causal depthwise conv1d(x))                   [N, e]  (kernel d_conv, left pad)
    dt, B, C = split(x_proj u, [dt_rank, d_state, d_state])
    delta = softplus(dt_proj.weight dt + dt_proj.bias)     [N, e]
    A = -exp(A_log)                                        [e, d_state]
    s_t = exp(delta_t A) * s_{t-1} + delta_t u_t B_t       [e, d_state]   (s_0 = 0)
    y_t = (s_t C_t) + D u_t;   branch = y * silu(z)        [N, e]

Mixers (the ``type`` option, as the authors name it):

``"SRMamba"`` (the paper's)
    out_proj(branch(xz) + R^-1 branch_b(R xz)), where ``R`` zero-pads ``xz`` to a multiple
    of ``rate`` and reorders it so that position ``k * rate + w`` goes to ``w * K + k``
    (every ``rate``-th instance first; ``K = ceil(N / rate)``); ``R^-1`` undoes the order
    and drops the padding. The zero-padded steps run through the second scan (as in the
    authors' code) and so affect the instances scanned after them.
``"BiMamba"``
    the same with ``R`` = reversal of the sequence (same keys as SRMamba).
``"Mamba"``
    out_proj(branch(xz)) (no ``*_b`` keys).

SRMamba and BiMamba checkpoints have identical keys and shapes: a BiMamba checkpoint needs
``type="BiMamba"`` (``load_model(..., hparams={"type": "BiMamba"})``). ``rate`` (10) and
``act`` ("gelu") leave no trace in the weights either.

Scan backends: on CUDA, when ``mamba_ssm`` is installed, its ``selective_scan_fn`` (the
authors' kernel); otherwise :func:`selective_scan` here: the recurrence step by step, its
per-step terms vectorised over blocks of 32 steps (equal to
:func:`selective_scan_sequential`, the plain reference, up to float rounding).

The survival head of ``main_survival.py`` (``survival=True``): ``probabilities`` are the
hazards ``sigmoid(logits)`` and ``aux["survival"] = cumprod(1 - hazards)``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MILModel, MILOutput, _count_indexed, _shape, register_model

__all__ = [
    "MambaMIL",
    "MambaMixer",
    "causal_conv1d",
    "reorder",
    "selective_scan",
    "selective_scan_sequential",
    "unreorder",
]

MIXER_TYPES = ("SRMamba", "BiMamba", "Mamba")


# --------------------------------------------------------------------------------------------
# selective scan
# --------------------------------------------------------------------------------------------
def _scan_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 delta_bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    return u.float(), F.softplus(delta), A.float(), B.float(), C.float()


def _scan_output(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + u * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y


def selective_scan_sequential(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              D: Tensor | None = None, z: Tensor | None = None,
                              delta_bias: Tensor | None = None) -> Tensor:
    """The selective scan one step at a time (the reference; slow for long bags).

    Parameters
    ----------
    u : Tensor, shape [L, E]
        Input (the convolved, activated ``x``), time-major.
    delta : Tensor, shape [L, E]
        ``dt_proj.weight @ dt`` before the bias and softplus.
    A : Tensor, shape [E, S]
        ``-exp(A_log)``.
    B, C : Tensor, shape [L, S]
        Input-dependent projections.
    D : Tensor, shape [E], optional
        Skip weight.
    z : Tensor, shape [L, E], optional
        Gate: the output is multiplied by ``silu(z)``.
    delta_bias : Tensor, shape [E], optional
        Added to ``delta`` before the softplus.

    Returns
    -------
    Tensor, shape [L, E], float32
    """
    u, delta, A, B, C = _scan_inputs(u, delta, A, B, C, delta_bias)
    state = u.new_zeros(A.shape)
    ys = []
    for t in range(u.shape[0]):
        state = torch.exp(delta[t, :, None] * A) * state + (delta[t] * u[t])[:, None] * B[t]
        ys.append(state @ C[t])
    y = torch.stack(ys) if ys else u.new_zeros(u.shape)
    return _scan_output(y, u, D, z)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor | None = None, z: Tensor | None = None,
                   delta_bias: Tensor | None = None, block: int = 32,
                   threads: int | None = 1) -> Tensor:
    """The selective scan of :func:`selective_scan_sequential`, vectorised by blocks.

    Per block of ``block`` steps, the decays ``exp(delta_t A)`` and inputs
    ``delta_t u_t B_t`` (``[block, E, S]``) are computed in one call each, the recurrence is
    one fused ``addcmul`` per step written in place, and the outputs ``s_t C_t`` are one
    batched matrix product over the block. The state is carried exactly from block to block (no
    chunk-parallel reformulation: same arithmetic as the sequential scan, up to float
    rounding). A block's buffers (``2 * block * E * S`` floats, 4 MiB at E 1024, S 16) stay
    in cache.

    Parameters
    ----------
    u, delta, A, B, C, D, z, delta_bias
        As in :func:`selective_scan_sequential` (``[L, E]``, ``[E, S]``, ``[L, S]``).
    block : int
        Steps per block.
    threads : int or None
        Intra-op threads while the scan runs (``torch.set_num_threads``, restored after);
        None leaves the setting alone. One by default: the steps are too small to gain from
        threads, and on a busy machine the thread pool's hand-offs made the scan about 15x
        slower (measured on 2 shared cores). Process-wide while the scan runs.

    Returns
    -------
    Tensor, shape [L, E], float32
    """
    if threads is None:
        return _selective_scan_blocks(u, delta, A, B, C, D, z, delta_bias, max(1, int(block)))
    with _intra_op_threads(int(threads)):
        return _selective_scan_blocks(u, delta, A, B, C, D, z, delta_bias, max(1, int(block)))


_THREADS_LOCK = threading.Lock()
_threads_state = {"depth": 0, "saved": 0}


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block; the outermost of overlapping blocks (scans
    in several Python threads) restores the setting it found."""
    with _THREADS_LOCK:
        if _threads_state["depth"] == 0:
            _threads_state["saved"] = torch.get_num_threads()
            if n != _threads_state["saved"]:
                torch.set_num_threads(n)
        _threads_state["depth"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _threads_state["depth"] -= 1
            if _threads_state["depth"] == 0 and torch.get_num_threads() != _threads_state["saved"]:
                torch.set_num_threads(_threads_state["saved"])


def _selective_scan_blocks(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None,
                           block: int) -> Tensor:
    u, delta, A, B, C = _scan_inputs(u, delta, A, B, C, delta_bias)
    L, E = u.shape
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C)):
        return _scan_output(_scan_blocks_autograd(u, delta, A, B, C, block), u, D, z)
    du = delta * u  # [L, E]
    y = u.new_empty((L, E))
    state = u.new_zeros(A.shape)  # [E, S]
    # one pair of block buffers, reused (fresh big allocations cost a page fault per page)
    dA_buf = u.new_empty((min(block, L), *A.shape))
    st_buf = torch.empty_like(dA_buf)
    for b0 in range(0, L, block):
        b1 = min(L, b0 + block)
        n = b1 - b0
        dA, states = dA_buf[:n], st_buf[:n]
        torch.mul(delta[b0:b1, :, None], A, out=dA)
        dA.exp_()  # exp(delta_t A)             [n, E, S]
        torch.mul(du[b0:b1, :, None], B[b0:b1, None, :], out=states)  # delta_t u_t B_t
        states[0].addcmul_(dA[0], state)
        for t in range(1, n):
            states[t].addcmul_(dA[t], states[t - 1])
        state.copy_(states[n - 1])
        torch.bmm(states, C[b0:b1, :, None], out=y[b0:b1, :, None])  # s_t C_t
    del du, dA_buf, st_buf
    if D is not None:  # _scan_output in place (y is ours): two [L, E] buffers fewer
        y.addcmul_(u, D.float())
    if z is not None:
        y.mul_(F.silu(z.float()))
    return y


def _scan_blocks_autograd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          block: int) -> Tensor:
    """:func:`_selective_scan_blocks` out of place, so autograd keeps every state."""
    state = u.new_zeros(A.shape)
    ys = []
    for b0 in range(0, u.shape[0], block):
        b1 = min(u.shape[0], b0 + block)
        dA = torch.exp(delta[b0:b1, :, None] * A)
        dBu = (delta[b0:b1] * u[b0:b1])[:, :, None] * B[b0:b1, None, :]
        states = []
        for t in range(b1 - b0):
            state = torch.addcmul(dBu[t], dA[t], state)
            states.append(state)
        ys.append((torch.stack(states) * C[b0:b1, None, :]).sum(-1))
    return torch.cat(ys)


def _mamba_ssm_scan() -> Any:
    """``mamba_ssm``'s ``selective_scan_fn`` (CUDA kernel) when installed, else None."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # noqa: BLE001 - absent, or installed without its compiled kernels
        return None
    return selective_scan_fn


def _scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
          delta_bias: Tensor) -> Tensor:
    """Dispatch: the CUDA kernel on a CUDA tensor when ``mamba_ssm`` is there, else ours."""
    if u.is_cuda:
        fn = _mamba_ssm_scan()
        if fn is not None:
            out = fn(u.t()[None].contiguous(), delta.t()[None].contiguous(), A,
                     B.t()[None].contiguous(), C.t()[None].contiguous(), D.float(),
                     z=z.t()[None].contiguous(), delta_bias=delta_bias.float(),
                     delta_softplus=True)
            return out[0].t()
    return selective_scan(u, delta, A, B, C, D, z, delta_bias)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Causal depthwise convolution in time-major layout (``nn.Conv1d(E, E, W, groups=E,
    padding=W - 1)`` cut to the first ``L`` outputs): ``out_t = bias + sum_k W[:, k]
    x_{t - W + 1 + k}``, zeros before the first instance.

    Parameters
    ----------
    x : Tensor, shape [L, E]
    weight : Tensor, shape [E, 1, W]
    bias : Tensor, shape [E], optional

    Returns
    -------
    Tensor, shape [L, E]
    """
    L, w = x.shape[0], weight.shape[-1]
    xp = F.pad(x, (0, 0, w - 1, 0))  # [L + W - 1, E]
    out = xp[w - 1:] * weight[:, 0, w - 1]
    for k in range(w - 1):
        out.addcmul_(xp[k:k + L], weight[:, 0, k])
    if bias is not None:
        out += bias
    return out


# --------------------------------------------------------------------------------------------
# sequence reordering (SR-Mamba)
# --------------------------------------------------------------------------------------------
def reorder(x: Tensor, rate: int) -> Tensor:
    """Zero-pad ``x`` to a multiple of ``rate`` and reorder it: index ``k * rate + w`` goes to
    ``w * K + k`` (``K = ceil(L / rate)``).

    Parameters
    ----------
    x : Tensor, shape [L, F]
    rate : int

    Returns
    -------
    Tensor, shape [K * rate, F]
    """
    L = x.shape[0]
    K = -(-L // rate)
    x = F.pad(x, (0, 0, 0, K * rate - L))
    return x.view(K, rate, -1).transpose(0, 1).reshape(K * rate, -1)


def unreorder(x: Tensor, rate: int, length: int) -> Tensor:
    """Inverse of :func:`reorder`: back to bag order, padding dropped.

    Parameters
    ----------
    x : Tensor, shape [K * rate, F]
    rate : int
    length : int
        The original ``L``.

    Returns
    -------
    Tensor, shape [length, F]
    """
    K = x.shape[0] // rate
    return x.view(rate, K, -1).transpose(0, 1).reshape(K * rate, -1)[:length]


# --------------------------------------------------------------------------------------------
# the mixer
# --------------------------------------------------------------------------------------------
class MambaMixer(nn.Module):
    """One Mamba mixer: ``SRMamba``, ``BiMamba`` (two branches) or plain ``Mamba``.

    Parameters
    ----------
    d_model : int
        Token width d.
    d_state : int
        SSM state size S (16).
    d_conv : int
        Causal depthwise convolution kernel (4).
    expand : int
        ``E = expand * d_model`` (2).
    dt_rank : int or None
        ``ceil(d_model / 16)`` when None.
    type : str
        ``"SRMamba"``, ``"BiMamba"`` or ``"Mamba"``.
    rate : int
        SR-Mamba reordering rate (ignored by the others).

    State dict (d 512, S 16, E 1024, dt_rank 32)
    --------------------------------------------
    ``in_proj.weight`` [2048, 512], ``conv1d.weight`` [1024, 1, 4], ``conv1d.bias`` [1024],
    ``x_proj.weight`` [64, 1024], ``dt_proj.weight`` [1024, 32], ``dt_proj.bias`` [1024],
    ``A_log`` [1024, 16], ``D`` [1024], ``out_proj.weight`` [512, 1024]; SRMamba and BiMamba
    add ``conv1d_b.*``, ``x_proj_b.weight``, ``dt_proj_b.*``, ``A_b_log``, ``D_b`` of the
    same shapes.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, type: str = "SRMamba", rate: int = 10) -> None:  # noqa: A002
        super().__init__()
        if type not in MIXER_TYPES:
            raise ValueError(f"unknown Mamba type {type!r}; known: {', '.join(MIXER_TYPES)}")
        if int(rate) < 1:
            raise ValueError(f"rate must be >= 1, got {rate}")
        self.type = type
        self.rate = int(rate)
        self.d_state = int(d_state)
        e = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else int(dt_rank)
        self.in_proj = nn.Linear(d_model, 2 * e, bias=False)
        suffixes = ("", "_b") if type != "Mamba" else ("",)
        for s in suffixes:
            setattr(self, f"conv1d{s}", nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1))
            setattr(self, f"x_proj{s}", nn.Linear(e, self.dt_rank + 2 * d_state, bias=False))
            setattr(self, f"dt_proj{s}", nn.Linear(self.dt_rank, e))
            self.register_parameter(
                "A_log" if not s else "A_b_log",
                nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
                             .repeat(e, 1)))
            self.register_parameter(f"D{s}", nn.Parameter(torch.ones(e)))
        self.out_proj = nn.Linear(e, d_model, bias=False)

    def _branch(self, xz: Tensor, s: str) -> Tensor:
        """One scan branch on ``xz`` [L, 2E] -> gated output [L, E]."""
        conv: nn.Conv1d = getattr(self, f"conv1d{s}")
        x_proj: nn.Linear = getattr(self, f"x_proj{s}")
        dt_proj: nn.Linear = getattr(self, f"dt_proj{s}")
        A_log = self.A_log if not s else self.A_b_log
        D = getattr(self, f"D{s}")
        x, z = xz.chunk(2, dim=1)
        u = F.silu(causal_conv1d(x, conv.weight, conv.bias))
        dt, B, C = torch.split(x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = dt @ dt_proj.weight.t()
        A = -torch.exp(A_log.float())
        return _scan(u, delta, A, B, C, D, z, dt_proj.bias).to(xz.dtype)

    def forward(self, h: Tensor) -> Tensor:
        """
        Parameters
        ----------
        h : Tensor, shape [L, d_model]

        Returns
        -------
        Tensor, shape [L, d_model]
        """
        L = h.shape[0]
        xz = self.in_proj(h)  # [L, 2E]
        y = self._branch(xz, "")
        if self.type == "SRMamba":
            y = y + unreorder(self._branch(reorder(xz, self.rate), "_b"), self.rate, L)
        elif self.type == "BiMamba":
            y = y + self._branch(xz.flip(0), "_b").flip(0)
        return self.out_proj(y)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
@register_model
class MambaMIL(MILModel):
    """MambaMIL: ``layer`` pre-norm residual Mamba mixers, then tanh attention pooling.

    Parameters
    ----------
    in_dim : int
        Feature dimension D.
    n_classes : int
        Number of classes C.
    d_model : int
        Token width after ``_fc1`` (the authors hard-code 512).
    layer : int
        Number of Mamba layers (``--mambamil_layer``, 2).
    type : str
        ``"SRMamba"`` (the paper's, default), ``"BiMamba"`` or ``"Mamba"``
        (``--mambamil_type``).
    rate : int
        SR-Mamba reordering rate (``--mambamil_rate``, 10).
    act : str
        ``"gelu"`` (what ``main.py`` builds) or ``"relu"``, after ``_fc1.0``.
    dropout : float
        Dropout after the activation (no parameters; inactive in eval mode).
    d_state, d_conv, expand, dt_rank
        Mamba sizes (16, 4, 2, ``ceil(d_model / 16)``); inferred from the weights.
    attn_dim : int
        Hidden size of the attention MLP (128).
    survival : bool
        The authors' survival head (``main_survival.py``): ``probabilities`` are the
        per-interval hazards ``sigmoid(logits)``, ``aux["survival"] = cumprod(1 - hazards)``.

    State dict (in 1024, C 2, SRMamba, layer 2)
    -------------------------------------------
    ``_fc1.0.weight`` [512, 1024], ``_fc1.0.bias`` [512], ``norm.weight``/``bias`` [512],
    ``layers.{l}.0.weight``/``bias`` [512] (the pre-norm LayerNorm),
    ``layers.{l}.1.*`` (:class:`MambaMixer`), ``classifier.weight`` [2, 512],
    ``classifier.bias`` [2], ``attention.0.weight`` [128, 512], ``attention.0.bias`` [128],
    ``attention.2.weight`` [1, 128], ``attention.2.bias`` [1].

    Attention sources
    -----------------
    ``"attention"``: softmax attention [N] (sums to 1) -- the default (the pooling weights);
    ``"raw/attention"``: the pre-softmax logits [N].
    """

    arch = "mambamil"

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, d_model: int = 512,
                 layer: int = 2, type: str = "SRMamba", rate: int = 10,  # noqa: A002
                 act: str = "gelu", dropout: float = 0.0, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, dt_rank: int | None = None, attn_dim: int = 128,
                 survival: bool = False) -> None:
        super().__init__()
        if type not in MIXER_TYPES:
            raise ValueError(f"unknown MambaMIL type {type!r}; known: {', '.join(MIXER_TYPES)}")
        if act.lower() not in ("gelu", "relu"):
            raise ValueError(f"act must be 'gelu' or 'relu', got {act!r}")
        dt_rank = math.ceil(d_model / 16) if dt_rank is None else int(dt_rank)
        self._set_hparams(in_dim=in_dim, n_classes=n_classes, d_model=d_model, layer=layer,
                          type=type, rate=int(rate), act=act.lower(), dropout=dropout,
                          d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
                          attn_dim=attn_dim, survival=bool(survival))
        self._fc1 = nn.Sequential(nn.Linear(in_dim, d_model),
                                  nn.GELU() if act.lower() == "gelu" else nn.ReLU(),
                                  nn.Dropout(dropout))
        self.norm = nn.LayerNorm(d_model)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d_model),
                          MambaMixer(d_model, d_state, d_conv, expand, dt_rank, type, rate))
            for _ in range(layer))
        self.classifier = nn.Linear(d_model, n_classes)
        self.attention = nn.Sequential(nn.Linear(d_model, attn_dim), nn.Tanh(),
                                       nn.Linear(attn_dim, 1))

    def _forward(self, x: Tensor, with_sources: bool) -> MILOutput:
        h = self._fc1(x)  # [N, d]
        for norm, mixer in self.layers:
            h = h + mixer(norm(h))
        h = self.norm(h)
        raw = self.attention(h)[:, 0]  # [N]
        a = torch.softmax(raw, dim=0)
        logits = self.classifier(a @ h)  # [C]
        sources = {"attention": a, "raw/attention": raw} if with_sources else {}
        out = MILOutput(logits=logits, sources=sources, default_source="attention")
        if self.hparams["survival"]:
            hazards = torch.sigmoid(logits)
            out.probabilities = hazards
            out.aux["survival"] = torch.cumprod(1 - hazards, dim=0)
        return out

    @classmethod
    def matches_state_dict(cls, sd: Mapping[str, Tensor]) -> bool:
        return ("_fc1.0.weight" in sd and "layers.0.1.A_log" in sd
                and "layers.0.1.in_proj.weight" in sd and "attention.0.weight" in sd
                and "classifier.weight" in sd)

    @classmethod
    def hparams_from_state_dict(cls, sd: Mapping[str, Tensor]) -> dict[str, Any]:
        d_model, in_dim = _shape(sd, "_fc1.0.weight", "MambaMIL")
        n_classes, d2 = _shape(sd, "classifier.weight", "MambaMIL")
        attn_dim, d3 = _shape(sd, "attention.0.weight", "MambaMIL")
        layer = _count_indexed(sd, "layers.")
        if layer < 1 or d2 != d_model or d3 != d_model:
            raise ValueError(f"inconsistent MambaMIL state_dict: {layer} layers, classifier "
                             f"input {d2}, attention input {d3}, _fc1 output {d_model}")
        two_e, d4 = _shape(sd, "layers.0.1.in_proj.weight", "MambaMIL")
        e, d_state = _shape(sd, "layers.0.1.A_log", "MambaMIL")
        _, _, d_conv = _shape(sd, "layers.0.1.conv1d.weight", "MambaMIL")
        _, dt_rank = _shape(sd, "layers.0.1.dt_proj.weight", "MambaMIL")
        if d4 != d_model or two_e != 2 * e or e % d_model:
            raise ValueError(f"inconsistent MambaMIL mixer: in_proj {two_e}x{d4}, A_log "
                             f"{e}x{d_state}, d_model {d_model}")
        hp: dict[str, Any] = {"in_dim": in_dim, "n_classes": n_classes, "d_model": d_model,
                              "layer": layer, "d_state": d_state, "d_conv": d_conv,
                              "expand": e // d_model, "dt_rank": dt_rank,
                              "attn_dim": attn_dim}
        if "layers.0.1.A_b_log" not in sd:
            hp["type"] = "Mamba"  # SRMamba and BiMamba both have the *_b keys
        return hp

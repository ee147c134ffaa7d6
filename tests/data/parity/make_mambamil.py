"""Parity cases for MambaMIL (Yang et al., MICCAI 2024) from the authors' code.

    python make_mambamil.py --checkout /tmp/authors/isyangshu+MambaMIL

Environment: torch, numpy, einops (what the authors' ``models/MambaMIL.py`` and their
``mamba/mamba_ssm`` copy import). Writes ``mambamil_srmamba/``, ``mambamil_mamba/``,
``mambamil_bimamba/`` and ``mambamil_srmamba_survival/`` (``main_survival.py``'s head), each
with ``s_0_checkpoint.pt`` saved as ``utils/core_utils.py`` and ``survival_core_utils.py``
save it (``torch.save(model.state_dict(), "s_{fold}_checkpoint.pt")``).

The authors' model runs on CPU with only the compiled pieces replaced, here in this script:

* ``selective_scan_cuda.fwd`` -> the authors' own pure-PyTorch ``selective_scan_ref``
  (``mamba/mamba_ssm/ops/selective_scan_interface.py``; their fused
  ``MambaInnerFn(NoOutProj)`` forward runs unchanged around it: ``out_z = out * silu(z)``, as
  the kernel returns);
* ``causal_conv1d_cuda.causal_conv1d_fwd`` / ``causal_conv1d.causal_conv1d_fn`` -> the
  causal depthwise convolution written out (``conv1d`` with ``d_conv - 1`` left padding, then
  SiLU), the reference of the ``causal_conv1d`` package;
* ``transformers`` -> empty stand-ins for the names ``mamba_ssm/utils/{generation,hf}.py``
  import (used only by the language-model head that ``mamba_ssm/__init__`` imports; MambaMIL
  never calls them).

The authors hard-code ``d_model = 512`` in ``MambaMIL.__init__``; to keep the checkpoints
small this script builds their ``MambaMIL`` and then rebuilds each sub-module at
``D_MODEL = 64`` with the same classes and arguments (their ``SRMamba`` / ``Mamba`` /
``BiMamba(d_model=64, d_state=16, d_conv=4, expand=2)``, ``nn.LayerNorm``, ``nn.Linear``) and
re-applies their ``initialize_weights``; their ``forward`` is untouched. Every parameter is
then perturbed by ``N(0, 0.05^2)`` to stand for training (the initialisation sets every
``A_log`` row to ``log(1..16)``, ``D`` to 1 and the biases to 0).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parity_io  # noqa: E402

REPO = "isyangshu/MambaMIL"
COMMIT = "9aea39efc13fdcd3703b5b54c28a64887b4acbd7"
IN_DIM = 96
N_CLASSES = 3
D_MODEL = 64
RATE = 10
LAYERS = 2
#: case folder -> (type, survival head); survival as main_survival.py builds it (4 intervals)
CASES = {"mambamil_srmamba": ("SRMamba", False), "mambamil_mamba": ("Mamba", False),
         "mambamil_bimamba": ("BiMamba", False), "mambamil_srmamba_survival": ("SRMamba", True)}


def _causal_conv(x, weight, bias, silu):
    """x [B, E, L], weight [E, W] -> depthwise causal conv [B, E, L] (SiLU when asked)."""
    w = weight.shape[-1]
    out = F.conv1d(x, weight[:, None, :], bias, padding=w - 1, groups=x.shape[1])
    out = out[..., :x.shape[-1]]
    return F.silu(out) if silu else out


def _install_stand_ins() -> None:
    """The compiled modules the authors' code imports, as pure-PyTorch references."""
    cc = types.ModuleType("causal_conv1d")
    cc.causal_conv1d_fn = lambda x, weight, bias=None, activation=None: _causal_conv(
        x, weight, bias, activation in ("silu", "swish"))

    def _no_update(*_a, **_k):
        raise RuntimeError("step-by-step decoding is not used by MambaMIL")

    cc.causal_conv1d_update = _no_update
    ccc = types.ModuleType("causal_conv1d_cuda")
    ccc.causal_conv1d_fwd = lambda x, weight, bias, _seq_idx, silu: _causal_conv(
        x, weight, bias, bool(silu))

    ssc = types.ModuleType("selective_scan_cuda")

    def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

        out, last = selective_scan_ref(u, delta, A, B, C, D, None, delta_bias, delta_softplus,
                                       return_last_state=True)
        x = torch.zeros(*last.shape[:2], 1, 2 * last.shape[-1], dtype=last.dtype)
        x[..., 1::2] = last[:, :, None]
        if z is None:
            return out, x
        return out, x, out * F.silu(z.float())

    ssc.fwd = fwd
    tr = types.ModuleType("transformers")
    gen = types.ModuleType("transformers.generation")
    for name in ("GreedySearchDecoderOnlyOutput", "SampleDecoderOnlyOutput", "TextStreamer"):
        setattr(gen, name, type(name, (), {}))
    utils = types.ModuleType("transformers.utils")
    utils.WEIGHTS_NAME, utils.CONFIG_NAME = "pytorch_model.bin", "config.json"
    hub = types.ModuleType("transformers.utils.hub")
    hub.cached_file = _no_update
    for mod in (cc, ccc, ssc, tr, gen, utils, hub):
        sys.modules[mod.__name__] = mod


def _build(mm, kind: str, survival: bool, n_classes: int, seed: int) -> torch.nn.Module:
    """The authors' MambaMIL as (survival_)core_utils builds it, its sub-modules rebuilt at
    D_MODEL."""
    from torch import nn

    torch.manual_seed(seed)
    model = mm.MambaMIL(in_dim=IN_DIM, n_classes=n_classes, dropout=0.25, act="gelu",
                        survival=survival, layer=LAYERS, rate=RATE, type=kind)
    mixer_cls = {"SRMamba": mm.SRMamba, "Mamba": mm.Mamba, "BiMamba": mm.BiMamba}[kind]
    model._fc1[0] = nn.Linear(IN_DIM, D_MODEL)
    model.norm = nn.LayerNorm(D_MODEL)
    for layer in model.layers:
        layer[0] = nn.LayerNorm(D_MODEL)
        layer[1] = mixer_cls(d_model=D_MODEL, d_state=16, d_conv=4, expand=2)
    model.classifier = nn.Linear(D_MODEL, n_classes)
    model.attention[0] = nn.Linear(D_MODEL, 128)
    model.apply(mm.initialize_weights)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkout", required=True, type=Path)
    args = ap.parse_args()
    commit = parity_io.require_commit(args.checkout, COMMIT)
    _install_stand_ins()
    # models/MambaMIL.py imports `mamba.mamba_ssm`; mamba_simple.py imports `mamba_ssm` (the
    # authors pip-install their copy): both resolve to the checkout's files, `mamba_ssm` as a
    # bare package over mamba/mamba_ssm (its __init__ re-enters `mamba.mamba_ssm`: circular).
    sys.path.insert(0, str(args.checkout))
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [str(args.checkout / "mamba" / "mamba_ssm")]
    sys.modules["mamba_ssm"] = pkg
    import models.MambaMIL as mm

    bags = parity_io.make_bags(IN_DIM)
    for seed, (name, (kind, survival)) in enumerate(CASES.items()):
        n_classes = 4 if survival else N_CLASSES
        model = _build(mm, kind, survival, n_classes, seed)
        folder = parity_io.HERE / name
        folder.mkdir(exist_ok=True)
        torch.save(model.state_dict(), folder / "s_0_checkpoint.pt")
        raw: list[torch.Tensor] = []
        hook = model.attention.register_forward_hook(lambda _m, _i, out, sink=raw: sink.append(out))
        probs, refs = [], []
        with torch.no_grad():
            for x in bags:
                raw.clear()
                # (logits, Y_prob, ...) or, with survival=True, (hazards, S, ...)
                first, second, *_ = model(torch.from_numpy(x))
                a_raw = raw[-1][0, :, 0]  # [N], before their softmax over the instances
                probs.append((first if survival else second)[0].numpy())
                refs.append({"attention": torch.softmax(a_raw, 0).numpy(),
                             "raw_attention": a_raw.numpy()})
        hook.remove()
        hp = ({"type": "BiMamba"} if kind == "BiMamba" else {}) | (
            {"survival": True} if survival else {})
        load = {"hparams": hp} if hp else {}
        notes = (
            f"type={kind}, survival={survival}, n_classes={n_classes}, layer={LAYERS}, "
            f"rate={RATE}, act=gelu, dropout=0.25 (eval), "
            f"in_dim={IN_DIM}, d_model={D_MODEL} (the authors hard-code 512: the script "
            "rebuilds the sub-modules at 64 with their classes and initialize_weights, then "
            "perturbs every parameter by N(0, 0.05^2)). Run on CPU: selective_scan_cuda.fwd "
            "is replaced by the authors' selective_scan_ref, causal_conv1d(_cuda) by the "
            "reference causal depthwise conv + SiLU, transformers by stand-ins (LM head "
            "only); their fused MambaInnerFn(NoOutProj) forward runs unchanged. The authors' "
            "forward returns no attention (A_raw=None): a forward hook records the output of "
            "`attention` ([1, N, 1]) and the softmax over the instances their forward takes "
            "for pooling.")
        if survival:
            notes += (" Survival head (main_survival.py): the recorded probabilities are the "
                      "per-interval hazards sigmoid(logits) their forward returns; load with "
                      "hparams={'survival': True}.")
        if kind == "BiMamba":
            notes += (" BiMamba has the same keys as SRMamba: load with "
                      "hparams={'type': 'BiMamba'}.")
        parity_io.write_case(
            name, arch="mambamil",
            paper="Yang et al., MambaMIL, MICCAI 2024", repo=REPO, commit=commit,
            script=Path(__file__).name, checkpoint="s_0_checkpoint.pt", bags=bags,
            probs=probs, refs=refs, load=load,
            sources={
                "attention": {"key": "attention", "definition":
                              "softmax over the N instances of attention(norm(h)): the "
                              "pooling weights"},
                "raw/attention": {"key": "raw_attention", "definition":
                                  "attention(norm(h)) before the softmax"},
            },
            heatmap_source="attention", notes=notes,
            probabilities="sigmoid (hazards)" if survival else "softmax")
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()

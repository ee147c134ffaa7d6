"""Parity cases for PackMIL (Tang, Fang et al., 2025) from the authors' ``FangHeng/PackMIL``.

    python make_packmil.py --checkout /tmp/authors/FangHeng+PackMIL

Needs torch, numpy and what ``modules/__init__.py`` imports: ``timm einops pillow pyyaml
future torch_geometric fairscale``. timm imports torchvision; the ABMIL path does not use it,
so when torchvision cannot be imported a placeholder package stands in (any use of it fails).

Builds the authors' ``modules.packmil.PackMIL(mil='abmil', ...)`` with the hyper-parameters
their ``modules.build_model`` passes (``get_mil_model_params`` + ``--da_gated``):

* ``packmil_abmil_brca``: ``config/feat_pack_brca.yaml`` (``act gelu``, ADS downsampler with
  ``r = 4``, focal residual loss, ``--pack_residual_type norm``), defaults elsewhere
  (``mil_norm`` none, biases, ungated);
* ``packmil_abmil_gated_ln``: gated attention, ``--mil_norm ln``, ``act relu``, residual
  classifier ``dual_cls`` (its ``predictor_res`` is training-only), ADS as above;
* ``packmil_transmil_brca``: ``PackMIL(mil='transmil')`` with the brca settings;
* ``packmil_transmil_ln_relu``: TransMIL with ``--mil_norm ln``, ``act relu``, ``fc_norm``
  off, ``dual_cls``.

``PackMIL(mil='dsmil')`` cannot be built at this commit (TypeError: ``MILBase`` is called
without ``n_classes``), so there is no DSMIL case.

Small sizes: ``--input_dim 64 --inner_dim 32``. The checkpoint is written as ``main.py``
writes the best model: ``{'model': state_dict, 'teacher': None, 'epoch'}`` in
``fold_0_model_best.pt``. Reference outputs: ``softmax(model(x))`` in eval mode (the
authors' ``PackMIL.forward``); the aggregator attention from the authors' own
``model.mil(model.apply_inference_downsample(x), return_attn=True)`` (``PackMIL.forward``
cannot return it: it applies the predictor to the returned list), and the ADS weights
``softmax(model.downsampler.attention(x))``.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parity_io  # noqa: E402

REPO = "FangHeng/PackMIL"
COMMIT = "ff9b3a662664f65e59d4e15ada9c33f42df25996"
PAPER = ("Tang, Fang et al., Revisiting data challenges of computational pathology: a "
         "pack-based MIL training framework, arXiv 2509.20923 (2025)")
DIM, INNER = 64, 32


def _placeholder_torchvision() -> None:
    """A stand-in ``torchvision`` (any attribute is a dummy class) when it cannot be
    imported: timm imports it, the PackMIL ABMIL path never calls it."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001 - missing or broken (a CUDA build on CPU torch)
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]

    class _Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return name.lower()

    class _Dummy(metaclass=_Meta):
        def __init__(self, *a, **k):
            pass

        def __call__(self, *a, **k):
            raise RuntimeError("torchvision placeholder: not installed")

    class _Mod(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (_Dummy,), {})

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            m = _Mod(spec.name)
            m.__path__ = []
            m.__version__ = "0.0"
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())


def _mil_kwargs(act: str, mil_norm, da_gated: bool, **over) -> dict:
    """``get_mil_model_params(args)`` (the trans variant PackMIL receives) + ``da_gated``."""
    return over | dict(input_dim=DIM, n_classes=2, dropout=0.25, act=act, mil_norm=mil_norm,
                cls_norm=None, mil_bias=True, inner_dim=INNER, embed_feat=True,
                embed_feat_mlp_ratio=4, fc_norm_bn=True, embed_norm_pos=0,
                feat_embed_type="norm", pos=None, n_layers=2, pool="cls_token",
                attn_dropout=0.0, deterministic=True, ffn=False, sdpa_type="torch", n_heads=8,
                fc_norm=True, vit_norm=True, attn_type="naive", ffn_bias=True, ffn_dp=0.0,
                ffn_ratio=4.0, da_gated=da_gated) | over


def _transmil_attention(model, x):
    """The authors' ``SAttention.forward_ntrans`` (no packing), step by step with their own
    modules, taking each layer's class-token attention from their ``NystromAttention(...,
    return_attn=True)`` (``forward_ntrans`` itself raises NotImplementedError for
    ``return_attn``). Returns (pooled feature, [per-layer attention [H, N]])."""
    mil, agg = model.mil, model.mil.aggregate
    h = mil.embed(mil.forward_norm(x, None))
    t = torch.cat((agg.cls_token.expand(h.shape[0], -1, -1), h), dim=1)
    attn = []
    for i, layer in enumerate([agg.layer1, *(agg.layers or [])]):
        z, a, _ = layer.attn(layer.norm(t), return_attn=True)
        t = t + z
        attn.append(a[0])
        if i == 0:
            t[:, 1:, :] = agg.pos_embedding(t[:, 1:, :])
    return agg.fc_norm(agg.norm(t)[:, 0]), attn


def _case(name: str, commit: str, *, act: str, mil_norm, da_gated: bool, residual_type: str,
          notes: str, mil: str = "abmil", **over) -> None:
    from modules.packmil import PackMIL

    torch.manual_seed(0)
    model = PackMIL(mil=mil, task_type="subtype", token_dropout=0.5,
                    group_max_seq_len=2400, min_seq_len=128, pack_residual=True,
                    residual_loss="focal", downsample_mode="ads", downsample_type="random",
                    residual_type=residual_type, residual_ps_weight=False, singlelabel=False,
                    residual_downsample_r=4, pad_r=False,
                    **_mil_kwargs(act, mil_norm, da_gated, **over))
    with torch.no_grad():  # trained-looking norms and a spread ADS / aggregator attention
        for n, p in model.named_parameters():
            if n.endswith("cls_token"):
                p.normal_()
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
            if n.endswith(("attention.2.weight", "attention_c.weight")):
                p.mul_(4.0)
    folder = parity_io.HERE / name
    folder.mkdir(exist_ok=True)
    torch.save({"model": model.state_dict(), "teacher": None, "epoch": 7},
               folder / "fold_0_model_best.pt")
    model.eval()
    bags = parity_io.make_bags(DIM)
    probs, refs = [], []
    with torch.no_grad():
        for x in bags:
            t = torch.from_numpy(x)[None]  # [1, N, D]
            logits = model(t.clone())
            probs.append(torch.softmax(logits, dim=-1)[0].double().numpy())
            ds = model.apply_inference_downsample(t.clone())
            s = torch.softmax(model.downsampler.attention(t), dim=1)
            ref = {"ads_attention": s.reshape(-1).double().numpy()}
            if mil == "transmil":
                feat, attn = _transmil_attention(model, ds)
                torch.testing.assert_close(feat, model.mil(ds.clone(), residual=True))
                for i, a in enumerate(attn, start=1):
                    ref[f"layer{i}_mean"] = a.mean(0).double().numpy()
                    ref[f"layer{i}_head0"] = a[0].double().numpy()
            else:
                feat, attn = model.mil(ds, return_attn=True, residual=True)
                ref["attention"] = attn.reshape(-1).double().numpy()
            torch.testing.assert_close(model.predictor(feat), logits)
            refs.append(ref)
    sources = {}
    if mil == "transmil":
        for i in (1, 2):
            sources[f"layer{i}/mean"] = {"key": f"layer{i}_mean", "definition":
                                         f"class-token row of layer {i}'s Nystrom attention "
                                         "over the instances, mean over the 8 heads"}
            sources[f"layer{i}/head/0"] = {"key": f"layer{i}_head0", "definition":
                                           f"the same, head 0, layer {i}"}
        heatmap = "layer2/mean"
    else:
        sources["attention"] = {"key": "attention", "definition":
                                "DAttention softmax over instances after the ADS (eval)"}
        heatmap = "attention"
    sources["downsampler/attention"] = {"key": "ads_attention", "definition":
                                        "softmax(downsampler.attention(x)) over instances"}
    parity_io.write_case(
        name, arch="packmil", paper=PAPER, repo=REPO, commit=commit,
        script="make_packmil.py", checkpoint="fold_0_model_best.pt", bags=bags, probs=probs,
        refs=refs, sources=sources, heatmap_source=heatmap, probabilities="softmax",
        load={"hparams": {"act": act}},
        notes=notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=Path, required=True)
    args = ap.parse_args(argv)
    commit = parity_io.require_commit(args.checkout, COMMIT)
    sys.path.insert(0, str(args.checkout))
    _placeholder_torchvision()
    _case("packmil_abmil_brca", commit, act="gelu", mil_norm=None, da_gated=False,
          residual_type="norm",
          notes="config/feat_pack_brca.yaml settings (ADS r=4, act gelu), ungated ABMIL, no "
                "norms; the authors' visualisation code is unreleased (README TODO), the "
                "aggregator attention is taken as the heatmap. act leaves no trace in the "
                "weights: load passes it.")
    _case("packmil_abmil_gated_ln", commit, act="relu", mil_norm="ln", da_gated=True,
          residual_type="dual_cls",
          notes="gated ABMIL, --mil_norm ln (LayerNorm before the embedding and on the pooled "
                "feature), act relu, --pack_residual_type dual_cls (predictor_res dropped on "
                "loading), ADS r=4.")
    _case("packmil_transmil_brca", commit, mil="transmil", act="gelu", mil_norm=None,
          da_gated=False, residual_type="norm",
          notes="--model transmil (SAttention, Nystrom attention + PPEG, 2 layers, vit_norm "
                "and fc_norm on) with config/feat_pack_brca.yaml settings (ADS r=4, act "
                "gelu). forward_ntrans cannot return attention: the reference replays it with "
                "the authors' modules and takes each layer's class-token row from their "
                "NystromAttention(return_attn=True); layer 2 (feeding the predictor) is taken "
                "as the heatmap (the authors' visualisation code is unreleased).")
    _case("packmil_transmil_ln_relu", commit, mil="transmil", act="relu", mil_norm="ln",
          da_gated=False, residual_type="dual_cls", fc_norm=False,
          notes="--model transmil with --mil_norm ln, act relu, fc_norm off (the class token "
                "goes through SAttention.norm instead), --pack_residual_type dual_cls "
                "(predictor_res dropped on loading), ADS r=4.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

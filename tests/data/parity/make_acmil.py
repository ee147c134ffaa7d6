"""Parity cases from dazhangyu123/ACMIL: ACMIL-GA, ACMIL-MHA, its ABMIL and MHA baselines and
its copies of CLAM-SB / CLAM-MB (the latter with ``softmax_one``).

    python make_acmil.py --checkout /tmp/authors/dazhangyu123+ACMIL

Repository ``dazhangyu123/ACMIL`` at :data:`COMMIT` (MIT; nothing of it is copied here: its
``architecture/*.py`` and ``utils/utils.py`` are imported from the checkout at run time).
Extra packages: ``einops``, ``pyyaml``, ``scikit-learn``, ``h5py`` (imported by the modules
loaded). ``utils/utils.py`` also imports ``torchvision`` and ``wandb``, which no code path
used here touches; empty stand-in modules are registered for those two when they are not
installed (a torchvision wheel must match the torch build exactly).

Per case, as the authors' training script does it:

* the configuration: the script's default YAML config read from the checkout, updated with
  the script's argparse values (defaults except those named per case), wrapped in ACMIL's own
  ``utils.utils.Struct``, ``D_feat``/``D_inner`` set from ``--pretrain medical_ssl``
  (384 / 128: the repository's default preset and the smallest);
* the model built with the authors' class and constructor call (torch seeded) and the
  script's AdamW optimiser, saved before any step: its state holds no tensors yet (a trained
  checkpoint's holds ``exp_avg``/``exp_avg_sq`` per parameter, which would triple the file;
  ``tests/mil/test_checkpoint.py`` covers a container with optimiser tensors);
* saved with ACMIL's own ``utils.utils.save_model`` (``{'model', 'optimizer', 'epoch',
  'config'}``) as ``checkpoint-best.pth``;
* the authors' forward in eval mode on ``parity_io.make_bags(384)`` (``[1, N, D]`` as their
  data loader gives it); probabilities as their ``evaluate`` computes them
  (``torch.softmax(output, dim=-1)``); attentions from their forward's return value, or from a
  forward hook on the attention sub-module where the forward returns logits only.

Cases and the heatmap each records:

* ``acmil_ga_dazhangyu123`` (``Step3_WSI_classification_ACMIL.py --arch ga --n_token 5
  --n_masked_patch 10 --mask_drop 0.6``): ``Step4_visualize_heatmap_camelyon.py`` draws
  ``softmax(attn, -1)[0].mean(0)``, the mean over branches of each branch's softmax (times
  N x zoom for display): our ``branch/mean``.
* ``acmil_mha_dazhangyu123`` (``--arch mha``, same settings): Step4 has no MHA path; the
  analogue is the weights the bag attention pools with, ``softmax(attns, -1).mean(1)``
  averaged over heads: our ``branch/mean``.
* ``abmil_acmil`` / ``mha_acmil`` (``Step3_WSI_classification.py --arch abmil|mha``): no
  heatmap script; the softmax attention (head mean for MHA).
* ``clam_sb_acmil`` / ``clam_mb_acmil`` (``Step3_WSI_classification.py --arch
  clam_sb|clam_mb``): ACMIL's CLAM copy (sizes ``[D_feat, D_inner, 128]``, dropout layers on);
  its CLAM_MB normalises with ``softmax_one``. No heatmap script in ACMIL for it; CLAM's
  definition, ``A_raw[Y_hat]``, is recorded as the heatmap.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parity_io  # noqa: E402

REPO = "dazhangyu123/ACMIL"
COMMIT = "e53d19c81f3892256d41962ffc4352cc91a4f834"
PAPER = "Zhang et al., ECCV 2024 (ACMIL)"
CKPT = "checkpoint-best.pth"

#: ``--pretrain`` presets the scripts apply (only the one used here)
PRESETS = {"medical_ssl": (384, 128)}


# ----------------------------------------------------------------------------------------
# shared with make_aem.py (AEM is ACMIL's code base)
# ----------------------------------------------------------------------------------------


def import_authors(checkout: Path) -> None:
    """Put the checkout on ``sys.path``; stand-ins for torchvision / wandb when absent."""
    for name in ("torchvision", "wandb"):
        if importlib.util.find_spec(name) is None:
            mod = types.ModuleType(name)
            if name == "torchvision":
                mod.transforms = types.ModuleType("torchvision.transforms")
                sys.modules["torchvision.transforms"] = mod.transforms
            sys.modules[name] = mod
    sys.path.insert(0, str(checkout.resolve()))


def make_conf(checkout: Path, config: str, args: dict[str, Any]):
    """The script's ``conf``: YAML, updated with the argparse values, as ACMIL's ``Struct``,
    ``D_feat``/``D_inner`` from ``--pretrain``."""
    import yaml
    from utils.utils import Struct

    with open(checkout / config) as fh:
        c = yaml.load(fh, Loader=yaml.FullLoader)
    c.update({"config": config, **args})
    conf = Struct(**c)
    conf.D_feat, conf.D_inner = PRESETS[conf.pretrain]
    return conf


def optimiser(model, lr: float, wd: float):
    """The scripts' ``torch.optim.AdamW(filter(requires_grad, parameters), lr, wd)``; the
    model is put in eval mode."""
    model.eval()
    return torch.optim.AdamW(filter(lambda p: p.requires_grad, model.parameters()), lr=lr,
                             weight_decay=wd)


class Hook:
    """The output of a sub-module during the last forward."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.out = None
        module.register_forward_hook(self._keep)

    def _keep(self, _mod, _inp, out) -> None:
        self.out = out


def softmax_sources(raw: torch.Tensor, prefix: str) -> dict[str, np.ndarray]:
    """``{prefix}raw_{i}`` / ``{prefix}sm_{i}`` for every row of raw ``[R, N]``."""
    out = {}
    for i in range(raw.shape[0]):
        out[f"{prefix}raw_{i}"] = raw[i].double().numpy()
        out[f"{prefix}sm_{i}"] = torch.softmax(raw[i].double(), dim=0).numpy()
    return out


def mha_refs(attn: torch.Tensor) -> dict[str, np.ndarray]:
    """MHA (one query) logits ``[H, 1, N]`` -> per-head raw/softmax and the head mean."""
    lg = attn[:, 0].double()  # [H, N]
    sm = torch.softmax(lg, dim=-1)
    ref = {f"head{h}_raw": lg[h].numpy() for h in range(lg.shape[0])}
    ref.update({f"head{h}_sm": sm[h].numpy() for h in range(lg.shape[0])})
    ref["head_mean"] = sm.mean(0).numpy()
    return ref


def mha_sources(n_heads: int) -> dict[str, dict[str, str]]:
    src = {"head/mean": {"key": "head_mean", "definition": "mean over the 8 heads of "
                         "softmax over N of the scaled logits q.k/sqrt(d/8) "
                         "(MutiHeadAttention's attn_out, [H, 1, N])"}}
    for h in range(n_heads):
        src[f"head/{h}"] = {"key": f"head{h}_sm", "definition": f"softmax over N of head {h}"}
        src[f"raw/head/{h}"] = {"key": f"head{h}_raw", "definition": f"head {h}'s scaled "
                                "logits as MutiHeadAttention returns them (attn_out)"}
    return src


def abmil_sources() -> dict[str, dict[str, str]]:
    return {
        "attention": {"key": "sm_0", "definition": "softmax over N of Attention_Gated's "
                      "logits, the weights ABMIL pools with"},
        "raw/attention": {"key": "raw_0", "definition": "Attention_Gated's logits "
                          "W_w(tanh(V h) * sigmoid(U h)), [1, N]"},
    }


def write(name: str, *, arch: str, paper: str, repo: str, commit: str, script: str,
          bags, probs, refs, sources, heat: str, notes: str, load=None) -> None:
    parity_io.write_case(name, arch=arch, paper=paper, repo=repo, commit=commit,
                         script=script, checkpoint=CKPT, bags=bags, probs=probs,
                         sources=sources, refs=refs, heatmap_source=heat,
                         probabilities="softmax (evaluate: torch.softmax(output, dim=-1))",
                         load=load, notes=notes)
    print(f"{name}: probs {[np.round(p, 4).tolist() for p in probs]}")


def save(conf, model, opt, name: str) -> None:
    """ACMIL's own ``utils.utils.save_model`` into ``HERE/name/checkpoint-best.pth``."""
    from utils.utils import save_model

    folder = parity_io.HERE / name
    folder.mkdir(exist_ok=True)
    save_model(conf=conf, model=model, optimizer=opt, epoch=0, save_path=str(folder / CKPT))


# ----------------------------------------------------------------------------------------
# the cases
# ----------------------------------------------------------------------------------------

#: argparse values of Step3_WSI_classification_ACMIL.py (defaults, --n_token 5 ...)
ACMIL_ARGS = {"eval_only": False, "seed": 1, "wandb_mode": "disabled", "n_token": 5,
              "n_masked_patch": 10, "mask_drop": 0.6, "pretrain": "medical_ssl", "lr": 0.0001}
ACMIL_CONFIG = "config/camelyon_config.yml"
#: argparse values of Step3_WSI_classification.py (defaults)
BASE_ARGS = {"seed": 5, "wandb_mode": "disabled", "w_loss": 1.0, "pretrain": "medical_ssl",
             "lr": 0.0001}
BASE_CONFIG = "config/bracs_config.yml"


def case_acmil(checkout: Path, commit: str, arch: str, seed: int) -> None:
    from architecture.transformer import ACMIL_GA, ACMIL_MHA

    conf = make_conf(checkout, ACMIL_CONFIG, {**ACMIL_ARGS, "arch": arch})
    torch.manual_seed(seed)
    if arch == "ga":
        model = ACMIL_GA(conf, n_token=conf.n_token, n_masked_patch=conf.n_masked_patch,
                         mask_drop=conf.mask_drop)
    else:
        model = ACMIL_MHA(conf, n_token=conf.n_token, n_masked_patch=conf.n_masked_patch,
                          mask_drop=conf.mask_drop)
    opt = optimiser(model, 0.001, conf.wd)
    name = f"acmil_{arch}_dazhangyu123"
    save(conf, model, opt, name)
    bags = parity_io.make_bags(conf.D_feat)
    probs, refs = [], []
    k_tok = conf.n_token
    for x in bags:
        with torch.no_grad():
            _sub, slide, attn = model(torch.from_numpy(x)[None])
        probs.append(torch.softmax(slide, dim=-1)[0].numpy())
        if arch == "ga":
            a = attn[0].double()  # [K, N] logits
            ref = softmax_sources(a, "b")
            ref["mean"] = torch.softmax(a, dim=-1).mean(0).numpy()
        else:
            a = attn.double()  # [H, K, N] logits
            sm = torch.softmax(a, dim=-1)
            ref = {"mean": sm.mean(dim=(0, 1)).numpy()}
            for k in range(k_tok):
                ref[f"b{k}"] = sm[:, k].mean(0).numpy()
                for h in range(a.shape[0]):
                    ref[f"b{k}h{h}_raw"] = a[h, k].numpy()
            for h in range(a.shape[0]):
                ref[f"h{h}"] = sm[h].mean(0).numpy()
        refs.append(ref)
    if arch == "ga":
        sources = {"branch/mean": {
            "key": "mean", "definition": "softmax(attn, -1)[0].mean(0): per-branch softmax "
            "over N of the [1, K, N] logits ACMIL_GA returns, averaged over the K branches "
            "(Step4_visualize_heatmap_camelyon.py; it multiplies by N x zoom to draw)"}}
        for k in range(k_tok):
            sources[f"branch/{k}"] = {"key": f"bsm_{k}", "definition": f"softmax over N of "
                                      f"branch {k}'s logits"}
            sources[f"raw/branch/{k}"] = {"key": f"braw_{k}", "definition": f"branch {k}'s "
                                          "logits as ACMIL_GA returns them (eval: unmasked)"}
        notes = ("Step4_visualize_heatmap_camelyon.py draws branch/mean (x N x zoom_factor). "
                 "Probabilities from the slide classifier only, as evaluate does.")
    else:
        sources = {"branch/mean": {
            "key": "mean", "definition": "softmax over N of the [H, K, N] logits ACMIL_MHA "
            "returns, averaged over heads and branches (the weights bag_attention pools "
            "with, softmax(attns).mean(1), averaged over heads)"}}
        for k in range(k_tok):
            sources[f"branch/{k}"] = {"key": f"b{k}", "definition": f"branch {k}: softmax "
                                      "over N averaged over the 8 heads"}
            for h in range(8):
                sources[f"raw/branch/{k}/head/{h}"] = {
                    "key": f"b{k}h{h}_raw", "definition": f"logits of branch {k}, head {h}"}
        for h in range(8):
            sources[f"head/{h}"] = {"key": f"h{h}", "definition": f"head {h}: softmax over "
                                    "N averaged over branches (bag_attention's weights)"}
        notes = ("ACMIL's Step4 heatmap script handles ACMIL_GA only; branch/mean is its "
                 "analogue for MHA (mean over heads of the bag-pooling weights).")
    write(name, arch=f"acmil_{arch}", paper=PAPER, repo=REPO, commit=commit,
          script=Path(__file__).name, bags=bags, probs=probs, refs=refs, sources=sources,
          heat="branch/mean",
          notes=f"{notes} Step3_WSI_classification_ACMIL.py --arch {arch} --n_token 5 "
                "--n_masked_patch 10 --mask_drop 0.6 --pretrain medical_ssl, "
                "config/camelyon_config.yml; saved with "
                "utils.utils.save_model.")


def case_abmil_mha(checkout: Path, commit: str, arch: str, seed: int) -> None:
    from architecture.transformer import ABMIL, MHA

    conf = make_conf(checkout, BASE_CONFIG, {**BASE_ARGS, "arch": arch})
    torch.manual_seed(seed)
    model = ABMIL(conf) if arch == "abmil" else MHA(conf)
    opt = optimiser(model, conf.lr, conf.wd)
    name = f"{arch}_acmil"
    save(conf, model, opt, name)
    hook = Hook(model.attention)
    bags = parity_io.make_bags(conf.D_feat)
    probs, refs = [], []
    for x in bags:
        with torch.no_grad():
            out = model(torch.from_numpy(x)[None])
        probs.append(torch.softmax(out, dim=-1)[0].numpy())
        if arch == "abmil":
            refs.append(softmax_sources(hook.out, ""))  # Attention_Gated: [1, N] logits
        else:
            refs.append(mha_refs(hook.out[1]))  # MutiHeadAttention: (feat, attn [H, 1, N])
    sources = abmil_sources() if arch == "abmil" else mha_sources(8)
    heat = "attention" if arch == "abmil" else "head/mean"
    write(name, arch=arch, paper=PAPER + f", {arch.upper()} baseline", repo=REPO,
          commit=commit, script=Path(__file__).name, bags=bags, probs=probs, refs=refs,
          sources=sources, heat=heat,
          notes=f"Step3_WSI_classification.py --arch {arch} --pretrain medical_ssl, "
                f"{BASE_CONFIG} ({conf.n_class} classes); saved with "
                "utils.utils.save_model. No heatmap script for it: the softmax attention "
                "is recorded (attention read by a forward hook on model.attention, as the "
                "forward returns logits only).")


def case_clam(checkout: Path, commit: str, arch: str, seed: int) -> None:
    from architecture.clam import CLAM_MB, CLAM_SB
    from utils.utils import softmax_one

    conf = make_conf(checkout, BASE_CONFIG, {**BASE_ARGS, "arch": arch})
    torch.manual_seed(seed)
    model = CLAM_SB(conf) if arch == "clam_sb" else CLAM_MB(conf)
    opt = optimiser(model, conf.lr, conf.wd)
    name = f"{arch}_acmil"
    save(conf, model, opt, name)
    hook = Hook(model.attention_net)  # Sequential -> Attn_Net_Gated: (A [N, K], h)
    bags = parity_io.make_bags(conf.D_feat)
    probs, refs, preds = [], [], []
    for x in bags:
        with torch.no_grad():
            out = model(torch.from_numpy(x)[None])
        probs.append(torch.softmax(out, dim=-1)[0].numpy())
        preds.append(int(out.argmax().item()))
        raw = hook.out[0].transpose(0, 1)  # [K, N]
        ref = {}
        for k in range(raw.shape[0]):
            ref[f"raw_{k}"] = raw[k].double().numpy()
            # the authors' own normalisation, as their forward applies it (float32)
            norm = softmax_one(raw, dim=1) if arch == "clam_mb" else torch.softmax(raw, dim=-1)
            ref[f"norm_{k}"] = norm[k].double().numpy()
        refs.append(ref)
    if arch == "clam_sb":
        sources = {
            "raw/attention": {"key": "raw_0", "definition": "A_raw: the gated attention "
                              "logits (attention_net output, transposed)"},
            "attention": {"key": "norm_0", "definition": "softmax over N of A_raw (ACMIL's "
                          "CLAM_SB: plain softmax)"},
        }
        heat = "raw/attention"
        notes = "ACMIL's CLAM_SB copy normalises with plain softmax."
    else:
        sources = {}
        for c in range(conf.n_class):
            sources[f"raw/class/{c}"] = {"key": f"raw_{c}", "definition": f"A_raw[{c}]: "
                                         f"class {c}'s gated attention logits"}
            sources[f"class/{c}"] = {"key": f"norm_{c}", "definition": f"softmax_one over N "
                                     f"of A_raw[{c}]: exp / (1 + sum_N exp), ACMIL's "
                                     "utils.utils.softmax_one as its CLAM_MB applies it"}
        if len(set(preds)) != 1:
            raise SystemExit(f"{name}: bags predict different classes {preds}")
        heat = f"raw/class/{preds[0]}"
        notes = ("ACMIL's CLAM_MB copy normalises attention with softmax_one; our loader "
                 "selects attention_norm='softmax_one' from ACMIL's container. Heatmap as "
                 f"CLAM defines it, A_raw[Y_hat]; every bag here predicts class {preds[0]}.")
    write(name, arch=arch, paper="Lu et al. 2021 (CLAM), ACMIL's copy", repo=REPO,
          commit=commit, script=Path(__file__).name, bags=bags, probs=probs, refs=refs,
          sources=sources, heat=heat,
          notes=f"{notes} Step3_WSI_classification.py --arch {arch} --pretrain medical_ssl, "
                f"{BASE_CONFIG} ({conf.n_class} classes): sizes [384, 128, 128], dropout "
                "layers on (attention_net.3); saved with "
                "utils.utils.save_model.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=Path, required=True)
    args = ap.parse_args(argv)
    commit = parity_io.require_commit(args.checkout, COMMIT)
    import_authors(args.checkout)
    case_acmil(args.checkout, commit, "ga", seed=0)
    case_acmil(args.checkout, commit, "mha", seed=1)
    case_abmil_mha(args.checkout, commit, "abmil", seed=2)
    case_abmil_mha(args.checkout, commit, "mha", seed=3)
    case_clam(args.checkout, commit, "clam_sb", seed=4)
    case_clam(args.checkout, commit, "clam_mb", seed=7)
    return 0


if __name__ == "__main__":
    sys.exit(main())

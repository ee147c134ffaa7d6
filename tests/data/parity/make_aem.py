"""Parity cases from dazhangyu123/AEM: its ABMIL (our alias ``aem``) and MHA (``aem_mha``).

    python make_aem.py --checkout /tmp/authors/dazhangyu123+AEM

Repository ``dazhangyu123/AEM`` at :data:`COMMIT` (no licence file: nothing of it is copied
here; its ``architecture/transformer.py`` and ``utils/utils.py`` are imported from the
checkout at run time). Extra packages as ``make_acmil.py`` (``einops``, ``pyyaml``,
``scikit-learn``, ``h5py``; stand-ins for ``torchvision`` / ``wandb`` when absent), whose
helpers this script shares: AEM is ACMIL's code base.

Per case, as AEM's ``main.py`` does it: ``conf`` = ``config/camelyon17_config.yml`` (its
default; 4 classes) updated with main.py's argparse values (defaults, ``--arch abmil|mha``,
``--lamda 0.1`` as the README's example, ``--pretrain medical_ssl``: 384 -> 128), as AEM's
``utils.utils.Struct``; the model built with AEM's class (torch seeded), the optimiser
``AdamW(model.parameters(), lr=0.001, weight_decay=conf.wd)`` before any step; saved with
AEM's ``utils.utils.save_model`` (``{'model', 'optimizer', 'epoch', 'config'}``) as
``checkpoint-best.pth``. The forward in eval mode on ``parity_io.make_bags(384)`` as
``[1, N, D]``: ``bag_logit, attn = model(x)``; probabilities ``torch.softmax(bag_logit,
dim=-1)`` as its ``evaluate``; ``attn`` are the raw attention logits ([1, 1, N] for ABMIL,
[8, 1, N] for MHA).

AEM's repository has no heatmap script. Its regulariser acts on ``softmax(attn, -1)``, the
attention the bag is pooled with: recorded as the heatmap (``attention`` for ABMIL, the mean
over heads ``head/mean`` for MHA), next to the raw logits and each head.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_acmil as acm  # noqa: E402  (helpers only; the ACMIL checkout is not used)
import parity_io  # noqa: E402

REPO = "dazhangyu123/AEM"
COMMIT = "4a928a84354009f988e84f1382e55b7a669d2e73"
PAPER = "Zhang et al. 2024, Attention Entropy Maximization (AEM)"
CONFIG = "config/camelyon17_config.yml"
#: main.py's argparse values (defaults, --lamda 0.1 --pretrain medical_ssl)
ARGS = {"seed": 5, "wandb_mode": "disabled", "lamda": 0.1, "pretrain": "medical_ssl",
        "lr": 0.0001, "subsampling": 1.0}


def case(checkout: Path, commit: str, arch: str, seed: int) -> None:
    from architecture.transformer import ABMIL, MHA

    conf = acm.make_conf(checkout, CONFIG, {**ARGS, "arch": arch})
    torch.manual_seed(seed)
    model = ABMIL(conf) if arch == "abmil" else MHA(conf)
    opt = acm.optimiser(model, 0.001, conf.wd)
    name = f"aem_{arch}_dazhangyu123"
    acm.save(conf, model, opt, name)
    bags = parity_io.make_bags(conf.D_feat)
    probs, refs = [], []
    for x in bags:
        with torch.no_grad():
            bag_logit, attn = model(torch.from_numpy(x)[None])
        probs.append(torch.softmax(bag_logit, dim=-1)[0].numpy())
        refs.append(acm.softmax_sources(attn[0], "") if arch == "abmil"
                    else acm.mha_refs(attn))
    if arch == "abmil":
        sources, heat, ours = acm.abmil_sources(), "attention", "aem"
    else:
        sources, heat, ours = acm.mha_sources(8), "head/mean", "aem_mha"
    acm.write(name, arch=ours, paper=PAPER, repo=REPO, commit=commit,
              script=Path(__file__).name, bags=bags, probs=probs, refs=refs,
              sources=sources, heat=heat, load={"arch": ours},
              notes=f"main.py --arch {arch} --lamda 0.1 --pretrain medical_ssl, {CONFIG} "
                    f"({conf.n_class} classes); saved with utils.utils.save_model. AEM has no "
                    "heatmap script: the softmax attention its entropy regulariser acts on is "
                    "recorded. Loaded with arch='" + ours + "' (the weights alone read as "
                    f"'{'abmil' if arch == 'abmil' else 'mha'}', the same model at inference).")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=Path, required=True)
    args = ap.parse_args(argv)
    commit = parity_io.require_commit(args.checkout, COMMIT)
    acm.import_authors(args.checkout)
    case(args.checkout, commit, "abmil", seed=0)
    case(args.checkout, commit, "mha", seed=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

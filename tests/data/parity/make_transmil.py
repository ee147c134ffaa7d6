"""Parity case ``transmil_official``: the official TransMIL (Shao et al., NeurIPS 2021).

    python make_transmil.py --checkout /tmp/authors/szc19990412+TransMIL

Environment (outside the repository): ``torch==2.13.0 numpy einops nystrom-attention==0.0.9
addict pyyaml pytorch-lightning==1.9.5 "setuptools<70"`` (the official requirements pin
nystrom-attention 0.0.9 and pytorch-lightning 1.2.3; 1.2.3 does not import on Python 3.11
with torch 2.x, 1.9.5 is the last 1.x release and writes the same checkpoint container plus
its ``loops`` entry). The script refuses any other nystrom-attention release.

What it does, the way the official ``train.py`` does it:

* the config: ``Camelyon/TransMIL.yaml`` read with the authors' ``read_yaml`` (an
  ``addict.Dict``), updated as ``train.py`` updates it, ``log_path`` a ``pathlib`` path
  ``logs/Camelyon/TransMIL/fold0``;
* the model: the authors' ``models.TransMIL.TransMIL(n_classes=2)`` (1024 -> 512 is hard-coded:
  the checkpoint is about 10 MB) inside a LightningModule holding it as ``self.model`` and
  calling ``save_hyperparameters()`` with the arguments ``train.py`` passes to its
  ``ModelInterface`` (``model``, ``loss``, ``optimizer``, ``data``, ``log``). The official
  ``ModelInterface`` itself needs torchmetrics' pre-0.7 API, ``MyOptimizer`` and a dataset;
  its state_dict holds nothing but ``model.*`` (the loss and the metrics keep no persistent
  state), so this module's checkpoint has the same keys;
* one epoch on two seeded bags, without an optimisation step (nystrom-attention 0.0.9's
  in-place ``q *= self.scale`` on a view fails under torch 2.x autograd; the weights are
  the seeded initialisation), validated and saved by the official callback,
  ``ModelCheckpoint(monitor='val_loss', filename='{epoch:02d}-{val_loss:.4f}',
  save_top_k=1, mode='min', save_weights_only=True)`` (``save_last`` off here: ``last.ckpt``
  would be a second copy of the same weights), so the file is ``epoch=00-val_loss=X.ckpt``
  with ``{'epoch', 'global_step', 'pytorch-lightning_version', 'state_dict',
  'loops', 'hparams_name', 'hyper_parameters'}``.

The authors' forward calls ``.cuda()`` on the class token; the script runs on the CPU and
makes ``Tensor.cuda`` return the tensor itself while it runs.

Recorded per bag (``parity_io.make_bags(1024)``: 7, 64 and 301 instances), in eval mode:
``Y_prob`` (softmax of the logits) and, from each ``TransLayer``'s ``NystromAttention`` called
with ``return_attn=True`` (the full ``attn1 @ pinv(attn2) @ attn3`` matrix, [1, 8, L, L] over
the front-padded sequence of L = n + p rows): the class token's row (padded index p, the
row of the token the model prepends to the bag), the columns of the S^2 instance tokens
(p+1 ... p+S^2), the wrap-around copies added back onto the instances they copy; per
layer the head mean, layer 2's heads, and the rollout ``cls row of (I + A2)/2 @ (I + A1)/2``
with A_l the head-mean matrices. The paper's heatmap is layer 2's head mean (the layer that
feeds the classifier).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parity_io  # noqa: E402

REPO = "szc19990412/TransMIL"
COMMIT = "9d6aee57c7c72375fb9132dc58cd8c9b0f0a949c"
CASE = "transmil_official"
NYSTROM = "0.0.9"


def fold(row: np.ndarray, pad: int, n: int) -> np.ndarray:
    """Instance columns of a padded row [L] -> [n], wrap-around copies added back."""
    side = int(np.ceil(np.sqrt(n)))
    cols = row[pad + 1: pad + 1 + side * side]
    out = np.zeros(n)
    np.add.at(out, np.arange(side * side) % n, cols)
    return out


def capture(model) -> list:
    """Make both TransLayers keep their full attention matrix (``return_attn=True``)."""
    seen: list = []
    for layer in (model.layer1, model.layer2):
        attn = layer.attn
        orig = attn.forward

        def fwd(x, mask=None, return_attn=False, _orig=orig):
            out, a = _orig(x, mask=mask, return_attn=True)
            seen.append(a.detach())
            return out

        attn.forward = fwd
    return seen


def references(attns: list, n: int, num_landmarks: int) -> dict[str, np.ndarray]:
    """The compared sources from the two layers' [1, H, L, L] attention matrices."""
    a1, a2 = (a[0].double().numpy() for a in attns)
    length = a1.shape[-1]
    pad = length - (1 + int(np.ceil(np.sqrt(n))) ** 2)
    assert pad == (num_landmarks - (length - pad) % num_landmarks) % num_landmarks
    out = {"layer1_mean": fold(a1.mean(0)[pad], pad, n),
           "layer2_mean": fold(a2.mean(0)[pad], pad, n)}
    for h in range(a2.shape[0]):
        out[f"layer2_head{h}"] = fold(a2[h, pad], pad, n)
    eye = np.eye(length)
    roll = ((eye + a2.mean(0)) / 2 @ (eye + a1.mean(0)) / 2)[pad]
    out["rollout"] = fold(roll, pad, n)
    return out


SOURCES = {
    "layer2/mean": {"key": "layer2_mean", "definition": (
        "layer 2 attention (return_attn=True), head mean, the class token's row (padded index "
        "p), instance columns p+1..p+S^2 with the wrap-around copies added back")},
    "layer1/mean": {"key": "layer1_mean", "definition": "the same for layer 1"},
    **{f"layer2/head/{h}": {"key": f"layer2_head{h}", "definition": f"layer 2, head {h}"}
       for h in range(8)},
    "rollout": {"key": "rollout", "definition": (
        "class token's row of (I + A2)/2 @ (I + A1)/2, A_l the head-mean matrices, folded")},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=Path, required=True)
    args = ap.parse_args()
    commit = parity_io.require_commit(args.checkout, COMMIT)
    if md.version("nystrom-attention") != NYSTROM:
        raise SystemExit(f"needs nystrom-attention=={NYSTROM} (the official pin), found "
                         f"{md.version('nystrom-attention')}")
    sys.path.insert(0, str(args.checkout))
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from utils.utils import read_yaml

    # models/__init__.py imports the training interface (pandas, MyOptimizer, torchmetrics'
    # old API): load the model file alone
    spec = importlib.util.spec_from_file_location("authors_transmil",
                                                  args.checkout / "models" / "TransMIL.py")
    authors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(authors)
    TransMIL = authors.TransMIL

    torch.Tensor.cuda = lambda self, *a, **k: self  # the authors' forward moves cls to CUDA
    pl.seed_everything(0)
    torch.manual_seed(0)

    # the config, as train.py builds it
    cfg = read_yaml(str(args.checkout / "Camelyon/TransMIL.yaml"))
    cfg.config = "Camelyon/TransMIL.yaml"
    cfg.General.gpus = [2]
    cfg.General.server = "train"
    cfg.Data.fold = 0
    cfg.log_path = (Path(cfg.General.log_path) / Path(cfg.config).parent
                    / Path(cfg.config).name[:-5] / f"fold{cfg.Data.fold}")

    class ModelInterface(pl.LightningModule):
        def __init__(self, model, loss, optimizer, **kargs):
            super().__init__()
            self.save_hyperparameters()
            self.model = TransMIL(n_classes=model.n_classes)
            self.loss = torch.nn.CrossEntropyLoss()
            self.n_classes = model.n_classes
            self.log_path = kargs["log"]

        def training_step(self, batch, batch_idx):
            # no optimisation step: nystrom-attention 0.0.9 scales q in place on a view
            # (``q *= self.scale``), which torch 2.x autograd refuses; the weights stay the
            # seeded initialisation
            return None

        def validation_step(self, batch, batch_idx):
            data, label = batch
            logits = self.model(data=data)["logits"]
            self.log("val_loss", self.loss(logits, label))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=cfg.Optimizer.lr)

    module = ModelInterface(model=cfg.Model, loss=cfg.Loss, optimizer=cfg.Optimizer,
                            data=cfg.Data, log=cfg.log_path)
    gen = torch.Generator().manual_seed(1)
    train = [(torch.randn(1, n, 1024, generator=gen), torch.tensor([i % 2]))
             for i, n in enumerate((40, 90))]
    loader = torch.utils.data.DataLoader(train, batch_size=None)
    folder = parity_io.HERE / CASE
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.ckpt"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_cb = ModelCheckpoint(monitor="val_loss", dirpath=tmp,
                                  filename="{epoch:02d}-{val_loss:.4f}", verbose=True,
                                  save_last=False, save_top_k=1, mode="min",
                                  save_weights_only=True)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                             callbacks=[ckpt_cb], num_sanity_val_steps=0,
                             enable_progress_bar=False, enable_model_summary=False,
                             deterministic=True, check_val_every_n_epoch=1)
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
        saved = Path(ckpt_cb.best_model_path)
        shutil.copy(saved, folder / saved.name)
    ckpt_name = saved.name
    stored = torch.load(folder / ckpt_name, weights_only=False)
    print("container:", sorted(stored), "keys:", len(stored["state_dict"]),
          "first:", next(iter(stored["state_dict"])))
    net = TransMIL(n_classes=cfg.Model.n_classes)
    net.load_state_dict({k.removeprefix("model."): v for k, v in stored["state_dict"].items()})
    net.eval()
    seen = capture(net)

    bags = parity_io.make_bags(1024)
    probs, refs = [], []
    with torch.no_grad():
        for x in bags:
            seen.clear()
            out = net(data=torch.from_numpy(x)[None])
            probs.append(out["Y_prob"][0].double().numpy())
            refs.append(references(seen, x.shape[0], num_landmarks=256))
            print(f"N={x.shape[0]}: probs {probs[-1].round(4)}")
    parity_io.write_case(
        CASE, arch="transmil", paper="TransMIL (Shao et al., NeurIPS 2021)", repo=REPO,
        commit=commit, script=Path(__file__).name, checkpoint=ckpt_name, bags=bags,
        probs=probs, sources=SOURCES, refs=refs, heatmap_source="layer2/mean",
        notes=(f"official repository, nystrom-attention {NYSTROM} (its pin: the first n rows "
               "kept after front padding). Saved by PyTorch Lightning "
               f"{pl.__version__}'s ModelCheckpoint as train.py configures it "
               "(save_weights_only; hyper_parameters with addict.Dict sections and a "
               "PosixPath 'log'); our loader must pick nystrom 0.0.9 from the container "
               "alone (load = {})."
               " Neither the official repository nor ACMIL ships a TransMIL heatmap script "
               "(ACMIL's Step4 only visualises models that return attention scores), so the "
               "heatmap follows the paper's description: the class token's attention row of "
               "the last layer."))


if __name__ == "__main__":
    main()

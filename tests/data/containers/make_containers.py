"""Write the config-container fixtures of ``tests/test_inert.py``.

Run in a throwaway environment that has the real packages (they never enter the project's
environment; reading the files needs none of them)::

    python3 -m venv /tmp/penv && /tmp/penv/bin/pip install torch==2.13.0 numpy addict \
        omegaconf easydict pytorch-lightning==1.9.5
    /tmp/penv/bin/python tests/data/containers/make_containers.py
    # older omegaconf pickles (Hydra 1.0 / 1.1 era), each in its own environment:
    python3 -m venv /tmp/penv20 && /tmp/penv20/bin/pip install torch==2.13.0 numpy \
        omegaconf==2.0.6   # likewise 2.1.2
    /tmp/penv20/bin/python tests/data/containers/make_containers.py --omegaconf-only

Files (a few KB each, tiny random weights):

``transmil_lightning_like.ckpt``
    What TransMIL's official ``train.py`` saves: a PyTorch Lightning 1.x ``Trainer.fit``
    with ``ModelCheckpoint(save_weights_only=True)``; the LightningModule calls
    ``save_hyperparameters()`` with ``model`` / ``loss`` / ``optimizer`` / ``data`` sections
    that are ``addict.Dict`` objects (TransMIL reads its YAML into one) and ``log`` a
    ``pathlib.PosixPath``. Keys: ``epoch``, ``global_step``, ``pytorch-lightning_version``,
    ``state_dict`` (``model.``-prefixed), ``loops``, ``hparams_name``, ``hyper_parameters``.
``lightning_full_state.ckpt``
    The same run saved with ``Trainer.save_checkpoint`` (not weights-only): adds
    ``optimizer_states``, ``lr_schedulers`` and ``callbacks`` (EarlyStopping and
    ModelCheckpoint states).
``omegaconf_hparams.ckpt``
    Lightning with an ``omegaconf.DictConfig`` as hyper-parameters (Hydra-style): a
    ``ListConfig``, an interpolation, a ``PathNode``; Lightning
    also stores ``hparams_type`` (the DictConfig class itself).
``omegaconf_2.0.6.ckpt``, ``omegaconf_2.1.2.ckpt`` (``--omegaconf-only``)
    ``{'state_dict': ..., 'hyper_parameters': DictConfig}`` written with that omegaconf
    version (no Lightning): nested sections, a list, an interpolation, ``???``, None.
``namespace_args.pth``
    ``{'model': state_dict, 'args': argparse.Namespace(...)}`` (argparse training scripts).
``easydict_config.pth``
    ``{'model_state_dict': state_dict, 'cfg': easydict.EasyDict(...)}``.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import warnings

import torch
from omegaconf import OmegaConf
from torch import nn

if "--omegaconf-only" not in sys.argv:
    import addict
    import easydict
    import pytorch_lightning as pl
    _Module = pl.LightningModule
else:
    _Module = nn.Module

OUT = pathlib.Path(__file__).resolve().parent
SEED = 0


def _bags():
    g = torch.Generator().manual_seed(SEED)
    return [(torch.randn(1, 5, 8, generator=g), torch.tensor([i % 2])) for i in range(4)]


class _Bags(torch.utils.data.Dataset):
    def __init__(self):
        self.items = _bags()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        x, y = self.items[i]
        return x[0], y[0]


class ModelInterface(_Module):
    """Shaped like TransMIL's ``models/model_interface.py`` (a tiny network inside)."""

    def __init__(self, model, loss, optimizer, **kargs):
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, model.n_classes))
        self.optimizer = optimizer

    def forward(self, x):
        return self.model(x).mean(0, keepdim=True)

    def _loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self(x[0]), y)

    def training_step(self, batch, _):
        return self._loss(batch)

    def validation_step(self, batch, _):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.optimizer.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1)]


class DictConfigModule(ModelInterface):
    """Lightning with an omegaconf DictConfig as its hyper-parameters."""

    def __init__(self, cfg):  # noqa: D107
        pl.LightningModule.__init__(self)
        self.save_hyperparameters(cfg)
        self.model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        self.optimizer = addict.Dict(lr=cfg.optimizer.lr)


def _loader():
    return torch.utils.data.DataLoader(_Bags(), batch_size=1)


def _fit(module, work: pathlib.Path, weights_only: bool) -> tuple[pl.Trainer, pathlib.Path]:
    ckpt = pl.callbacks.ModelCheckpoint(monitor="val_loss", dirpath=str(work),
                                        filename="{epoch:02d}-{val_loss:.4f}",
                                        save_top_k=1, mode="min",
                                        save_weights_only=weights_only)
    early = pl.callbacks.EarlyStopping(monitor="val_loss", min_delta=0.0, patience=10,
                                       mode="min")
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=[early, ckpt],
                         num_sanity_val_steps=0, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True)
    trainer.fit(module, _loader(), _loader())
    return trainer, pathlib.Path(ckpt.best_model_path)


def omegaconf_only() -> None:
    """``omegaconf_<version>.ckpt`` with the omegaconf installed here."""
    import omegaconf

    g = torch.Generator().manual_seed(SEED)
    sd = {"model.fc.weight": torch.randn(2, 8, generator=g)}
    cfg = OmegaConf.create({
        "model": {"name": "TransMIL", "n_classes": 2, "dims": [64, 32],
                  "tag": "${model.name}", "dropout": 0.25, "bias": True, "ckpt": None},
        "data": {"fold": 0, "missing": "???"},
    })
    name = f"omegaconf_{omegaconf.__version__}.ckpt"
    torch.save({"epoch": 1, "state_dict": sd, "hyper_parameters": cfg}, OUT / name)
    print(f"{name}: {(OUT / name).stat().st_size} bytes")


def main() -> None:
    if "--omegaconf-only" in sys.argv:
        omegaconf_only()
        return
    warnings.filterwarnings("ignore")
    pl.seed_everything(SEED)
    yaml_cfg = {
        "General": {"seed": 2021, "epochs": 200, "log_path": "logs/"},
        "Data": {"dataset_name": "camel_data", "data_shuffle": False,
                 "data_dir": "Camelyon16/pt_files/", "label_dir": "dataset_csv/camelyon16/",
                 "fold": 0, "nfold": 4,
                 "train_dataloader": {"batch_size": 1, "num_workers": 8},
                 "test_dataloader": {"batch_size": 1, "num_workers": 8}},
        "Model": {"name": "TransMIL", "n_classes": 2},
        "Optimizer": {"opt": "lookahead_radam", "lr": 0.0002, "opt_eps": None,
                      "opt_betas": None, "momentum": None, "weight_decay": 0.00001},
        "Loss": {"base_loss": "CrossEntropyLoss"},
    }
    cfg = addict.Dict(yaml_cfg)  # TransMIL's read_yaml
    cfg.log_path = pathlib.Path("logs/") / "Camelyon" / "TransMIL"
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        module = ModelInterface(model=cfg.Model, loss=cfg.Loss, optimizer=cfg.Optimizer,
                                data=cfg.Data, log=cfg.log_path)
        trainer, best = _fit(module, work / "a", weights_only=True)
        shutil.copyfile(best, OUT / "transmil_lightning_like.ckpt")
        trainer.save_checkpoint(OUT / "lightning_full_state.ckpt")

        pl.seed_everything(SEED)
        ocfg = OmegaConf.create({
            "model": {"name": "TransMIL", "n_classes": 2, "dims": [64, 32],
                      "tag": "${model.name}"},
            "optimizer": {"lr": 0.0002, "betas": [0.9, 0.999]},
            "log": pathlib.Path("logs/run1"),
        })
        _, best = _fit(DictConfigModule(ocfg), work / "b", weights_only=True)
        shutil.copyfile(best, OUT / "omegaconf_hparams.ckpt")

    g = torch.Generator().manual_seed(SEED)
    sd = {"fc.weight": torch.randn(2, 16, generator=g), "fc.bias": torch.randn(2, generator=g)}
    args = argparse.Namespace(n_classes=2, lr=1e-4, feats_dir="/data/feats", seed=SEED,
                              log_dir=pathlib.PosixPath("/runs/mil/fold0"), folds=[0, 1])
    torch.save({"model": sd, "args": args, "epoch": 3}, OUT / "namespace_args.pth")
    ecfg = easydict.EasyDict({"model": {"n_classes": 2, "in_dim": 16}, "lr": 1e-4,
                              "folds": [0, 1]})
    torch.save({"model_state_dict": sd, "cfg": ecfg}, OUT / "easydict_config.pth")
    for p in sorted(OUT.glob("*.*")):
        if p.suffix in (".ckpt", ".pth"):
            print(f"{p.name}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()

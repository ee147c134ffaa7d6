"""Train the shipped demo encoder and demo ACMIL-GA on synthetic slides.

    python sample_data/train_demo_model.py            # writes napari_milview/assets/demo_*
    python sample_data/train_demo_model.py --out /tmp/demo --work /tmp/slides

Recipe (every seed fixed; a few minutes on 2 CPU cores):

1. Slides: ``write_synthetic_slide`` at 4096 x 3072 px, 0.5 um/px, 3 levels. Training seeds
   1000-1015 (even seed: planted lesion, odd: none), validation seeds 1500-1505 (same
   rule). The tests use seeds outside 1000-1999.
2. Patches: ``tissue.patch_grid(patch_px=64, patch_um=64)`` (64 um = 128 level-0 px,
   box-resized to 64 x 64 at 1 um/px), ``min_tissue=0.25``. A patch's lesion fraction is its
   area overlap with ``OUT.lesion.png``; it is a lesion patch when its centre pixel is in the
   mask or the overlap is >= 50 %.
3. Encoder (``features/encoders/demo.py``, 64-d) plus a linear head, trained as a patch
   classifier: lesion patches (overlap >= 50 %) vs normal ones (overlap 0), patches in
   between left out, classes balanced by sampling, random flips / 90-degree rotations,
   AdamW. The head is then dropped and the encoder frozen.
4. Features: every patch of every slide through ``pipeline.extract_bag`` (the path the
   plugin and the tests take).
5. ACMIL-GA (in 64, inner 64, attention 64, K = 5 branches, STKIM 10 / 0.6 active in
   training), bag labels only: CE(slide logits) + CE(each branch's logits). ACMIL's third
   term, the mean pairwise cosine similarity of the branches' attention, is left out
   (``DIVERSITY = 0``): on these small bags it drove 2 of the 5 branches onto normal
   tissue (top-20 hit rate 0.6 instead of 1.0 with weight 1). Bags per epoch: every
   training slide in full and a random 60-100 % subset of it. AdamW, cosine learning rate.
6. Validation on the held-out slides: slide accuracy and the top-20 hit rate (share of the
   20 most attended patches, default source ``branch/mean``, that are lesion patches).

Writes ``demo_encoder.safetensors`` + ``.json`` (spec, widths, recipe) and
``demo_acmil.safetensors`` + ``.json`` (``mil.checkpoint.save_model``: the model card with
classes ``["normal", "lesion"]``, feature dim 64, encoder ``demo``, patch size 64 um; the
sidecar also holds ``training``: seeds, sizes, epochs, losses and validation metrics).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from napari_milview.assets import ASSETS
from napari_milview.features.encoders import demo as demo_enc
from napari_milview.features.encoders import preprocess
from napari_milview.mil import ModelCard, build_model
from napari_milview.mil.checkpoint import save_model, sidecar_path
from napari_milview.pipeline import collect, extract_bag
from napari_milview.slide import open_slide
from napari_milview.synthetic import write_synthetic_slide
from napari_milview.tissue import patch_grid, read_patches

SLIDE = {"width": 4096, "height": 3072, "mpp": 0.5, "tile": 256, "levels": 3}
GRID = {"patch_px": 64, "patch_um": 64.0, "min_tissue": 0.25}
TRAIN_SEEDS = list(range(1000, 1016))
VAL_SEEDS = list(range(1500, 1506))
CLASSES = ["normal", "lesion"]
ENC_EPOCHS = 4
ENC_LR = 2e-3
MIL_EPOCHS = 40
MIL_LR = 1e-3
DIVERSITY = 0.0  # weight of ACMIL's branch-diversity loss (see the module docstring)
MIL_HPARAMS = {"in_dim": 64, "n_classes": 2, "inner_dim": 64, "n_token": 5, "attn_dim": 64,
               "n_masked_patch": 10, "mask_drop": 0.6}
TOP_K = 20


def lesion_fraction(coords: np.ndarray, side: int, mask: np.ndarray, ds: int) -> np.ndarray:
    """Area share of each patch covered by the lesion mask.

    Parameters
    ----------
    coords : [N, 2] int64 level-0 (x, y) top-left corners.
    side : patch side in level-0 pixels.
    mask : [h, w] bool lesion mask, one pixel per ``ds`` x ``ds`` level-0 block.

    Returns
    -------
    [N] float64 in [0, 1].
    """
    out = np.zeros(len(coords))
    edges = np.arange(max(mask.shape) + 1) * ds

    def weights(start: int, n: int) -> np.ndarray:  # overlap of [start, start+side) per cell
        lo = np.clip(edges[:n], start, start + side)
        hi = np.clip(edges[1:n + 1], start, start + side)
        return (hi - lo) / side

    for i, (x, y) in enumerate(coords):
        out[i] = weights(int(y), mask.shape[0]) @ mask @ weights(int(x), mask.shape[1])
    return out


def lesion_patches(coords: np.ndarray, side: int, mask: np.ndarray, ds: int) -> np.ndarray:
    """[N] bool: the centre pixel is in the mask, or the overlap is >= 50 %."""
    c = coords + side // 2
    r = np.clip(c[:, 1] // ds, 0, mask.shape[0] - 1)
    q = np.clip(c[:, 0] // ds, 0, mask.shape[1] - 1)
    return mask[r, q] | (lesion_fraction(coords, side, mask, ds) >= 0.5)


def make_slides(work: Path, seeds: list[int]) -> list[dict]:
    """Write (or reuse) the slides; return one record per slide with its grid and truth."""
    out = []
    for seed in seeds:
        lesion = seed % 2 == 0
        path = work / f"synth-{seed}.svs"
        side_json = path.with_suffix(".json")
        if not (path.exists() and side_json.exists()):
            write_synthetic_slide(path, seed=seed, lesion=lesion, workers=2, **SLIDE)
        meta = json.loads(side_json.read_text())
        slide = open_slide(path)
        grid = patch_grid(slide, **GRID)
        mask = np.asarray(Image.open(path.with_suffix(".lesion.png"))) > 0
        ds = int(meta["mask_downsample"])
        frac = lesion_fraction(grid.coords, grid.patch_size_level0, mask.astype(float), ds)
        inside = lesion_patches(grid.coords, grid.patch_size_level0, mask, ds)
        out.append({"seed": seed, "lesion": lesion, "slide": slide, "grid": grid,
                    "frac": frac, "inside": inside})
    return out


def train_encoder(slides: list[dict], seed: int) -> tuple[demo_enc.DemoEncoder, dict]:
    """Patch classifier (lesion vs normal); returns the trunk and its training record."""
    xs, ys = [], []
    for s in slides:
        keep = (s["frac"] >= 0.5) | (s["frac"] == 0)
        idx = np.nonzero(keep)[0]
        xs.append(read_patches(s["slide"], s["grid"], idx))
        ys.append((s["frac"][idx] >= 0.5).astype(np.int64))
    x_all = preprocess(np.concatenate(xs), demo_enc.SPEC)
    y_all = torch.from_numpy(np.concatenate(ys))
    n_pos, n_neg = int(y_all.sum()), int((1 - y_all).sum())
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = demo_enc.DemoEncoder()
    head = torch.nn.Linear(demo_enc.SPEC.dim, 2)
    params = [*net.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=ENC_LR, weight_decay=1e-4)
    w = torch.where(y_all == 1, 0.5 / n_pos, 0.5 / n_neg)
    per_epoch = len(y_all) // 64 * 64
    steps = ENC_EPOCHS * (per_epoch // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=ENC_LR, total_steps=steps)
    net.train()
    losses = []
    for epoch in range(ENC_EPOCHS):
        order = torch.multinomial(w, per_epoch, replacement=True, generator=g)
        tot = 0.0
        for b in range(per_epoch // 64):
            idx = order[b * 64:(b + 1) * 64]
            xb = x_all[idx]
            k = int(torch.randint(4, (1,), generator=g))
            xb = torch.rot90(xb, k, dims=(2, 3))
            if torch.rand(1, generator=g) < 0.5:
                xb = xb.flip(3)
            loss = F.cross_entropy(head(net(xb)), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach())
        losses.append(round(tot / (per_epoch // 64), 4))
        print(f"  encoder epoch {epoch + 1}/{ENC_EPOCHS}: loss {losses[-1]:.4f}", flush=True)
    net.eval()
    with torch.inference_mode():
        pred = torch.cat([head(net(x_all[i:i + 512])).argmax(1)
                          for i in range(0, len(x_all), 512)])
    acc = float((pred == y_all).float().mean())
    rec = {"seed": seed, "epochs": ENC_EPOCHS, "lr": ENC_LR, "optimizer": "AdamW + one-cycle",
           "batch": 64, "patches": {"lesion": n_pos, "normal": n_neg}, "losses": losses,
           "train_patch_accuracy": round(acc, 4)}
    return net, rec


def bags(slides: list[dict], encoder: torch.nn.Module) -> None:
    """Add ``feats`` [N, 64] float32 to each record (via pipeline.extract_bag)."""
    for s in slides:
        bag = collect(extract_bag(s["slide"], s["grid"], encoder, batch_size=128, device="cpu",
                                  workers=2))
        s["feats"] = torch.from_numpy(np.ascontiguousarray(bag.features))


def acmil_loss(model, x: torch.Tensor, y: int) -> torch.Tensor:
    """ACMIL's objective: slide CE + branch CE (+ ``DIVERSITY`` x branch similarity)."""
    out = model.forward_attention(x)
    k = model.n_token
    target = torch.tensor([y])
    loss = F.cross_entropy(out.logits[None], target)
    loss = loss + F.cross_entropy(out.aux["branch_logits"], target.repeat(k))
    if not DIVERSITY:
        return loss
    a = torch.stack([out.sources[f"branch/{i}"] for i in range(k)])  # [K, N]
    sim = F.cosine_similarity(a[:, None], a[None], dim=-1)  # [K, K]
    iu = torch.triu_indices(k, k, 1)
    return loss + DIVERSITY * sim[iu[0], iu[1]].mean()


def evaluate(model, slides: list[dict]) -> dict:
    """Slide accuracy and mean top-K hit rate (lesion slides) of ``model`` in eval mode."""
    model.eval()
    correct, hits, per = 0, [], []
    with torch.inference_mode():
        for s in slides:
            out = model.forward_attention(s["feats"])
            pred = int(out.logits.argmax())
            correct += pred == int(s["lesion"])
            row = {"seed": s["seed"], "lesion": s["lesion"], "pred": CLASSES[pred],
                   "p_lesion": round(float(out.probs[1]), 4), "n": len(s["feats"]),
                   "n_lesion_patches": int(s["inside"].sum())}
            if s["lesion"]:
                top = torch.argsort(out.sources[out.default_source], descending=True)[:TOP_K]
                hit = float(s["inside"][top.numpy()].mean())
                hits.append(hit)
                row["top20_hit"] = round(hit, 3)
            per.append(row)
    return {"accuracy": correct / len(slides),
            "top20_hit_mean": float(np.mean(hits)) if hits else None,
            "top20_hit_min": float(np.min(hits)) if hits else None, "slides": per}


def train_mil(slides: list[dict], seed: int) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model("acmil_ga", **MIL_HPARAMS).train()
    opt = torch.optim.AdamW(model.parameters(), lr=MIL_LR, weight_decay=1e-4)
    n_bags = 2 * len(slides)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=MIL_EPOCHS * n_bags)
    losses = []
    for epoch in range(MIL_EPOCHS):
        items = []
        for s in slides:
            n = len(s["feats"])
            items.append((s["feats"], int(s["lesion"])))
            sub = np.sort(rng.choice(n, int(n * rng.uniform(0.6, 1.0)), replace=False))
            if s["lesion"] and not s["inside"][sub].any():
                sub = np.union1d(sub, np.nonzero(s["inside"])[0])
            items.append((s["feats"][sub], int(s["lesion"])))
        tot = 0.0
        model.train()
        for j in rng.permutation(len(items)):
            x, y = items[j]
            loss = acmil_loss(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach())
        losses.append(round(tot / len(items), 4))
        if (epoch + 1) % 10 == 0:
            print(f"  MIL epoch {epoch + 1}/{MIL_EPOCHS}: loss {losses[-1]:.4f}", flush=True)
    model.eval()
    rec = {"seed": seed, "epochs": MIL_EPOCHS, "lr": MIL_LR, "optimizer": "AdamW + cosine",
           "weight_decay": 1e-4, "bags_per_epoch": n_bags,
           "loss": "CE(slide) + CE(branches)" + (
               f" + {DIVERSITY} x mean pairwise cosine(branch attention)" if DIVERSITY else ""),
           "losses_every_10": losses[9::10]}
    return model, rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ASSETS, help="where the assets are written")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the synthetic slides (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0, help="torch / numpy seed of the training")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"writing {len(TRAIN_SEEDS) + len(VAL_SEEDS)} synthetic slides to {work}",
              flush=True)
        train = make_slides(work, TRAIN_SEEDS)
        val = make_slides(work, VAL_SEEDS)
        t_slides = time.perf_counter() - t0
        print(f"  {sum(len(s['grid']) for s in train)} training patches "
              f"({t_slides:.0f} s)", flush=True)

        print("training the demo encoder", flush=True)
        net, enc_rec = train_encoder(train, args.seed)
        enc_path = demo_enc.save(net, args.out / "demo_encoder.safetensors", training={
            "script": "sample_data/train_demo_model.py", "slides": SLIDE, "grid": GRID,
            "train_seeds": TRAIN_SEEDS, **enc_rec})
        encoder = demo_enc.load(enc_path)

        print("extracting features", flush=True)
        bags(train + val, encoder)
        print("training ACMIL-GA", flush=True)
        model, mil_rec = train_mil(train, args.seed)
        metrics = evaluate(model, val)
        train_metrics = evaluate(model, train)
        for s in train + val:
            s["slide"].close()
    print(f"validation: accuracy {metrics['accuracy']:.3f}, top-{TOP_K} hit rate mean "
          f"{metrics['top20_hit_mean']:.3f} (min {metrics['top20_hit_min']:.3f}); "
          f"training accuracy {train_metrics['accuracy']:.3f}", flush=True)
    for row in metrics["slides"]:
        print(f"  {row}")

    card = ModelCard(
        arch="acmil_ga", hparams=dict(model.hparams), classes=CLASSES, feature_dim=64,
        encoder=demo_enc.SPEC.name, patch_size_um=GRID["patch_um"],
        notes=(f"demo model: sample_data/train_demo_model.py on synthetic slides (seeds "
               f"{TRAIN_SEEDS[0]}-{TRAIN_SEEDS[-1]}); validation accuracy "
               f"{metrics['accuracy']:.2f}, top-{TOP_K} hit rate "
               f"{metrics['top20_hit_mean']:.2f}"),
    )
    path = save_model(model, card, args.out / "demo_acmil.safetensors")
    side = sidecar_path(path)
    data = json.loads(side.read_text())
    data["training"] = {
        "script": "sample_data/train_demo_model.py", "slides": SLIDE, "grid": GRID,
        "train_seeds": TRAIN_SEEDS, "val_seeds": VAL_SEEDS,
        "lesion_rule": "even seed: planted lesion; odd seed: none",
        "bags": "each training slide in full + a random 60-100 % subset, bag labels only",
        **mil_rec, "validation": metrics, "train_accuracy": train_metrics["accuracy"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    side.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for p in args.out.glob("demo_*"):
        p.chmod(0o644)  # package data: readable by all (atomic writes create 0600 files)
    size = sum(p.stat().st_size for p in args.out.glob("demo_*"))
    print(f"wrote {enc_path.name}, {path.name} (+ .json) to {args.out}: {size / 1e3:.0f} KB, "
          f"{time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``milview extract`` and ``milview attend``: real slides, real h5 files, real checkpoints."""

from __future__ import annotations

import json
import warnings

import h5py
import numpy as np
import pytest
import torch

from napari_milview.cli import main
from napari_milview.mil import ModelCard, build_model
from napari_milview.mil.checkpoint import save_model

D = 8  # feature dimension of the hand-written bags


def _json_line(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return json.loads(out[0])


def _error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


def _checkpoint(tmp_path, dim: int, arch: str = "acmil_ga", classes=("normal", "lesion"),
                name: str = "model") -> tuple[str, torch.nn.Module]:
    torch.manual_seed(1)
    hp = {"in_dim": dim, "n_classes": len(classes)}
    if arch == "acmil_ga":
        hp.update(inner_dim=16, n_token=3, attn_dim=8)
    model = build_model(arch, **hp)
    card = ModelCard(arch=arch, hparams=dict(model.hparams), classes=list(classes),
                     feature_dim=dim)
    path = tmp_path / f"{name}.safetensors"
    save_model(model, card, path)
    return str(path), model


def _bag_arrays(n: int = 12, dim: int = D, step: int = 512, seed: int = 0):
    rng = np.random.default_rng(seed)
    idx = np.arange(n)
    coords = np.stack([(idx % 4) * step, (idx // 4) * step], axis=1)
    return rng.standard_normal((n, dim)).astype(np.float32), coords


def _check_result(path, feats, coords, model) -> None:
    """RESULT.h5 holds coords, the default source as ``attention`` and every source."""
    with torch.inference_mode():
        out = model.forward_attention(torch.from_numpy(feats))
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["coords"][()], coords)
        att = f["attention"][()]
        assert att.shape == (len(coords),)
        np.testing.assert_allclose(att, out.source().numpy(), rtol=1e-5, atol=1e-7)
        names = {f["sources"][k].attrs["name"] for k in f["sources"]}
        names = {n.decode() if isinstance(n, bytes) else n for n in names}
        assert names == set(out.sources)


# ------------------------------------------------------------------ extract -> attend
# The demo encoder and demo model ship with the package (napari_milview/assets, package data):
# nothing here skips when they fail to load; a missing or broken asset is a failure.


class _TinyCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 12, 5, stride=4)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def ts_encoder_args(tmp_path_factory):
    """``--encoder torchscript --weights FILE``: a user's TorchScript encoder (64 px, 1 um/px)."""
    path = tmp_path_factory.mktemp("ts") / "tiny.pt"
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; users still have it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_TinyCNN().eval()).save(str(path))
    path.with_name("tiny.pt.json").write_text(json.dumps(
        {"name": "tiny_ts", "input_size": 64, "mpp": 1.0, "mean": [0.5] * 3, "std": [0.2] * 3}))
    return ["--encoder", "torchscript", "--weights", str(path)]


@pytest.fixture(scope="module", params=["demo", "torchscript"])
def encoder_args(request, ts_encoder_args):
    """The shipped demo encoder and a user's TorchScript file."""
    if request.param == "demo":
        return ["--encoder", "demo"]
    return ts_encoder_args


def test_extract_patch_um_and_mag(svs, tmp_path, capsys, ts_encoder_args):
    """--patch-um sets the patch side in microns, --mag the magnification (64 px patches)."""
    for opt, side in ((["--patch-um", "32"], 128), (["--mag", "5"], 512)):
        out = tmp_path / f"bag{side}.h5"
        assert main(["extract", str(svs.path), *ts_encoder_args, *opt, "--out", str(out),
                     "--device", "cpu"]) == 0
        assert _json_line(capsys)["patch_size_level0"] == side
        with h5py.File(out, "r") as f:
            assert f.attrs["patch_size_level0"] == side
            assert (f["coords"][()] % side == 0).all()


def test_extract_then_attend_round_trip(svs, tmp_path, capsys, encoder_args):
    bag_path = tmp_path / "bag.h5"
    rc = main(["extract", str(svs.path), *encoder_args, "--out", str(bag_path),
               "--device", "cpu", "--batch-size", "32"])
    assert rc == 0
    info = _json_line(capsys)
    with h5py.File(bag_path, "r") as f:
        feats, coords = f["features"][()], f["coords"][()]
        attrs = dict(f.attrs)
    n = info["n_instances"]
    assert feats.shape == (n, info["dim"]) and feats.dtype == np.float32 and n > 10
    assert coords.shape == (n, 2) and coords.dtype.kind == "i"
    assert attrs["patch_size_level0"] == info["patch_size_level0"] > 0
    assert attrs["mpp"] == pytest.approx(0.25)
    assert attrs["encoder"] == ("demo" if encoder_args[1] == "demo" else "tiny_ts")
    assert str(attrs["slide"]).endswith("svs.svs")
    # coords lie on the grid: multiples of the patch side, inside level 0
    ps = int(attrs["patch_size_level0"])
    assert (coords % ps == 0).all()
    assert (coords[:, 0] + ps <= 4480).all() and (coords[:, 1] + ps <= 3456).all()

    ckpt, model = _checkpoint(tmp_path, feats.shape[1])
    res, geo = tmp_path / "result.h5", tmp_path / "out.geojson"
    rc = main(["attend", str(bag_path), "--model", ckpt, "--out", str(res), "--geojson",
               str(geo), "--device", "cpu"])
    assert rc == 0
    line = _json_line(capsys)
    assert set(line) == {"classes", "probabilities", "predicted", "n_instances", "arch"}
    assert line["classes"] == ["normal", "lesion"] and line["arch"] == "acmil_ga"
    assert line["n_instances"] == n and sum(line["probabilities"]) == pytest.approx(1, abs=1e-5)
    assert line["predicted"] == int(np.argmax(line["probabilities"]))
    _check_result(res, feats, coords, model)
    gj = json.loads(geo.read_text())
    dets = [ft for ft in gj["features"] if ft["properties"].get("objectType") == "detection"]
    assert len(dets) == n
    with h5py.File(res, "r") as f:
        att = f["attention"][()]
    for ft in dets:  # the detection of patch i carries patch i's score and rectangle
        m = ft["properties"]["measurements"]
        i = m["index"]
        assert m["attention"] == pytest.approx(float(att[i]), rel=1e-5)
        assert ft["geometry"]["coordinates"][0][0] == coords[i].tolist()


def test_attend_demo_model(svs, tmp_path, capsys):
    from napari_milview.assets import demo_encoder_path, demo_model_path

    assert demo_encoder_path().is_file() and demo_model_path().is_file()
    bag_path = tmp_path / "bag.h5"
    assert main(["extract", str(svs.path), "--encoder", "demo", "--out", str(bag_path),
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["attend", str(bag_path), "--model", "demo", "--out",
                 str(tmp_path / "r.h5")]) == 0
    line = _json_line(capsys)
    assert line["arch"].startswith("acmil") and len(line["classes"]) == 2


def test_extract_errors_are_one_line(svs, tmp_path, capsys):
    rc = main(["extract", str(svs.path), "--encoder", "no_such_encoder", "--out",
               str(tmp_path / "b.h5")])
    assert rc == 2
    assert "no_such_encoder" in _error_line(capsys)
    rc = main(["extract", str(tmp_path / "missing.svs"), "--encoder", "demo", "--out",
               str(tmp_path / "b.h5")])
    assert rc == 2
    assert "missing.svs" in _error_line(capsys)


# ------------------------------------------------------------- foreign bag layouts
def _write_clam(path, feats, coords):
    """CLAM extract_features_fp: features + coords, no attributes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords.astype(np.int64))
    return path


def _write_trident(path, feats, coords, extent=1024):
    """TRIDENT: encoder on features; geometry on coords."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats).attrs["encoder"] = "conch_v15"
        c = f.create_dataset("coords", data=coords.astype(np.int64))
        c.attrs["patch_size_level0"] = extent
        c.attrs["patch_size"] = 512
        c.attrs["level0_magnification"] = 40
        c.attrs["target_magnification"] = 20
        c.attrs["overlap"] = 0
    return path


def _write_acmil(path, slides: dict):
    """ACMIL: one group per slide with ``feat`` (float16), ``coords`` and a label."""
    with h5py.File(path, "w") as f:
        for sid, (feats, coords, label) in slides.items():
            g = f.create_group(sid)
            g.create_dataset("feat", data=feats.astype(np.float16))
            g.create_dataset("coords", data=coords)
            g.attrs["label"] = label
    return path


def test_attend_clam_layout_needs_extent(tmp_path, capsys):
    feats, coords = _bag_arrays()
    bag = _write_clam(tmp_path / "h5_files" / "slide_1.h5", feats, coords)
    ckpt, model = _checkpoint(tmp_path, D)
    res = tmp_path / "r.h5"
    assert main(["attend", str(bag), "--model", ckpt, "--out", str(res)]) == 2
    msg = _error_line(capsys)
    assert "slide_1.h5" in msg and "--patch-size-level0" in msg and not res.exists()
    assert main(["attend", str(bag), "--model", ckpt, "--out", str(res),
                 "--patch-size-level0", "512"]) == 0
    assert _json_line(capsys)["n_instances"] == len(feats)
    _check_result(res, feats, coords, model)
    with h5py.File(res, "r") as f:
        assert f.attrs["patch_size_level0"] == 512


def test_attend_trident_layout(tmp_path, capsys):
    feats, coords = _bag_arrays(n=9, seed=2)
    bag = _write_trident(tmp_path / "features_conch_v15" / "s.h5", feats, coords)
    ckpt, model = _checkpoint(tmp_path, D, arch="abmil", classes=("a", "b", "c"))
    res = tmp_path / "r.h5"
    assert main(["attend", str(bag), "--model", ckpt, "--out", str(res)]) == 0
    line = _json_line(capsys)
    assert line["classes"] == ["a", "b", "c"] and line["arch"] == "abmil"
    _check_result(res, feats, coords, model)
    with h5py.File(res, "r") as f:
        assert f.attrs["patch_size_level0"] == 1024


def test_attend_acmil_layout(tmp_path, capsys):
    a, ca = _bag_arrays(n=10, seed=3)
    b, cb = _bag_arrays(n=6, seed=4)
    bag = _write_acmil(tmp_path / "patch_feats_pretrain_medical_ssl.h5",
                       {"slide_a": (a, ca, 0), "slide_b": (b, cb, 1)})
    ckpt, model = _checkpoint(tmp_path, D)
    res = tmp_path / "r.h5"
    assert main(["attend", str(bag), "--model", ckpt, "--out", str(res), "--slide-id",
                 "slide_b", "--patch-size-level0", "256"]) == 0
    assert _json_line(capsys)["n_instances"] == 6
    # the file stores float16: the model saw the float16-rounded features
    _check_result(res, b.astype(np.float16).astype(np.float32), cb, model)


def test_attend_clam_checkpoint(tmp_path, capsys):
    """An official CLAM checkpoint: ``attention_net.*`` keys under DataParallel's ``module.``."""
    torch.manual_seed(5)
    model = build_model("clam_sb", in_dim=D, n_classes=2)
    sd = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    assert any(k.startswith("module.attention_net.") for k in sd)
    ckpt = tmp_path / "s_0_checkpoint.pt"
    torch.save(sd, ckpt)
    feats, coords = _bag_arrays(seed=6)
    bag = _write_trident(tmp_path / "t" / "s.h5", feats, coords)
    res = tmp_path / "r.h5"
    assert main(["attend", str(bag), "--model", str(ckpt), "--out", str(res)]) == 0
    line = _json_line(capsys)
    assert line["arch"] == "clam_sb" and line["classes"] == ["class_0", "class_1"]
    _check_result(res, feats, coords, model)


def test_attend_dim_mismatch_is_one_line(tmp_path, capsys):
    feats, coords = _bag_arrays()
    bag = _write_trident(tmp_path / "t" / "s.h5", feats, coords)
    ckpt, _ = _checkpoint(tmp_path, 12)
    res = tmp_path / "r.h5"
    assert main(["attend", str(bag), "--model", ckpt, "--out", str(res)]) == 2
    msg = _error_line(capsys)
    assert msg.startswith("milview attend: error:")
    assert "8-d" in msg and "12-d" in msg and "s.h5" in msg
    assert not res.exists()


def test_attend_unknown_source_and_missing_model(tmp_path, capsys):
    feats, coords = _bag_arrays()
    bag = _write_trident(tmp_path / "t" / "s.h5", feats, coords)
    ckpt, _ = _checkpoint(tmp_path, D)
    assert main(["attend", str(bag), "--model", ckpt, "--out", str(tmp_path / "r.h5"),
                 "--geojson", str(tmp_path / "g.geojson"), "--source", "nope"]) == 2
    assert "nope" in _error_line(capsys)
    assert main(["attend", str(bag), "--model", str(tmp_path / "none.pt"), "--out",
                 str(tmp_path / "r.h5")]) == 2
    assert "none.pt" in _error_line(capsys)


def test_run_equals_extract_then_attend(svs, tmp_path, capsys):
    """`milview run` and `milview extract --model` + `milview attend` go through the one run
    path: the same patches, cut at the model card's own patch size (96 um, not the demo
    encoder's 64), and the same probabilities."""
    import shutil

    from napari_milview.assets import demo_model_path
    from napari_milview.cohort import outputs
    from napari_milview.result import load_result

    src = demo_model_path()
    ckpt = tmp_path / "card96.safetensors"
    shutil.copy(src, ckpt)
    card = json.loads(src.with_suffix(".json").read_text())
    card["patch_size_um"] = 96.0
    ckpt.with_suffix(".json").write_text(json.dumps(card))
    bag, res, out = tmp_path / "bag.h5", tmp_path / "res.h5", tmp_path / "run"
    out.mkdir()
    common = ["--encoder", "demo", "--model", str(ckpt), "--device", "cpu"]
    assert main(["extract", str(svs.path), *common, "--out", str(bag), "--workers", "1"]) == 0
    assert main(["attend", str(bag), "--model", str(ckpt), "--out", str(res),
                 "--device", "cpu"]) == 0
    assert main(["run", str(svs.path), *common, "--out", str(out), "--workers", "1"]) == 0
    capsys.readouterr()
    a, b = load_result(res), load_result(outputs(out, "svs")["result"])
    assert a.patch_size_level0 == b.patch_size_level0 == round(96.0 / svs.mpp)
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    np.testing.assert_allclose(a.attention(), b.attention(), rtol=1e-4, atol=1e-7)


def _official_transmil_ckpt(tmp_path, dim: int = D):
    """A TransMIL checkpoint in the official repository's Lightning layout (plain dicts)."""
    torch.manual_seed(3)
    model = build_model("transmil", in_dim=dim, n_classes=2, dim=32)
    path = tmp_path / "epoch=03-val_loss=0.4100.ckpt"
    torch.save({"epoch": 3, "global_step": 40, "pytorch-lightning_version": "1.2.3",
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": {"name": "TransMIL", "n_classes": 2}}}, path)
    return str(path)


def test_attend_nystrom_variant_is_chosen_recorded_and_overridable(tmp_path, capsys):
    from napari_milview.result import load_result

    feats, coords = _bag_arrays(n=12, seed=5)
    bag = _write_trident(tmp_path / "features_x" / "s.h5", feats, coords)
    ckpt = _official_transmil_ckpt(tmp_path)
    res_auto, res_cur = tmp_path / "auto.h5", tmp_path / "cur.h5"
    assert main(["attend", str(bag), "--model", ckpt, "--out", str(res_auto)]) == 0
    assert _json_line(capsys)["nystrom"] == "0.0.9"  # the official layout -> 0.0.9
    assert main(["attend", str(bag), "--model", ckpt, "--out", str(res_cur),
                 "--nystrom", "current"]) == 0
    assert _json_line(capsys)["nystrom"] == "current"  # the explicit choice wins
    a, b = load_result(res_auto), load_result(res_cur)
    assert a.meta["nystrom"] == "0.0.9" and "official TransMIL" in a.meta["nystrom_why"]
    assert b.meta["nystrom"] == "current" and "chosen explicitly" in b.meta["nystrom_why"]
    with h5py.File(res_auto, "r") as f:
        assert f.attrs["nystrom"] == "0.0.9"
    assert not np.allclose(a.probabilities, b.probabilities, atol=1e-4)

    abmil, _ = _checkpoint(tmp_path, D, arch="abmil")
    assert main(["attend", str(bag), "--model", abmil, "--out", str(tmp_path / "x.h5"),
                 "--nystrom", "0.0.9"]) == 2
    assert "TransMIL models only" in _error_line(capsys)
    assert not (tmp_path / "x.h5").exists()


def test_run_takes_nystrom(tmp_path):
    from napari_milview.cli import build_parser
    from napari_milview.cohort import CohortConfig

    args = build_parser().parse_args(["run", "s.svs", "--encoder", "demo", "--model", "demo",
                                      "--out", str(tmp_path), "--nystrom", "0.0.9"])
    assert args.nystrom == "0.0.9"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "s.svs", "--encoder", "demo", "--model", "demo",
                                   "--out", str(tmp_path), "--nystrom", "0.0.11"])
    plain, chosen = CohortConfig(), CohortConfig(nystrom="0.0.9")
    assert plain.hash() != chosen.hash() != CohortConfig(nystrom="current").hash()
    with pytest.raises(ValueError, match="nystrom"):
        CohortConfig(nystrom="legacy")


def test_attend_dsmil_prints_the_threshold_decision(tmp_path, capsys):
    """A one-class DSMIL (Camelyon16 set-up) saved as train_tcga.py leaves it: the JSON line
    carries its threshold decision, not an argmax over one class."""
    from napari_milview.result import load_result

    feats, coords = _bag_arrays(n=12, seed=7)
    bag = _write_trident(tmp_path / "t" / "s.h5", feats, coords)
    torch.manual_seed(2)
    model = build_model("dsmil", in_dim=D, n_classes=1)
    with torch.inference_mode():
        p = float(model.forward_attention(torch.from_numpy(feats)).probs[0])
    ckpt = tmp_path / "fold_0_1.pth"
    torch.save(model.state_dict(), ckpt)
    for t, word in ((p + 0.05, "negative"), (p - 0.05, "positive")):
        ckpt.with_suffix(".json").write_text(json.dumps([t]))
        res = tmp_path / f"{word}.h5"
        assert main(["attend", str(bag), "--model", str(ckpt), "--out", str(res)]) == 0
        line = _json_line(capsys)
        assert line["arch"] == "dsmil" and line["scores"] == "independent"
        assert line["probabilities"] == [pytest.approx(p, abs=1e-6)]
        assert line["thresholds"] == [pytest.approx(t, rel=1e-6)]
        assert line["thresholds_assumed"] is False
        op = ">=" if word == "positive" else "<"
        assert line["decision"] == f"{word} for class_0 (p = {p:.2f} {op} threshold {t:.2f})"
        assert line["positive"] == (["class_0"] if word == "positive" else [])
        assert line["predicted"] == (0 if word == "positive" else None)
        assert load_result(res).decision == line["decision"]
    # no list beside the checkpoint: 0.5, said in the line
    ckpt.with_suffix(".json").unlink()
    assert main(["attend", str(bag), "--model", str(ckpt), "--out", str(tmp_path / "h.h5")]) == 0
    line = _json_line(capsys)
    assert line["thresholds"] == [0.5] and line["thresholds_assumed"] is True
    assert line["decision"].endswith("threshold 0.5 assumed: the model came without thresholds")

"""The protocol's named conditions, reference folders and "normalise to this tile/slide"."""

from __future__ import annotations

import json

import numpy as np
import pytest
from stain_synth import MACENKO_REF, RUIFROK, he_concentrations, render, unit

from napari_milview.stain import (
    CONDITIONS,
    DEFAULT_REFERENCE,
    Perturbation,
    Reference,
    SlideStain,
    concentrations,
    estimate_tiles,
    fit_macenko,
    load_reference,
    make_condition,
    normalise_to,
    save_reference,
)
from napari_milview.stain._common import angle_deg
from napari_milview.stain.conditions import (
    HIGH_INTENSITY_RATIO,
    LOW_INTENSITY_RATIO,
    PLISM_SOURCES,
    scale_he_angle,
)

I0 = 240.0


@pytest.fixture(scope="module")
def tile():
    return render(he_concentrations(192, 192, seed=11), RUIFROK, I0, seed=11)


@pytest.fixture(scope="module")
def stain(tile):
    return estimate_tiles(tile, i0=I0)[0]


def test_reference_is_the_identity(tile, stain):
    pert = make_condition("reference", stain)
    assert pert.is_identity
    np.testing.assert_array_equal(pert(tile), tile)
    assert make_condition("reference", None).is_identity  # needs no stain


@pytest.mark.parametrize("name,ratio", [("low-intensity", LOW_INTENSITY_RATIO),
                                        ("high-intensity", HIGH_INTENSITY_RATIO)])
def test_intensity_scales_h_and_e_by_exactly_the_ratio(tile, stain, name, ratio):
    out = make_condition(name, stain)(tile)
    before = concentrations(tile, stain.matrix, stain.i0)
    after = concentrations(out, stain.matrix, stain.i0)
    # pixels with clearly positive H and E and no uint8 saturation after the change
    ok = np.all(before[..., :2] > 0.2, axis=-1) & np.all((out > 2) & (out < 253), axis=-1)
    assert ok.mean() > 0.3
    # uint8 rounding: |dOD| <= 0.5 / I per channel; propagate through the unmixing
    tol = 0.5 / np.maximum(np.minimum(tile, out), 1).astype(np.float64)
    bound = tol @ np.abs(np.linalg.inv(np.vstack([stain.matrix,
                                                  np.cross(*stain.matrix)])))
    err = np.abs(after[..., :2] - ratio * before[..., :2])
    assert np.all(err[ok] <= bound[ok][:, :2] * 2 + 1e-3)
    np.testing.assert_allclose(np.median(after[ok][:, :2] / before[ok][:, :2], axis=0),
                               [ratio, ratio], rtol=2e-3)
    np.testing.assert_allclose(after[..., 2], before[..., 2], atol=0.03)  # residual kept


def test_similarity_conditions_move_the_stain_vectors(tile, stain):
    a0 = angle_deg(*stain.matrix)
    far, near = (fit_macenko(make_condition(n, stain)(tile), i0=I0).matrix
                 for n in ("low-similarity", "high-similarity"))
    assert angle_deg(*far) > a0 * 1.3
    assert angle_deg(*near) < a0 * 0.7


def test_scale_he_angle_keeps_the_plane_and_bisector():
    m = unit(MACENKO_REF)
    for k in (0.5, 1.0, 1.5):
        out = scale_he_angle(m, k)
        assert angle_deg(*out) == pytest.approx(k * angle_deg(*m), abs=1e-6)
        normal = np.cross(*m)
        assert np.abs(out @ normal).max() < 1e-9
        assert angle_deg(out.sum(0), m.sum(0)) < 1e-6
    with pytest.raises(ValueError, match="positive"):
        scale_he_angle(m, 0)


def test_every_condition_leaves_a_white_tile_alone(stain):
    glass = np.full((64, 64, 3), int(I0), np.uint8)
    glass[::3] = 250
    for name in CONDITIONS:
        np.testing.assert_array_equal(make_condition(name, stain)(glass), glass, err_msg=name)


def test_macenko_normalises_to_a_reference_tile(tile, stain):
    target_tile = render(he_concentrations(160, 160, seed=12) * 1.3, MACENKO_REF, 250.0,
                         seed=12)
    ref = normalise_to(target_tile, name="lab-b")
    assert ref.name == "lab-b" and ref.source == "tile"
    assert angle_deg(ref.matrix[0], unit(MACENKO_REF)[0]) < 5
    out = make_condition("macenko", stain, reference=ref)(tile)
    fit = fit_macenko(out, i0=I0)
    assert angle_deg(fit.matrix[0], ref.matrix[0]) < 3
    assert angle_deg(fit.matrix[1], ref.matrix[1]) < 3
    np.testing.assert_allclose(fit.max_conc, ref.max_conc, rtol=0.1)
    # reinhard towards the same tile
    rein = make_condition("reinhard", stain, reference=ref)
    assert rein.params["target_name"] == "lab-b"


def test_default_reference_is_complete(tile, stain):
    for f in ("matrix", "max_conc", "intensity_95", "lab_mean", "lab_std"):
        assert getattr(DEFAULT_REFERENCE, f) is not None
    for name in ("macenko", "reinhard"):
        assert make_condition(name, stain).params["target_name"] == DEFAULT_REFERENCE.name


def _plism_folder(path):
    mats = {"HRH_S60": unit([[0.70, 0.62, 0.35], [0.02, 0.95, 0.30]]),
            "GV_GT450": unit([[0.60, 0.70, 0.38], [0.30, 0.85, 0.43]])}
    for name, m in mats.items():
        s = np.column_stack([m[0], m[1], np.cross(m[0], m[1])])  # columns H, E, residual
        np.savez(path / f"{name}_median.npz", stainMatrix=s, stainMatrixInv=np.linalg.inv(s))
    (path / "median_intensities_per_condition.csv").write_text(
        "stain,device,H_95th,E_95th\nKRH,GT450,0.9,0.5\nGV,AT2,2.0,1.4\nGV,GT450,1.5,1.0\n")
    return mats


def test_load_plism_folder_and_use_it(tmp_path, tile, stain):
    mats = _plism_folder(tmp_path)
    lib = load_reference(tmp_path)
    assert set(PLISM_SOURCES.values()) <= set(lib)
    np.testing.assert_allclose(lib["HRH_S60"].matrix, mats["HRH_S60"])
    np.testing.assert_allclose(lib["GV_AT2"].intensity_95, [2.0, 1.4])
    assert lib["GV_GT450"].matrix is not None and lib["GV_GT450"].intensity_95 is not None
    low = make_condition("low-intensity", stain, library=lib)
    np.testing.assert_allclose(low.params["ratio"], np.round([0.9, 0.5] / stain.intensity_95, 6))
    assert low.params["target_name"] == "KRH_GT450"
    sim = make_condition("low-similarity", stain, library=lib)
    np.testing.assert_allclose(sim.params["target"], np.round(mats["HRH_S60"], 6))
    out = sim(tile)
    fit = fit_macenko(out, i0=I0)
    assert angle_deg(fit.matrix[1], mats["HRH_S60"][1]) < 4


def test_reference_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_reference(tmp_path / "nope")
    with pytest.raises(ValueError, match="no reference files"):
        load_reference(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"name": "x", "stain_matrix": [[1, 0, 0]]}))
    with pytest.raises(ValueError, match="bad.json.*2 x 3"):
        load_reference(tmp_path)
    (tmp_path / "bad.json").unlink()
    np.savez(tmp_path / "X_Y_median.npz", other=np.eye(3))
    with pytest.raises(ValueError, match="X_Y_median.npz.*stainMatrix"):
        load_reference(tmp_path)
    (tmp_path / "X_Y_median.npz").unlink()
    (tmp_path / "A_B_median.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="A_B_median.npz"):
        load_reference(tmp_path)


def test_missing_plism_entry_is_named(tmp_path, stain):
    ref = Reference("only-lab", lab_mean=np.array([50.0, 20, -10]), lab_std=np.ones(3))
    save_reference(ref, tmp_path / "only.json")
    lib = load_reference(tmp_path)
    with pytest.raises(ValueError, match="KRH_GT450.*has: only-lab"):
        make_condition("low-intensity", stain, library=lib)
    with pytest.raises(ValueError, match="has no matrix"):
        make_condition("macenko", stain, reference=lib["only-lab"])


def test_json_reference_roundtrip_and_normalise_to_files(tmp_path, tile, stain):
    ref = Reference.from_stain(stain, "mine")
    path = save_reference(ref, tmp_path / "mine.json")
    back = load_reference(tmp_path)["mine"]
    np.testing.assert_allclose(back.matrix, stain.matrix, atol=1e-6)
    np.testing.assert_allclose(back.lab_std, stain.lab_std, atol=1e-6)
    assert normalise_to(path).name == "mine"
    from PIL import Image

    Image.fromarray(tile).save(tmp_path / "t.png")
    r = normalise_to(tmp_path / "t.png")
    assert r.name == "t" and angle_deg(r.matrix[0], stain.matrix[0]) < 1
    with pytest.raises(FileNotFoundError):
        normalise_to(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="cannot be a reference"):
        normalise_to(np.full((64, 64, 3), 250, np.uint8))


def test_unknown_condition_and_identity_class():
    with pytest.raises(ValueError, match="unknown condition 'sepia'.*reinhard"):
        make_condition("sepia", None)
    assert Perturbation().is_identity


def test_stain_record_is_json_ready(stain):
    assert isinstance(stain, SlideStain)
    json.dumps(stain.to_dict())

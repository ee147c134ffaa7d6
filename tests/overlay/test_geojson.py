"""QuPath GeoJSON: valid polygons in level-0 pixels, scores round-trip, top-K annotations."""

import json

import numpy as np
import pytest

from napari_milview.overlay.geojson import to_geojson
from napari_milview.result import Result


@pytest.fixture
def result():
    rng = np.random.default_rng(3)
    xs, ys = np.meshgrid(np.arange(6) * 512 + 37, np.arange(4) * 512 + 11)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    att = rng.random(24).astype(np.float32)
    att[5] = np.nan
    return Result(coords=coords, patch_size_level0=512,
                  sources={"attention": att, "branch/1": rng.random(24)},
                  default_source="attention", classes=["n", "t"], logits=[0, 1],
                  probabilities=[0.3, 0.7], arch="acmil_ga", mpp=0.25, slide_id="s7")


def _signed_area(ring):
    x, y = np.asarray(ring, float).T
    return 0.5 * np.sum(x[:-1] * y[1:] - x[1:] * y[:-1])


def test_valid_qupath_feature_collection(result, tmp_path):
    fc = to_geojson(result, tmp_path / "s7.geojson", top_k=3)
    assert fc["type"] == "FeatureCollection"
    det = [f for f in fc["features"] if f["properties"]["objectType"] == "detection"]
    ann = [f for f in fc["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(det) == 24 and len(ann) == 3
    ids = [f["id"] for f in fc["features"]]
    assert len(set(ids)) == len(ids)
    for f, (x, y) in zip(det, result.coords.tolist(), strict=True):
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        [ring] = f["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]  # closed
        assert _signed_area(ring) == 512 * 512  # counter-clockwise in (x, y), RFC 7946
        xs, ys = zip(*ring, strict=True)
        assert (min(xs), min(ys), max(xs), max(ys)) == (x, y, x + 512, y + 512)
        assert isinstance(f["properties"]["measurements"], dict)  # QuPath 0.4+ layout
    # the written file is strict JSON (no NaN) and equals the returned dict
    text = (tmp_path / "s7.geojson").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON")) == fc
    assert [p.name for p in tmp_path.iterdir()] == ["s7.geojson"]


def test_scores_round_trip(result):
    fc = to_geojson(result, top_k=5)
    det = fc["features"][:24]
    back = np.array([f["properties"]["measurements"].get("attention", np.nan) for f in det],
                    np.float32)
    np.testing.assert_array_equal(back, result.attention())  # NaN patch: no measurement
    assert "attention" not in det[5]["properties"]["measurements"]
    assert [f["properties"]["measurements"]["index"] for f in det] == list(range(24))
    pct = [f["properties"]["measurements"]["attention percentile"] for f in det
           if "attention percentile" in f["properties"]["measurements"]]
    assert max(pct) == 1.0 and len(pct) == 23
    ann = fc["features"][24:]
    order = np.argsort(-np.nan_to_num(result.attention(), nan=-1), kind="stable")[:5]
    assert [a["properties"]["measurements"]["index"] for a in ann] == order.tolist()
    assert [a["properties"]["measurements"]["rank"] for a in ann] == [1, 2, 3, 4, 5]
    assert ann[0]["properties"]["classification"]["name"] == "Attention top-K"
    assert ann[0]["geometry"] == det[int(order[0])]["geometry"]


def test_other_sources_and_no_annotations(result):
    fc = to_geojson(result, source="branch/1", top_k=0, all_sources=True)
    assert len(fc["features"]) == 24
    m = fc["features"][5]["properties"]["measurements"]
    assert m["attention"] == pytest.approx(float(result.sources["branch/1"][5]))
    assert "attention" in result.sources and np.isnan(result.sources["attention"][5])
    assert "source attention" not in m  # NaN there: no measurement
    m0 = fc["features"][0]["properties"]["measurements"]
    # the other source named "attention" does not overwrite the chosen one
    assert m0["attention"] == pytest.approx(float(result.sources["branch/1"][0]))
    assert m0["source attention"] == pytest.approx(float(result.sources["attention"][0]))


def test_missing_folder_names_it(result, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        to_geojson(result, tmp_path / "nowhere" / "x.geojson")

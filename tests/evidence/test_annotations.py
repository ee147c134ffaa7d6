"""evidence/annotations.py: QuPath GeoJSON and ASAP XML in and out, the validation corpus,
arrays -> regions, and per-patch overlap against hand-computed and exactly clipped areas."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_milview.evidence import (
    AnnotationError,
    Annotations,
    from_labels,
    from_mask,
    from_polygons,
    patch_labels,
    patch_overlap,
    read_annotations,
    read_asap_xml,
    read_geojson,
    to_mask,
    write_asap_xml,
    write_geojson,
)
from napari_milview.evidence import annotations as A

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"
DATA = HERE / "data"


def square(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def region(ext, holes=(), **kw):
    return A._make_region(ext, list(holes), "test", "region", **kw)


# ------------------------------------------------------------------ the malformed corpus
#: file -> what its one-line error must say
BAD = {
    "truncated.geojson": "invalid JSON: Expecting ',' delimiter at line 3, column 1",
    "string_coordinate.geojson": 'feature 0, ring 0, point 1 is ["10", 0]',
    "nan_coordinate.geojson": "point 1 is not finite",
    "points_only.geojson": "Point features are not regions",
    "unknown_geometry.geojson": "geometry type 'Circle' is not a region",
    "two_point_ring.geojson": "('sliver'), exterior ring has 2 distinct point(s)",
    "bow_tie.geojson": "crosses itself: segment 0 (point 0 -> 1) meets segment 2 at (5, 5)",
    "hole_outside.geojson": "hole 1 lies outside its exterior ring",
    "not_a_feature.geojson": "feature 0 is 'Polygon', not a GeoJSON Feature",
    "topojson.geojson": "'Topology' is not GeoJSON",
    "features_not_list.geojson": "without a 'features' list",
    "bad_classification.geojson": "classification must be a string or an object",
    "no_geometry.geojson": "feature 0 has no 'geometry'",
    "deeply_nested.geojson": "nested too deeply",
    "empty.geojson": "is empty (0 bytes)",
    "whitespace.xml": "only whitespace",
    "text.geojson": "neither GeoJSON nor ASAP XML",
    "binary.xml": "neither GeoJSON nor ASAP XML",
    "mismatched_tag.xml": "not well-formed XML: mismatched tag at line 9, column 4",
    "imagescope.xml": "root element is <Annotations>, not <ASAP_Annotations>",
    "missing_order.xml": "Coordinate at line 7 has no Order",
    "duplicate_order.xml": "Order 1 appears more than once",
    "non_numeric_x.xml": "X is 'ten', not a number",
    "dots_only.xml": "Dot annotations are not regions",
    "unknown_type.xml": "Type 'Ellipse' is not a region type",
    "billion_laughs.xml": "declares a DTD (<!DOCTYPE>) at line 2; refused",
    "external_entity.xml": "declares a DTD (<!DOCTYPE>) at line 2; refused",
    "figure_eight.xml": "('Eight') at line 4, exterior ring crosses itself",
    "no_coordinates.xml": "('A') at line 4 has no Coordinates",
}


def test_the_corpus_is_complete():
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(BAD)


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_file_gives_one_line_naming_file_and_problem(name):
    path = CORPUS / name
    t = time.perf_counter()
    with pytest.raises(AnnotationError) as ei:
        read_annotations(path)
    assert time.perf_counter() - t < 5
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert BAD[name] in msg, msg
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("suffix", [".geojson", ".xml"])
def test_fifo_and_folder_are_refused_unopened(tmp_path, suffix):
    fifo = tmp_path / f"pipe{suffix}"
    os.mkfifo(fifo)
    with pytest.raises(AnnotationError, match="named pipe.*refused unopened"):
        read_annotations(fifo)  # would block forever if opened
    folder = tmp_path / f"folder{suffix}"
    folder.mkdir()
    with pytest.raises(AnnotationError, match="is a folder, not a file"):
        read_annotations(folder)
    with pytest.raises(AnnotationError, match="no such file"):
        read_annotations(tmp_path / f"absent{suffix}")


def test_too_many_points_and_too_many_bytes_are_refused(tmp_path, monkeypatch):
    ann = Annotations([region(square(0, 0, 10, 10)), region(square(20, 0, 30, 10))])
    gj, xml = write_geojson(ann, tmp_path / "a.geojson"), write_asap_xml(ann, tmp_path / "a.xml")
    monkeypatch.setattr(A, "MAX_POINTS", 6)
    for p in (gj, xml):
        with pytest.raises(AnnotationError, match="more than 6 points; refused"):
            read_annotations(p)
    monkeypatch.setattr(A, "MAX_POINTS", 10)  # GeoJSON rings are closed: 5 each
    assert len(read_annotations(gj)) == len(read_annotations(xml)) == 2
    monkeypatch.setattr(A, "MAX_BYTES", 100)
    with pytest.raises(AnnotationError, match="over the 0 MiB limit"):
        read_annotations(xml)


def test_entities_are_never_expanded(tmp_path):
    # an internal entity without a DOCTYPE is not well-formed; with one it is refused first
    p = tmp_path / "ent.xml"
    p.write_text('<ASAP_Annotations><Annotations><Annotation Name="&lol;" Type="Polygon"/>'
                 "</Annotations></ASAP_Annotations>")
    with pytest.raises(AnnotationError, match="undefined entity"):
        read_asap_xml(p)


def test_no_regions_reads_empty(tmp_path):
    for name, text in (("e.geojson", '{"type": "FeatureCollection", "features": []}'),
                       ("e.xml", "<ASAP_Annotations><Annotations/></ASAP_Annotations>"),
                       ("l.geojson", "[]")):
        (tmp_path / name).write_text(text)
        ann = read_annotations(tmp_path / name)
        assert ann.regions == [] and ann.bounds() is None and ann.skipped == []
        assert not patch_overlap(ann, np.zeros((3, 2), np.int64), 256).any()


# ------------------------------------------------------------------ QuPath GeoJSON
def test_qupath_export_as_qupath_writes_it():
    ann = read_geojson(DATA / "qupath_export.geojson")
    # Tumour A, two MultiPolygon parts, the Ignore* region, the detection, Stroma
    assert [r.label for r in ann.regions] == ["Tumor", "Tumor", "Tumor", "Ignore*",
                                              "Tumor: Positive", "Stroma"]
    assert [r.object_type for r in ann.regions] == ["annotation"] * 4 + ["detection",
                                                                         "annotation"]
    a = ann.regions[0]
    assert a.name == "Tumour A" and len(a.holes) == 1
    np.testing.assert_array_equal(a.exterior, square(1200, 800, 2400, 2000))  # closed -> open
    assert a.area() == 1200 * 1200 - 400 * 400
    assert ann.regions[2].area() == pytest.approx(200 * 400 / 2)
    assert len(ann.skipped) == 1 and "MultiPoint (not a region)" in ann.skipped[0]
    assert not any(r.exclude for r in ann.regions)  # no exclusion unless named
    assert ann.bounds() == (100.0, 300.0, 4300.0, 3040.0)
    assert [r.label for r in ann.positive({"tumor"})] == ["Tumor"] * 3

    excl = read_annotations(DATA / "qupath_export.geojson", exclude=["Ignore*"],
                            slide_size=(4480, 3456))
    assert [r.exclude for r in excl.regions] == [False, False, False, True, False, False]
    assert excl.slide_size == (4480, 3456)
    # the Ignore* square sits inside Tumour A: a patch on it loses that area
    ov = patch_overlap(excl, np.array([[2100, 1700], [1200, 800]]), 400, labels={"Tumor"})
    np.testing.assert_allclose(ov, [(300 * 300 - 200 * 200) / 400**2, 1.0], atol=1e-12)
    ov_all = patch_overlap(excl, np.array([[4000, 2500]]), 300)  # Stroma counts when None
    np.testing.assert_allclose(ov_all, [1.0])


def test_qupath_02_list_and_string_classification():
    ann = read_annotations(DATA / "qupath_v02_list.geojson")
    assert [r.label for r in ann.regions] == ["Tumor", "Tumor"]
    assert [r.object_type for r in ann.regions] == ["annotation", "annotation"]  # v0.2 "id"
    np.testing.assert_array_equal(ann.regions[0].exterior[0], [10.5, 20.5])


def test_points_outside_the_slide(tmp_path):
    p = tmp_path / "far.geojson"
    ann = Annotations([region(square(0, 0, 100, 100)), region(square(100, 100, 5030, 300))])
    write_geojson(ann, p)
    with pytest.raises(AnnotationError) as ei:
        read_annotations(p, slide_size=(5000, 4000))
    msg = str(ei.value)
    assert "region 1" in msg and "point 1 (5030, 100) lies outside the 5000 x 4000 slide" in msg
    # 30 px over a 5000 px side is beyond the tolerance (0.5 % = 25 px); 20 px over is not
    assert len(read_annotations(p, slide_size=(5010, 4000))) == 2


def test_geojson_position_with_z_and_bare_geometry(tmp_path):
    p = tmp_path / "z.geojson"
    p.write_text('{"type": "Polygon", "coordinates": [[[0, 0, 5], [10, 0, 5], [10, 10, 5], '
                 "[0, 0, 5]]]}")
    ann = read_annotations(p)
    np.testing.assert_array_equal(ann.regions[0].exterior, [[0, 0], [10, 0], [10, 10]])


# ------------------------------------------------------------------ ASAP XML
def test_camelyon16_layout():
    ann = read_annotations(DATA / "camelyon16_style.xml")
    assert [r.label for r in ann.regions] == ["_0", "_2", "_1", "Tumor"]
    assert [r.exclude for r in ann.regions] == [False, True, False, False]
    np.testing.assert_array_equal(ann.regions[0].exterior, square(1000, 1000, 2000, 2000))
    np.testing.assert_array_equal(ann.regions[1].exterior, square(1250.5, 1250, 1500.5, 1500))
    assert "Annotation 4" in ann.skipped[0] and "Dot (not a region)" in ann.skipped[0]
    # the _2 exclusion cuts into the _0 tumour
    ov = patch_overlap(ann, np.array([[1000, 1000], [1250, 1250], [3000, 3000], [3600, 100]]),
                       1000)
    np.testing.assert_allclose(ov, [1 - 250 * 250 / 1e6, (750 * 750 - 250 * 250) / 1e6,
                                    0.16, 0.04])


def test_named_groups_and_caller_exclusions(tmp_path):
    ann = Annotations([
        region(square(0, 0, 100, 100), label="metastases"),
        region(square(25, 25, 75, 75), label="normal", exclude=True),
    ])
    p = write_asap_xml(ann, tmp_path / "c17.xml")
    back = read_asap_xml(p)
    assert [(r.label, r.exclude) for r in back.regions] == [("metastases", False),
                                                           ("normal", True)]
    np.testing.assert_allclose(patch_overlap(back, np.array([[0, 0]]), 100), [0.75])
    mine = read_asap_xml(p, exclude=[])  # the caller decides: nothing excluded
    np.testing.assert_allclose(patch_overlap(mine, np.array([[0, 0]]), 100), [1.0])


# ------------------------------------------------------------------ the synthetic lesion
@pytest.fixture(scope="module")
def lesion(svs):
    mask = np.asarray(Image.open(svs.mask_path)) > 0
    assert mask.any()
    return svs, mask


def test_lesion_mask_traced_exactly_and_round_trips(lesion, tmp_path):
    svs, mask = lesion
    ds = svs.mask_downsample
    ann = from_mask(mask, ds, slide_size=(svs.width, svs.height))
    area = sum(r.area() for r in ann.regions)
    assert area == mask.sum() * ds * ds  # exact, not within 1-2 %
    assert (to_mask(ann, mask.shape, ds) == mask).all()
    for path, reader in ((write_geojson(ann, tmp_path / "lesion.geojson"), read_geojson),
                         (write_asap_xml(ann, tmp_path / "lesion.xml"), read_asap_xml)):
        back = reader(path, slide_size=(svs.width, svs.height))
        assert (to_mask(back, mask.shape, ds) == mask).all(), path.name
        assert (to_mask(read_annotations(path), mask.shape, ds) == mask).all()


def test_patch_labels_from_the_lesion_match_the_mask(lesion):
    svs, mask = lesion
    ds = svs.mask_downsample
    ps = 256
    k = ps // ds
    ann = from_mask(mask, ds)
    ys, xs = np.mgrid[0:svs.height - ps + 1:ps, 0:svs.width - ps + 1:ps]
    coords = np.column_stack([xs.ravel(), ys.ravel()]).astype(np.int64)
    ov = patch_overlap(ann, coords, ps)
    blocks = mask[:ys.shape[0] * k, :xs.shape[1] * k].reshape(ys.shape[0], k, xs.shape[1], k)
    truth = blocks.mean(axis=(1, 3)).ravel()
    np.testing.assert_allclose(ov, truth, atol=1e-9)  # outlines on the strip grid: exact
    assert (patch_labels(ov) == (truth >= 0.5)).all()
    assert 0 < patch_labels(ov).sum() < patch_labels(ov, 0).sum() < len(ov)


# ------------------------------------------------------------------ overlap, by hand
def test_hand_computed_overlaps():
    rect = from_polygons([square(0, 0, 50, 100)])
    coords = np.array([[0, 0], [25, 0], [50, 0], [-100, 0], [0, 50], [-50, -50]])
    np.testing.assert_allclose(patch_overlap(rect, coords, 100),
                               [0.5, 0.25, 0.0, 0.0, 0.25, 0.25])
    holed = Annotations([region(square(0, 0, 100, 100), [square(25, 25, 75, 75)])])
    np.testing.assert_allclose(patch_overlap(holed, np.array([[0, 0], [50, 50]]), 100),
                               [0.75, 0.1875])
    # an exclusion outside every positive region removes nothing; overlapping positives once
    ann = Annotations([region(square(0, 0, 100, 100)), region(square(50, 0, 150, 100)),
                       region(square(300, 0, 400, 100), exclude=True)])
    np.testing.assert_allclose(patch_overlap(ann, np.array([[0, 0], [100, 0], [300, 0]]), 100),
                               [1.0, 0.5, 0.0])
    # a MultiPolygon: a triangle and a square
    multi = Annotations([region(square(0, 0, 10, 10)),
                         region(np.array([[20.0, 0], [30, 0], [20, 10]]))])
    np.testing.assert_allclose(patch_overlap(multi, np.array([[0, 0], [20, 0]]), 10),
                               [1.0, 0.5])
    np.testing.assert_allclose(patch_overlap(multi, np.array([[0, 0]]), 40), [150 / 1600])
    # labels pick the positives
    two = Annotations([region(square(0, 0, 10, 10), label="a"),
                       region(square(10, 0, 20, 10), label="b")])
    np.testing.assert_allclose(patch_overlap(two, np.array([[0, 0]]), 20, labels={"B"}),
                               [0.25])


def test_patch_labels_fraction_rules():
    ov = np.array([0.0, 1e-9, 0.49, 0.5, 1.0])
    assert patch_labels(ov).tolist() == [False, False, False, True, True]
    assert patch_labels(ov, 0).tolist() == [False, True, True, True, True]
    assert patch_labels(ov, 1.0).tolist() == [False, False, False, False, True]
    with pytest.raises(AnnotationError):
        patch_labels(ov, 1.5)


def _clip_area(ring, x0, y0, x1, y1):
    """Exact area of a simple polygon inside an axis-aligned box (Sutherland-Hodgman)."""
    pts = [tuple(p) for p in ring]
    planes = ((lambda p: p[0] >= x0, 0, x0), (lambda p: p[0] <= x1, 0, x1),
              (lambda p: p[1] >= y0, 1, y0), (lambda p: p[1] <= y1, 1, y1))
    for inside, axis, v in planes:
        out = []
        for i in range(len(pts)):
            a, b = pts[i - 1], pts[i]
            if inside(a) != inside(b):
                t = (v - a[axis]) / (b[axis] - a[axis])
                out.append((a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])))
            if inside(b):
                out.append(b)
        pts = out
        if not pts:
            return 0.0
    return abs(A._signed_area(np.array(pts)))


def _blob(cx, cy, radius, n, seed):
    rng = np.random.default_rng(seed)
    th = np.linspace(0, 2 * np.pi, n, endpoint=False)
    k = np.arange(1, 8)
    amp, ph = rng.normal(0, 0.1, 7), rng.uniform(0, 2 * np.pi, 7)
    rad = radius * (1 + (amp[:, None] * np.cos(k[:, None] * th + ph[:, None])).sum(0))
    return np.column_stack([cx + rad * np.cos(th), cy + rad * np.sin(th)])


def test_overlap_against_exact_clipping():
    ext, hole = _blob(5000, 4000, 3500, 3000, 3), _blob(5000, 4000, 900, 800, 4)
    ann = Annotations([region(ext, [hole])])
    ps = 256
    g = np.arange(-4096, 14000, ps)
    xs, ys = np.meshgrid(g, g)
    coords = np.column_stack([xs.ravel(), ys.ravel()])
    ov = patch_overlap(ann, coords, ps)
    edge = np.flatnonzero((ov > 0) & (ov < 1))
    pick = np.random.default_rng(0).choice(edge, min(120, edge.size), replace=False)
    exact = np.array([(_clip_area(ext, x, y, x + ps, y + ps)
                       - _clip_area(hole, x, y, x + ps, y + ps)) / ps**2
                      for x, y in coords[pick]])
    err = np.abs(exact - ov[pick])
    assert err.max() < 0.0125 and err.mean() < 1e-3, (err.max(), err.mean())
    finer = patch_overlap(ann, coords[pick], ps, subrows=128)
    assert np.abs(exact - finer).max() < err.max() / 4 + 1e-6
    # the whole area adds up (patches tile the plane)
    assert ov.sum() * ps**2 == pytest.approx(ann.regions[0].area(), rel=2e-4)


def test_overlap_is_quick_for_100k_patches():
    ext, hole = _blob(40000, 32000, 38000, 8000, 3), _blob(40000, 32000, 9000, 3000, 4)
    ann = Annotations([region(ext, [hole])])
    ps = 256
    xs, ys = np.meshgrid(np.arange(400) * ps, np.arange(250) * ps)
    coords = np.column_stack([xs.ravel(), ys.ravel()]).astype(np.int64)
    t = time.perf_counter()
    ov = patch_overlap(ann, coords, ps)
    dt = time.perf_counter() - t
    assert ov.shape == (100_000,) and 0 < (ov > 0).sum() < 100_000
    assert dt < 5.0, f"100k patches took {dt:.2f} s"  # ~0.6 s on an idle core


# ------------------------------------------------------------------ self-intersection
def test_self_intersection_finds_crossings_fast():
    th = np.linspace(0, 2 * np.pi, 10_000, endpoint=False)
    circle = np.column_stack([1000 * np.cos(th), 1000 * np.sin(th)])
    t = time.perf_counter()
    assert A.self_intersection(circle) is None
    assert time.perf_counter() - t < 1.0
    bad = circle.copy()
    bad[5000] = [1000, 0.5]  # a spike across the whole ring
    i, j, x, y = A.self_intersection(bad)
    assert 4999 in (i, j) or 5000 in (i, j)
    # touching at a vertex (the ring visits one point twice) is not a simple ring
    touch = np.array([[0, 0], [10, 0], [5, 5], [10, 10], [0, 10], [5, 5]], float)
    assert A.self_intersection(touch) is not None
    # folding back along itself
    spike = np.array([[0, 0], [10, 0], [10, 10], [10, 5], [0, 10]], float)
    assert A.self_intersection(spike) is not None
    with pytest.raises(AnnotationError, match=r"polygon 0, exterior ring crosses itself"):
        from_polygons([bad])


# ------------------------------------------------------------------ arrays in
def test_from_polygons_closed_open_and_bad():
    closed = np.vstack([square(0, 0, 5, 5), [[0, 0]]])
    ann = from_polygons([closed, square(10, 10, 20, 20)], label="drawn")
    assert [len(r.exterior) for r in ann.regions] == [4, 4]
    assert [r.name for r in ann.regions] == ["drawn 1", "drawn 2"]
    with pytest.raises(AnnotationError, match="polygons: polygon 1, exterior ring has 2"):
        from_polygons([square(0, 0, 5, 5), np.array([[0, 0], [1, 1], [1, 1]])])
    with pytest.raises(AnnotationError,
                       match=r"exterior: point 1 \(500, 0\) lies outside the 100 x 100 slide"):
        from_polygons([square(0, 0, 500, 50)], slide_size=(100, 100))


def test_from_mask_connectivity_and_holes():
    m = np.zeros((8, 8), bool)
    m[1, 1] = m[2, 2] = True  # touch by a corner only: two regions
    m[4:8, 3:8] = True
    m[5:7, 5:6] = False  # a hole
    ann = from_mask(m, 2.0, origin=(100, 10))
    assert len(ann.regions) == 3
    holed = [r for r in ann.regions if r.holes]
    assert len(holed) == 1 and holed[0].area() == (20 - 2) * 4
    np.testing.assert_array_equal(ann.regions[0].exterior,
                                  [[102, 12], [104, 12], [104, 14], [102, 14]])
    assert (to_mask(ann, m.shape, 2.0, origin=(100, 10)) == m).all()
    rng = np.random.default_rng(1)
    for _ in range(10):
        r = rng.random((30, 41)) < 0.45
        a = from_mask(r, 3.0)
        assert sum(x.area() for x in a.regions) == r.sum() * 9
        assert (to_mask(a, r.shape, 3.0) == r).all()
    assert from_mask(np.zeros((4, 4), bool), 1.0).regions == []


def test_from_mask_pinches_give_simple_rings(tmp_path):
    # background reaching in by a corner: the outline would touch itself at (3, 2)
    m = np.array([[0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 0, 1, 0], [0, 1, 1, 1, 0],
                  [0, 0, 0, 0, 0]], bool)
    (reg,) = from_mask(m, 1.0).regions
    assert len(reg.holes) == 1 and reg.area() == 7
    assert A.self_intersection(reg.exterior) is None
    rng = np.random.default_rng(0)
    for t in range(15):  # random masks are full of pinches; GeoJSON keeps them exactly
        r = rng.random((25, 31)) < 0.55
        back = read_geojson(write_geojson(from_mask(r, 2.0), tmp_path / f"{t}.geojson"))
        assert (to_mask(back, r.shape, 2.0) == r).all()


def test_from_labels():
    lab = np.zeros((6, 6), np.int32)
    lab[0:3, 0:3] = 1
    lab[3:6, 3:6] = 2
    lab[1, 1] = 0
    ann = from_labels(lab, 4.0, origin=(0, 0), names={2: "tumor"})
    assert sorted(r.label for r in ann.regions) == ["1", "tumor"]
    one = ann.positive({"1"})[0]
    assert one.area() == 8 * 16 and len(one.holes) == 1
    with pytest.raises(AnnotationError, match="integer"):
        from_labels(lab.astype(float), 1.0)

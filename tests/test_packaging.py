"""Packaging: the license and metadata of the built wheel and sdist, the manifest's menus and
icon, declared dependencies against what the package imports, where the sample cache lives, and
which slide notes are warnings. (.ci/run also installs the built wheel in a fresh venv.)"""

from __future__ import annotations

import ast
import configparser
import email
import importlib.metadata
import logging
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "napari_milview"


def _cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _reqs(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = line.split(";")[0]
            for sep in "<>=![ ":
                name = name.split(sep)[0]
            names.add(name.lower().replace("_", "-"))
    return names


def test_license_file_and_spdx_expression_in_setup_cfg():
    meta = _cfg()["metadata"]
    assert meta["license_expression"] == "BSD-3-Clause"
    assert "license" not in meta  # the pre-PEP 639 free-text field
    assert "License ::" not in meta["classifiers"]  # superseded by the expression
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "napari-milview developers" in text
    # no placeholders where nothing exists
    assert not any(k in meta for k in ("url", "project_urls", "author_email"))


def test_python_requires_matches_napari():
    """napari 0.9.2 needs Python >= 3.11; the classifiers say the same."""
    cfg = _cfg()
    assert cfg["options"]["python_requires"] == ">=3.11"
    assert "3.10" not in cfg["metadata"]["classifiers"]


def _third_party_imports() -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found = set()
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            found |= {m.split(".")[0] for m in mods}
    return {m for m in found if m not in stdlib and m not in ("napari_milview", "__future__")}


def test_dependencies_match_imports():
    """Every third-party module the package imports is declared (in install_requires or an
    extra); nothing in install_requires goes unimported. napari_builtins ships with napari."""
    cfg = _cfg()
    required = _reqs(cfg["options"]["install_requires"])
    extras = set().union(*(_reqs(v) for v in cfg["options.extras_require"].values()))
    dists = importlib.metadata.packages_distributions()
    imported = set()
    for mod in _third_party_imports() - {"napari_builtins"}:
        names = {d.lower().replace("_", "-") for d in dists.get(mod, [mod])}
        if mod == "spams":
            names = {"spams-bin"}
        assert names & (required | extras), f"{mod} ({names}) is imported but not declared"
        imported |= names
    # qtpy's binding comes from the pyqt5/pyqt6 extras; openslide-bin is openslide's library
    unused = required - imported - {"openslide-bin", "dask"}
    assert not unused, f"declared but never imported: {sorted(unused)}"
    assert not {"superqt", "magicgui", "npe2"} & required


def test_manifest_icon_and_menus():
    from npe2 import PluginManifest

    mf = PluginManifest.from_file(PKG / "napari.yaml")
    assert mf.icon == "napari_milview:icon.png"
    icon = PKG / "icon.png"
    assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    menus = {k: [i.command for i in v] for k, v in mf.contributions.menus.items()}
    assert set(menus["napari/plugins"]) == {w.command for w in mf.contributions.widgets}
    assert menus["napari/file/samples"] == [s.command for s in mf.contributions.sample_data]
    assert "icon.png" in _cfg()["options.package_data"]["napari_milview"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The wheel and sdist, built without isolation (offline) from this checkout."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "-q", "--sdist", "--wheel",
                    "--outdir", str(out), str(ROOT)], check=True, capture_output=True,
                   timeout=240)
    return next(out.glob("*.whl")), next(out.glob("*.tar.gz"))


@pytest.mark.slow
def test_built_wheel_has_license_metadata_icon_and_manifest(built):
    whl, _ = built
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(z.read(meta_name))
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert meta["Requires-Python"] == ">=3.11"
    assert not any(c.startswith("License ::") for c in meta.get_all("Classifier"))
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    for f in ("napari_milview/napari.yaml", "napari_milview/icon.png"):
        assert f in names
    assert any(n.startswith("napari_milview/assets/") for n in names)
    assert not any(n.startswith(("tests/", "bench/", "sample_data/")) for n in names)


@pytest.mark.slow
def test_built_sdist_carries_license_and_all_tests(built):
    _, sdist = built
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    here = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")
            if "__pycache__" not in p.parts}
    assert "LICENSE" in names
    missing = here - names
    assert not missing, f"tests missing from the sdist: {sorted(missing)}"
    assert {"tests/conftest.py", "tests/data/fetch_real_data.py"} <= names
    assert not any(n.endswith(".svs") for n in names)  # fetched at test time, not shipped


def test_sample_cache_in_platform_cache_dir_unless_overridden(monkeypatch, tmp_path):
    from platformdirs import user_cache_dir

    from napari_milview._sample_data import clear_sample_cache, sample_cache_bytes, sample_dir

    monkeypatch.setenv("MILVIEW_CACHE_DIR", str(tmp_path / "mine"))
    assert sample_dir() == tmp_path / "mine" / "samples"
    monkeypatch.delenv("MILVIEW_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sample_dir() == Path(user_cache_dir("napari-milview", appauthor=False)) / "samples"
    if sys.platform.startswith("linux"):
        assert sample_dir() == tmp_path / "xdg" / "napari-milview" / "samples"
    sample_dir().mkdir(parents=True)
    (sample_dir() / "x.svs").write_bytes(b"0" * 1000)
    assert sample_cache_bytes() == 1000
    assert clear_sample_cache() == 1000
    assert not sample_dir().exists() and sample_cache_bytes() == 0


def test_lazy_levels_note_is_metadata_and_a_log_line_not_a_warning(tmp_path, caplog):
    """A one-level slide gets lazily built lower levels: said in the layer's metadata and the
    log, no UserWarning (napari would show a toast the user can do nothing about)."""
    from napari_milview._reader import read_slide
    from napari_milview.synthetic import write_synthetic_slide

    res = write_synthetic_slide(tmp_path / "one.svs", width=3000, height=2200, mpp=0.5,
                                tile=256, levels=1, seed=3, lesion=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with caplog.at_level(logging.INFO, logger="napari_milview._reader"):
            [(_, kwargs, kind)] = read_slide(str(res.path))
    md = kwargs["metadata"]
    assert kind == "image" and md["derived_levels"]
    [note] = md["info_notes"]
    assert "built lazily" in note and note in md["notes"]
    assert any("built lazily" in r.getMessage() for r in caplog.records)
    # the slide says which notes only inform; what the user can act on stays a warning
    slide = kwargs["metadata"]["slide"]
    assert slide.info.info_notes == (note,)


@pytest.mark.realdata
def test_real_slide_opens_without_warnings():
    """The real CMU slide (one level) no longer pops a toast on open."""
    from napari_milview._reader import read_slide

    path = ROOT / "tests" / "data" / "CMU-1-Small-Region.svs"
    if not path.exists():
        pytest.skip("the real slide is fetched by `make test-data`")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        [(_, kwargs, _)] = read_slide(str(path))
    assert kwargs["metadata"]["info_notes"]

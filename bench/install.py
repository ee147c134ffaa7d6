"""Install and start-up: the napari plugin manager's install path, timed without the download,
and what the plugin adds to napari's start-up.

1. Build the wheel from this checkout (``python -m build --no-isolation --wheel``).
2. ``pip download`` napari[pyqt5] and the wheel's dependencies into a folder (not timed: that
   is the network), the CPU torch pinned through ``.ci/constraints.txt``.
3. Timed: a fresh venv, then ``pip install --no-index --find-links DIR "napari[pyqt5]"
   WHEEL[pyqt5]`` (what the plugin manager runs, offline); the venv's size.
4. Start-up, in that venv, each a fresh process under Xvfb, ``--runs`` times, medians:
   ``import napari; napari.Viewer(show=False)`` with the plugin installed, then with it
   disabled (napari's ``plugins.disabled_plugins`` setting, in a private ``NAPARI_CONFIG``);
   and, plugin enabled, the time to open its MIL attention dock.

Usage: ``python bench/install.py [--runs 3] [--docs docs/BENCHMARKS.md] [--keep DIR]``.
Needs the registry for step 2 and xvfb-run when there is no $DISPLAY.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _docs import cpu_model, write_block  # noqa: E402

XVFB = ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24"]

# one child process: import napari, a viewer, optionally the plugin's dock; times as JSON
PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import napari
t1 = time.perf_counter()
v = napari.Viewer(show=False)
t2 = time.perf_counter()
out = {"import_s": t1 - t0, "viewer_s": t2 - t1}
if sys.argv[1] == "dock":
    v.window.add_plugin_dock_widget("napari-milview", "MIL attention")
    out["dock_s"] = time.perf_counter() - t2
from npe2 import PluginManager
pm = PluginManager.instance()
out["milview_enabled"] = not pm.is_disabled("napari-milview") and any(
    m.name == "napari-milview" for m in pm.iter_manifests())
# the dock starts a background worker; closing before it ends aborts the process at exit
# (superqt: "WorkerBaseSignals has been deleted"), so let it finish first (not timed)
from qtpy.QtCore import QThreadPool
QThreadPool.globalInstance().waitForDone(30000)
v.close()
print("PROBE" + json.dumps(out))
"""


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def du_mb(path: Path) -> float:
    files = (f for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return sum(f.stat().st_size for f in files) / 1e6


def probe(py: Path, mode: str, env: dict) -> dict:
    wrap = [] if os.environ.get("DISPLAY") else XVFB
    t0 = time.perf_counter()
    p = run([*wrap, str(py), "-c", PROBE, mode], env=env, timeout=300)
    wall = time.perf_counter() - t0
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("PROBE"))
    return {**json.loads(line[5:]), "process_s": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--docs", type=Path, default=None,
                    help="write the results block into this markdown file")
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep it")
    args = ap.parse_args(argv)

    t_all = time.perf_counter()
    work = args.keep or Path(tempfile.mkdtemp(prefix="milview-install-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PIP_CONSTRAINT=str(ROOT / ".ci" / "constraints.txt"),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("MILVIEW_CACHE_DIR", None)
    try:
        dist = work / "dist"
        shutil.rmtree(dist, ignore_errors=True)
        run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(dist),
             str(ROOT)])
        whl = next(dist.glob("*.whl"))
        wheels = work / "wheels"
        t0 = time.perf_counter()
        run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels),
             "napari[pyqt5]", f"{whl}[pyqt5]"], env=env, timeout=1800)
        download_s = time.perf_counter() - t0
        n_wheels = len(list(wheels.glob("*")))
        wheels_mb = du_mb(wheels)

        venv = work / "venv"
        shutil.rmtree(venv, ignore_errors=True)
        t0 = time.perf_counter()
        run([sys.executable, "-m", "venv", str(venv)])
        venv_s = time.perf_counter() - t0
        py = venv / "bin" / "python"
        t0 = time.perf_counter()
        run([str(py), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
             "napari[pyqt5]", f"{whl}[pyqt5]"], env=env, timeout=1800)
        install_s = time.perf_counter() - t0
        venv_mb = du_mb(venv)
        run([str(py), "-m", "pip", "check"], env=env)

        # start-up: private napari settings and caches, so nothing of the user's leaks in
        cfg_on, cfg_off = work / "napari-on.yaml", work / "napari-off.yaml"
        cfg_on.write_text("schema_version: 0.7.0\n")
        cfg_off.write_text("schema_version: 0.7.0\nplugins:\n  disabled_plugins:\n"
                           "  - napari-milview\n")
        base = dict(env, XDG_CACHE_HOME=str(work / "xdg"), MILVIEW_CONFIG_DIR=str(work / "cfg"),
                    QT_QPA_PLATFORM="xcb")
        probe(py, "plain", dict(base, NAPARI_CONFIG=str(cfg_on)))  # warm-up: .pyc, fonts
        on, off, dock = [], [], []
        for _ in range(args.runs):
            on.append(probe(py, "plain", dict(base, NAPARI_CONFIG=str(cfg_on))))
            off.append(probe(py, "plain", dict(base, NAPARI_CONFIG=str(cfg_off))))
            dock.append(probe(py, "dock", dict(base, NAPARI_CONFIG=str(cfg_on))))
        assert all(r["milview_enabled"] for r in on), on
        assert not any(r["milview_enabled"] for r in off), off
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    total = time.perf_counter() - t_all
    vers = run([sys.executable, "-c", "import napari, PyQt5.QtCore as q; "
                "print(napari.__version__, q.PYQT_VERSION_STR)"]).stdout.split()
    lines = [
        f"Machine: this dev machine, {os.cpu_count()} cores, {cpu_model()}, Linux "
        f"{platform.release()}; date {datetime.date.today()}; python {platform.python_version()}, "
        f"napari {vers[0]}, PyQt5 {vers[1]}, wheel {whl.name} ({whl.stat().st_size / 1e3:.0f} kB).",
        "",
        f"Command: `.venv/bin/python bench/install.py --runs {args.runs}"
        f"{' --docs ' + str(args.docs) if args.docs else ''}`; total {total:.0f} s.",
        "",
        "| step | figure |",
        "| --- | --- |",
        f"| `pip download` napari[pyqt5] + the wheel's dependencies (not part of the install time) "
        f"| {download_s:.0f} s, {n_wheels} files, {wheels_mb:.0f} MB |",
        f"| `python -m venv` | {venv_s:.1f} s |",
        f"| **`pip install --no-index --find-links` napari[pyqt5] + the wheel[pyqt5]** "
        f"(CPU torch pinned) | **{install_s:.0f} s** |",
        f"| the venv's size | {venv_mb / 1e3:.2f} GB |",
        "",
        f"Start-up in that venv, a fresh process each, medians of {args.runs} (Xvfb, "
        "`QT_QPA_PLATFORM=xcb`; the first, warm-up run not counted):",
        "",
        "| | `import napari` s | `napari.Viewer(show=False)` s | whole process s |",
        "| --- | --- | --- | --- |",
        f"| plugin installed and enabled | {med(on, 'import_s'):.2f} | {med(on, 'viewer_s'):.2f} "
        f"| {med(on, 'process_s'):.2f} |",
        f"| plugin disabled (`plugins.disabled_plugins`) | {med(off, 'import_s'):.2f} "
        f"| {med(off, 'viewer_s'):.2f} | {med(off, 'process_s'):.2f} |",
        "",
        f"Opening the plugin's MIL attention dock (`add_plugin_dock_widget`, first time in the "
        f"process, imports the plugin's Qt side): median {med(dock, 'dock_s'):.2f} s.",
    ]
    body = "\n".join(lines)
    print(body)
    if args.docs:
        write_block(args.docs, "install.py", "## Install and start-up (issue 15)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

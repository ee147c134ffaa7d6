# The two commands the README starts with: `make demo` and `make test`.
# Both work on a fresh Debian machine (Python 3.11, no GPU, no display, root for apt).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU wheel; anything newer drags in several GB of CUDA packages.
export PIP_CONSTRAINT := $(CURDIR)/.ci/constraints.txt
APT_PACKAGES := xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxkbcommon-x11-0 \
	libxcb-image0 libxcb-render-util0 libxcb-shape0 libxcb-randr0 libxcb-xfixes0 \
	libxcb-cursor0 libgl1 libegl1 libfontconfig1 libdbus-1-3
XVFB := xvfb-run -a -s "-screen 0 1280x1024x24"
REAL_SLIDE := tests/data/CMU-1-Small-Region.svs

.PHONY: demo test wheel-smoke install system-deps test-data bench clean

system-deps:  ## Xvfb and the X/GL libraries Qt needs (apt, only when missing)
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		echo "installing system packages: $(APT_PACKAGES)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

$(VENV)/.installed: setup.cfg pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 -e ".[testing,pyqt5,pyqt6,bench,vahadane]"
	$(PY) -m pip check
	touch $@

install: $(VENV)/.installed  ## the virtual environment with the package, editable

$(REAL_SLIDE): tests/data/fetch_real_data.py
	$(PY) tests/data/fetch_real_data.py $@

test-data: $(REAL_SLIDE)  ## the real Aperio CMU-1-Small-Region slide, hash-checked

test: system-deps install test-data  ## lint, then the whole test suite, headless (Xvfb)
	$(VENV)/bin/ruff check napari_milview tests bench sample_data
	$(VENV)/bin/npe2 validate napari-milview --imports
	$(XVFB) $(PY) -m pytest
	@echo "== the whole suite again under PyQt6 (napari 0.9 recommends it; PyQt5 is the default)"
	QT_API=pyqt6 PYTEST_QT_API=pyqt6 $(XVFB) $(PY) -m pytest -q

wheel-smoke: system-deps install  ## build wheel+sdist, install the wheel in a fresh venv, use it
	.ci/run wheel-smoke

demo: system-deps install  ## napari on the bundled synthetic slide (headless: a screenshot)
	@if [ -n "$$DISPLAY" ]; then $(VENV)/bin/milview demo; \
	else echo "no display: rendering headless to demo.png"; \
		QT_QPA_PLATFORM=xcb $(XVFB) $(VENV)/bin/milview demo --screenshot demo.png; fi

bench: system-deps install  ## streaming benchmark (prints the table for docs/BENCHMARKS.md)
	$(XVFB) $(PY) bench/stream.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache

# Two entry points (see README): `make train` and `make test`. Both create .venv with Python 3.12 first.
# Python: python3.12 on PATH, else pyenv's 3.12 (this machine's default python3 is 3.11, which only gets jax 0.10).
PYTHON312 ?= $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' 2>/dev/null && echo python3.12 || ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv train test test-slow lint bench clean

$(STAMP): setup.cfg pyproject.toml
	@test -n "$(PYTHON312)" || (echo "error: Python 3.12 not found (install python3.12 or set PYTHON312=/path/to/python3.12)" >&2; exit 1)
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The main job: train a small ByteLM on the built-in corpus (this Python's stdlib), report bits per byte and a sample.
train: $(STAMP)
	$(VENV)/bin/bytescale train --model bytelm --preset tiny --data stdlib --max-data-bytes 4000000 \
	  --steps 300 --out runs/make-train --sample-bytes 200 --prompt "def "

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q --durations=25

test-slow: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check bytescale tests examples benchmarks

clean:
	rm -rf runs

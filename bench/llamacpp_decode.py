"""Decode tokens/s: dsalite's engine vs llama.cpp on the same F32 weights of a ~300M-parameter GLM-DSA model.

One run builds a random GLM-5-shaped model (indexer head dim 64, as llama.cpp needs), trains a small byte-level
tokenizer for it, exports an F32 GGUF, then times greedy decoding of --new tokens after a --prompt-token prompt in
llama.cpp (llama-cpp-python, F32 KV cache) and in dsalite (`dsalite.generate`), with the same thread count, and
prints both and the ratio dsalite / llama.cpp. llama.cpp is the build its users get: `make llamacpp-native`
(llama-cpp-python compiled GGML_NATIVE=ON, pip's default, for this CPU's instructions); `--llamacpp portable` times the
portable build the interop tests use instead (`make llamacpp`, GGML_NATIVE=OFF: no AVX-512 even where the CPU has it),
labelled as such. Before timing, both engines' last-position logits on the prompt are compared (same argmax, close
values), so the two really run the same model.

    .venv/bin/python bench/llamacpp_decode.py [--threads 2] [--prompt 128] [--new 32] [--workdir DIR]
                                              [--llamacpp native|portable] [--isa native|avx2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_machine_arguments, header, use_machine  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMACPP_VER = "0.3.36"

CONFIG = dict(
    model_type="glm_moe_dsa", vocab_size=8192, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
    num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=512, kv_lora_rank=256,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=4, n_group=1, topk_group=1, first_k_dense_replace=1, index_topk=64, index_n_heads=8,
    index_head_dim=64, index_topk_freq=4, index_skip_topk_offset=3, num_nextn_predict_layers=1,
    max_position_embeddings=4096, rms_norm_eps=1e-5, routed_scaling_factor=2.5, bos_token_id=0, eos_token_id=1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def native_dir() -> str:
    """Where `make llamacpp-native` installs the build for this CPU (the Makefile names it by the CPU's flags)."""
    with open("/proc/cpuinfo") as f:
        line = next((x for x in f if x.startswith(("flags", "Features"))), "")
    return os.path.join(ROOT, ".cache", f"llamacpp-native-{LLAMACPP_VER}-{hashlib.md5(line.encode()).hexdigest()[:12]}")


def import_llama_cpp(which: str):
    """llama_cpp from the native build (put first on sys.path) or the portable one installed in the venv."""
    if which == "native":
        path = native_dir()
        if not os.path.exists(os.path.join(path, ".built")):
            raise SystemExit(f"no native llama.cpp build for this CPU at {path}: run `make llamacpp-native` (about 8 "
                             "minutes), or pass --llamacpp portable to time the portable build")
        sys.path.insert(0, path)
    import llama_cpp

    if which == "native" and not llama_cpp.__file__.startswith(path):
        raise SystemExit(f"llama_cpp was imported from {llama_cpp.__file__}, not from the native build {path}")
    return llama_cpp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--new", type=int, default=32, help="decoded tokens (default 32)")
    ap.add_argument("--compile", action="store_true",
                    help="also time dsalite's compiled engine (generate(compile=True); compiling is not timed)")
    ap.add_argument("--workdir", default=None, help="where the checkpoint and GGUF go (default: a temp dir)")
    ap.add_argument("--llamacpp", choices=["native", "portable"], default="native",
                    help="llama.cpp build: native (GGML_NATIVE=ON, as pip builds it; `make llamacpp-native`, "
                         "default) or portable (GGML_NATIVE=OFF, the tests' build; `make llamacpp`)")
    add_machine_arguments(ap)
    a = ap.parse_args()
    use_machine(a)
    llama_cpp = import_llama_cpp(a.llamacpp)

    from dsalite import generate
    from dsalite.checkpoint import gguf
    from dsalite.config import ModelConfig
    from dsalite.model import Transformer
    from dsalite.training.data import builtin_corpus, read_documents, train_tokenizer

    torch.set_num_threads(a.threads)
    work = a.workdir or tempfile.mkdtemp(prefix="dsalite-bench-")
    os.makedirs(work, exist_ok=True)
    cfg = ModelConfig.from_hf(CONFIG)
    model = Transformer(cfg)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    model.eval()
    train_tokenizer(read_documents(builtin_corpus()[:6]), cfg.vocab_size, work)  # the demo's BPE, on 6 plays
    path = os.path.join(work, "glm-dsa-300m-f32.gguf")
    gguf.export(model, path, "f32", tokenizer=work)
    header(f"decode tokens/s, dsalite vs llama.cpp ({a.llamacpp} build), {a.threads} thread(s)")
    system = llama_cpp.llama_print_system_info()
    print(f"# llama.cpp {a.llamacpp} build ({llama_cpp.__file__}): "
          f"{(system.decode() if isinstance(system, bytes) else str(system)).strip()}")
    print(f"model: {model.num_params() / 1e6:.0f}M parameters (MTP included), {os.path.getsize(path) / 2**30:.2f} GiB "
          f"GGUF; prompt {a.prompt} tokens, {a.new} new, {a.threads} thread(s)")
    ids = torch.randint(2, cfg.vocab_size, (1, a.prompt), generator=torch.Generator().manual_seed(1))

    from dsalite.inference.runner import Stats

    def dsalite_tps(compile: bool) -> float:
        generate(model, ids, max_new_tokens=4, compile=compile)  # warm-up (and the compile)
        st = Stats()
        generate(model, ids, max_new_tokens=a.new + 1, stats=st, compile=compile)
        # the first new token comes from the prefill logits; time the a.new decode steps after it
        return (st.decode_tokens - 1) / st.decode_s if st.decode_s else float("nan")

    # dsalite first: once llama.cpp has run, its thread pool (and its OpenMP runtime) competes with torch's for the
    # same cores and a compiled step's parallel loops slowed 30-fold here
    ours = [("dsalite", dsalite_tps(False))] + ([("dsalite compiled", dsalite_tps(True))] if a.compile else [])
    llm = llama_cpp.Llama(model_path=path, n_ctx=a.prompt + a.new + 8, n_batch=512, n_threads=a.threads,
                          n_threads_batch=a.threads, type_k=0, type_v=0, verbose=False,
                          logits_all=True)  # without it llama-cpp-python keeps no prompt row in `scores` (all 0)
    llm.eval(ids[0].tolist())
    check_same_model(model, ids, torch.from_numpy(llm.scores[llm.n_tokens - 1].copy()))
    tok = int(llm.scores[llm.n_tokens - 1].argmax())
    t0 = time.perf_counter()
    for _ in range(a.new):
        llm.eval([tok])
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
    llama_tps = a.new / (time.perf_counter() - t0)
    del llm

    rows = [("llama.cpp", llama_tps)] + ours
    print(f"{'engine':<17} {'decode tok/s':>12} {'vs llama.cpp':>13}")
    for name, tps in rows:
        print(f"{name:<17} {tps:>12.2f} {tps / llama_tps:>12.2f}x")

def check_same_model(model, ids, llama_logits, rtol: float = 1e-2) -> None:
    """Raise unless dsalite's last-position logits on the prompt have llama.cpp's argmax and are close to them (within
    rtol of the largest logit: llama.cpp sums in other orders, and its indexer keys go through a Hadamard rotation)."""
    with torch.no_grad():
        ours = model(ids).logits[0, -1].float()
    err = (ours - llama_logits).abs().max().item()
    tol = rtol * max(1.0, llama_logits.abs().max().item())
    print(f"logits check: max |dsalite - llama.cpp| = {err:.3g} (tolerance {tol:.3g}), argmax "
          f"{int(ours.argmax())} / {int(llama_logits.argmax())}")
    if not (err <= tol and int(ours.argmax()) == int(llama_logits.argmax())):
        raise SystemExit("bench: dsalite and llama.cpp disagree on the prompt's logits: they would not be timing the "
                         "same model")


if __name__ == "__main__":
    main()

"""Decode tokens/s: dsalite's engine vs llama.cpp on the same F32 weights of a ~300M-parameter GLM-DSA model.

One run builds a random GLM-5-shaped model (indexer head dim 64, as llama.cpp needs), trains a small byte-level
tokenizer for it, exports an F32 GGUF, then times greedy decoding of --new tokens after a --prompt-token prompt in
llama.cpp (llama-cpp-python, F32 KV cache) and in dsalite (`dsalite.generate`), with the same thread count, and
prints both and the ratio dsalite / llama.cpp. Needs `make llamacpp` (llama-cpp-python built from its sdist).

    .venv/bin/python bench/llamacpp_decode.py [--threads 2] [--prompt 128] [--new 32] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

CONFIG = dict(
    model_type="glm_moe_dsa", vocab_size=8192, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
    num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=512, kv_lora_rank=256,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=4, n_group=1, topk_group=1, first_k_dense_replace=1, index_topk=64, index_n_heads=8,
    index_head_dim=64, index_topk_freq=4, index_skip_topk_offset=3, num_nextn_predict_layers=1,
    max_position_embeddings=4096, rms_norm_eps=1e-5, routed_scaling_factor=2.5, bos_token_id=0, eos_token_id=1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--new", type=int, default=32, help="decoded tokens (default 32)")
    ap.add_argument("--compile", action="store_true",
                    help="also time dsalite's compiled engine (generate(compile=True); compiling is not timed)")
    ap.add_argument("--workdir", default=None, help="where the checkpoint and GGUF go (default: a temp dir)")
    a = ap.parse_args()
    import llama_cpp

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
    print(f"model: {model.num_params() / 1e6:.0f}M parameters (MTP included), {os.path.getsize(path) / 2**30:.2f} GiB "
          f"GGUF; prompt {a.prompt} tokens, {a.new} new, {a.threads} thread(s)")
    ids = torch.randint(2, cfg.vocab_size, (1, a.prompt), generator=torch.Generator().manual_seed(1))

    llm = llama_cpp.Llama(model_path=path, n_ctx=a.prompt + a.new + 8, n_batch=512, n_threads=a.threads,
                          n_threads_batch=a.threads, type_k=0, type_v=0, verbose=False)
    llm.eval(ids[0].tolist())
    tok = int(llm.scores[llm.n_tokens - 1].argmax())
    t0 = time.perf_counter()
    for _ in range(a.new):
        llm.eval([tok])
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
    llama_tps = a.new / (time.perf_counter() - t0)
    del llm

    from dsalite.inference.engine import Stats

    def dsalite_tps(compile: bool) -> float:
        generate(model, ids, max_new_tokens=4, compile=compile)  # warm-up (and the compile)
        st = Stats()
        generate(model, ids, max_new_tokens=a.new + 1, stats=st, compile=compile)
        # the first new token comes from the prefill logits; time the a.new decode steps after it
        return (st.decode_tokens - 1) / st.decode_s if st.decode_s else float("nan")

    rows = [("llama.cpp", llama_tps), ("dsalite", dsalite_tps(False))]
    if a.compile:
        rows.append(("dsalite compiled", dsalite_tps(True)))
    print(f"{'engine':<17} {'decode tok/s':>12} {'vs llama.cpp':>13}")
    for name, tps in rows:
        print(f"{name:<17} {tps:>12.2f} {tps / llama_tps:>12.2f}x")

if __name__ == "__main__":
    main()

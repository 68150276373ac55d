"""Serving: aggregate output tokens/s, time to first token and inter-token latency at several concurrencies, for
`dsalite serve` and llama.cpp's own server (llama-cpp-python's server extra) on the same weights.

One run builds a random GLM-DSA model (indexer head dim 64, as llama.cpp needs), trains the demo's byte-level BPE
tokenizer for it, saves the HF checkpoint and exports it to an F32 GGUF with dsalite's exporter; then each server in
turn is started as its own process with the same thread count, warmed up with one request, and sent the same text
prompts by `concurrency` streaming clients at once (the official async openai client), each asking for --new greedy
tokens with EOS masked (dsalite: ignore_eos; llama.cpp: a -100 logit bias on the EOS id), --rounds requests per
client. Per concurrency it prints aggregate output tokens/s (all tokens / wall time), p50/p99 time to first token
and p50/p99 inter-token latency (gaps between streamed tokens), and the ratios dsalite / llama.cpp. llama.cpp's
Python server runs one request at a time; dsalite batches them (continuous batching over the paged cache).

    .venv/bin/python bench/serve.py [--threads 2] [--prompt 64] [--new 32] [--concurrency 1,8,32] [--rounds 1]
                                    [--llamacpp portable|native|none] [--workdir DIR] [--max-batch 32] [--compile]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header  # noqa: E402
from llamacpp_decode import CONFIG as LLAMACPP_CONFIG, native_dir  # noqa: E402

# llamacpp_decode.py's GLM-DSA model made small enough that 32 clients finish in seconds on two cores (57.5M
# parameters with MTP): the same heads, experts, indexer and schedule, narrower and shallower
CONFIG = dict(LLAMACPP_CONFIG, vocab_size=4096, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
              num_hidden_layers=6, q_lora_rank=256, kv_lora_rank=128)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(work: str) -> tuple[str, str, list[str], int]:
    """The checkpoint directory, its GGUF, long texts to cut prompts from, the parameter count."""
    from dsalite.checkpoint import gguf
    from dsalite.config import ModelConfig
    from dsalite.model import Transformer
    from dsalite.training.data import builtin_corpus, read_documents, train_tokenizer

    hf = os.path.join(work, "hf")
    cfg = ModelConfig.from_hf(CONFIG)
    model = Transformer(cfg)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    model.eval().save_pretrained(hf)
    docs = read_documents(builtin_corpus()[:6])
    train_tokenizer(docs, cfg.vocab_size, hf)
    path = os.path.join(work, "bench-serve-f32.gguf")
    gguf.export(model, path, "f32", tokenizer=hf)
    text = " ".join(d.text for d in docs[:1])
    return hf, path, [text[i * 997 : i * 997 + 4000] for i in range(64)], model.num_params()


def cut_prompts(hf: str, texts: list[str], n: int) -> list[str]:
    """Each text cut to its first n tokens (dsalite's tokenizer; llama.cpp reads the same BPE from the GGUF)."""
    from dsalite.inference.text import TextModel

    tm = TextModel.load(hf)
    return [tm.tokenizer.decode(tm.encode(t)[:n], skip_special_tokens=False) for t in texts]


class Server:
    def __init__(self, name: str, argv: list[str], port: int, extra: dict, log: str):
        self.name, self.port, self.extra = name, port, extra
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    self.stop()
                    raise SystemExit(f"bench: the {name} server did not start (see {log})")
                time.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def one(client, model: str, prompt: str, new: int, extra: dict) -> tuple[float, list[float], int]:
    """One streamed completion: (time to first token, inter-token gaps, tokens)."""
    t0 = time.perf_counter()
    stamps, n = [], 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=new, temperature=0, stream=True,
                                             logprobs=0, extra_body=extra)
    async for chunk in stream:
        if not chunk.choices:
            continue
        lp = chunk.choices[0].logprobs
        k = len(lp.tokens) if lp is not None and lp.tokens else (1 if chunk.choices[0].text else 0)
        if k:
            now = time.perf_counter()
            stamps += [now] * k  # tokens that arrive together: the gap to the first, zero between them
            n += k
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - t0, gaps, n


async def level(server: Server, model: str, prompts: list[str], c: int, new: int, rounds: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0, timeout=3600)

    async def worker(i: int):
        return [await one(client, model, prompts[(i * rounds + r) % len(prompts)], new, server.extra)
                for r in range(rounds)]

    t0 = time.perf_counter()
    runs = [x for w in await asyncio.gather(*(worker(i) for i in range(c))) for x in w]
    wall = time.perf_counter() - t0
    await client.close()
    ttft = [r[0] for r in runs]
    gaps = [g for r in runs for g in r[1]]
    tokens = sum(r[2] for r in runs)
    return {"tps": tokens / wall, "tokens": tokens, "wall": wall, "ttft": ttft, "itl": gaps}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def measure(server: Server, model: str, prompts: list[str], levels: list[int], new: int, rounds: int) -> dict:
    # warm-up: one row, then rows of different lengths (a compiled server compiles its batched decode step here)
    asyncio.run(level(server, model, prompts[:1], 1, 4, 1))
    asyncio.run(level(server, model, [p[: len(p) * (4 - i) // 4] for i, p in enumerate(prompts[:3])], 3, 4, 1))
    return {c: asyncio.run(level(server, model, prompts, c, new, rounds)) for c in levels}


def paged_decode(contexts: list[int], batch: int, reps: int = 5) -> None:
    """One decode step of `batch` sequences at each context length T: the serving runner over the paged cache
    (blocks scattered through the pool) against the contiguous `LatentCache` runner, and the part of the paged step
    that gathers every cached latent and indexer key per layer (what a truly sparse paged read would skip for the
    latents). Caches hold random latents: only the time matters here."""
    from common import median_time

    from dsalite.config import ModelConfig
    from dsalite.inference.cache import LatentCache
    from dsalite.inference.runner import Runner
    from dsalite.inference.serve.paged_cache import PagedLatentCache
    from dsalite.inference.serve.runner import ModelRunner
    from dsalite.model import Transformer

    cfg = ModelConfig.from_hf(CONFIG)
    model = Transformer(cfg)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    model.eval()
    B, bs, g = batch, 16, torch.Generator().manual_seed(0)
    print(f"\npaged decode step vs contiguous cache: batch {B}, block size {bs}, index_topk {cfg.index_topk}, "
          f"{torch.get_num_threads()} thread(s), median of {reps}")
    print(f"{'T':>6} {'contiguous ms':>14} {'paged ms':>9} {'ratio':>6} {'gather ms':>10} {'gather share':>13}")
    for T in contexts:
        c = LatentCache(cfg, B, T + 1)
        c.append_tokens(torch.ones(B, T, dtype=torch.bool), torch.arange(T).expand(B, T))
        for i in c.latent:
            c.update_latent(i, torch.randn(B, T, c.latent[i].shape[-1], generator=g))
        for i in c.index_keys:
            c.update_index_keys(i, torch.randn(B, T, cfg.index_head_dim, generator=g))
        c.advance(T)
        runner = Runner(model, c)
        tok, pos = torch.full((B, 1), 7), torch.full((B, 1), T)

        def contiguous():
            runner.feed(tok, torch.ones(B, 1, dtype=torch.bool), pos)
            c.crop(T)

        t_contig = median_time(contiguous, reps)
        del runner, c
        per = -(-(T + 1) // bs)
        pc = PagedLatentCache(cfg, B * per, bs)
        for pool in (*pc.latent.values(), *pc.index_keys.values()):
            pool.normal_(generator=g)
        order = torch.randperm(B * per, generator=g).tolist()
        rows = [(order[b * per : (b + 1) * per], T, [7]) for b in range(B)]
        paged = ModelRunner(model, pc)
        t_paged = median_time(lambda: paged.run(rows), reps)
        read = paged.layout(rows).read.reshape(-1)
        t_gather = median_time(lambda: [p.index_select(0, read) for p in (*pc.latent.values(),
                                                                          *pc.index_keys.values())], reps)
        print(f"{T:>6} {t_contig * 1e3:>14.1f} {t_paged * 1e3:>9.1f} {t_paged / t_contig:>6.2f} "
              f"{t_gather * 1e3:>10.1f} {t_gather / t_paged:>12.0%}")
        del paged, pc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads for each server (default 2)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per request (default 64)")
    ap.add_argument("--new", type=int, default=32, help="output tokens per request (default 32)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    ap.add_argument("--rounds", type=int, default=1, help="requests per client, one after another (default 1)")
    ap.add_argument("--max-batch", type=int, default=32, help="dsalite serve --max-batch (default 32)")
    ap.add_argument("--compile", action="store_true", help="dsalite serve --compile (its warm-up request compiles)")
    ap.add_argument("--llamacpp", choices=["portable", "native", "none"], default="portable",
                    help="llama.cpp build: portable (`make llamacpp`, GGML_NATIVE=OFF, default), native (`make "
                         "llamacpp-native`, this CPU's instructions) or none (dsalite only)")
    ap.add_argument("--workdir", default=None, help="where the checkpoint, GGUF and server logs go (default: temp)")
    ap.add_argument("--paged-decode", default=None, metavar="T,T,...",
                    help="instead: time one decode step of --paged-batch sequences at these context lengths, paged "
                         "cache against the contiguous one (no servers)")
    ap.add_argument("--paged-batch", type=int, default=4, help="sequences in the --paged-decode step (default 4)")
    a = ap.parse_args()
    if a.paged_decode:
        torch.set_num_threads(a.threads)
        header(f"paged decode: the serving runner vs the contiguous cache, {a.threads} thread(s)")
        return paged_decode([int(x) for x in a.paged_decode.split(",")], a.paged_batch)
    levels = [int(x) for x in a.concurrency.split(",")]
    work = a.workdir or tempfile.mkdtemp(prefix="dsalite-bench-serve-")
    os.makedirs(work, exist_ok=True)
    header(f"serving: dsalite serve vs llama.cpp's server ({a.llamacpp} build), {a.threads} thread(s) each")
    hf, gguf_path, texts, n_params = build(work)
    prompts = cut_prompts(hf, texts, a.prompt)
    print(f"model: {n_params / 1e6:.1f}M parameters (MTP included), F32; {len(prompts)} prompts of {a.prompt} "
          f"tokens, {a.new} greedy tokens each, concurrency {levels}, {a.rounds} request(s) per client")
    sys.stdout.flush()

    results = {}
    port = free_port()
    ds = Server("dsalite", [sys.executable, "-m", "dsalite.cli", "serve", hf, "--port", str(port),
                            "--threads", str(a.threads), "--max-batch", str(a.max_batch), "--max-queue", "1024"]
             + (["--compile"] if a.compile else []),
                port, {"ignore_eos": True}, os.path.join(work, "dsalite.log"))
    try:
        results["dsalite"] = measure(ds, "hf", prompts, levels, a.new, a.rounds)
    finally:
        ds.stop()
    if a.llamacpp != "none":
        env_path = native_dir() if a.llamacpp == "native" else None
        if env_path and not os.path.exists(os.path.join(env_path, ".built")):
            raise SystemExit(f"no native llama.cpp build at {env_path}: run `make llamacpp-native`")
        port = free_port()
        if env_path:
            os.environ["PYTHONPATH"] = env_path + os.pathsep + os.environ.get("PYTHONPATH", "")
        ctx = (a.prompt + a.new) * 2 + 64
        lc = Server("llama.cpp", [sys.executable, "-m", "llama_cpp.server", "--model", gguf_path, "--model_alias",
                                  "hf", "--port", str(port), "--n_threads", str(a.threads), "--n_threads_batch",
                                  str(a.threads), "--n_ctx", str(ctx), "--type_k", "0", "--type_v", "0",
                                  "--interrupt_requests", "False"],
                    port, {"logit_bias": {str(CONFIG["eos_token_id"]): -100.0}, "logit_bias_type": "input_ids"},
                    os.path.join(work, "llamacpp.log"))
        try:
            results["llama.cpp"] = measure(lc, "hf", prompts, levels, a.new, a.rounds)
        finally:
            lc.stop()

    print(f"\n{'server':<10} {'conc':>4} {'tokens':>6} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8}   (ms)")
    for name, per in results.items():
        for c, r in per.items():
            print(f"{name:<10} {c:>4} {r['tokens']:>6} {r['tps']:>8.1f} {pct(r['ttft'], 50) * 1e3:>9.0f} "
                  f"{pct(r['ttft'], 99) * 1e3:>9.0f} {pct(r['itl'], 50) * 1e3:>8.1f} {pct(r['itl'], 99) * 1e3:>8.1f}")
    d = results["dsalite"]
    lo, hi = min(levels), max(levels)
    print(f"\ndsalite: aggregate tok/s at concurrency {hi} / {lo} = {d[hi]['tps'] / d[lo]['tps']:.2f}x")
    if "llama.cpp" in results:
        for c in levels:
            print(f"dsalite / llama.cpp aggregate tok/s at concurrency {c}: "
                  f"{d[c]['tps'] / results['llama.cpp'][c]['tps']:.2f}x")


if __name__ == "__main__":
    main()

"""The `dsalite` command: one subcommand per job. Each subcommand's --help explains every option."""

from __future__ import annotations

import argparse
import os
import sys

from dsalite.kernels import memory
from dsalite.presets import PRESETS


def cmd_create(args) -> int:
    import torch

    from dsalite.config import ModelConfig
    from dsalite.model import build_model

    cfg = ModelConfig.from_hf(PRESETS[args.preset])
    g = torch.Generator().manual_seed(args.seed)
    model = build_model(cfg)
    model.init_weights(std=args.init_std, generator=g, router_bias_std=0.05)
    model.save_pretrained(args.out)
    n = model.num_params()
    print(f"wrote {args.preset} ({cfg.model_type}, {n / 1e6:.2f}M parameters, "
          f"{cfg.num_hidden_layers} layers + {cfg.num_nextn_predict_layers} MTP) to {args.out}")
    if cfg.has_indexer:
        sched = "".join("F" if t == "full" else "S" for t in cfg.indexer_types)
        print(f"  indexer schedule (F = full, S = shared; last {cfg.num_nextn_predict_layers} = MTP): {sched}")
    return 0


def cmd_verify(args) -> int:
    from dsalite import verify

    return verify.run(args)


def cmd_convert(args) -> int:
    import torch

    from dsalite.checkpoint.convert import convert

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    convert(args.src, args.dst, dtype=dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {args.dst} ({args.dtype})")
    return 0


_LAYOUT_OPTIONS = ("dp_replicate", "dp_shard", "ep", "pp", "pp_microbatches", "cp")


def cmd_train(args) -> int:
    from dsalite import parallel
    from dsalite.training.recipe import load_recipe
    from dsalite.training.trainer import train

    r = load_recipe(args.recipe)
    if args.init_from:
        r.model.init_from = args.init_from
    for key in _LAYOUT_OPTIONS:
        if getattr(args, key) is not None:
            setattr(r.parallel, key, getattr(args, key))
    out = args.out or os.path.join("out", os.path.splitext(os.path.basename(args.recipe))[0])
    if parallel.in_worker():  # one rank of `--nproc N` or of the user's torchrun
        from dsalite.parallel.launch import run_worker

        return run_worker(_train_rank, r, out, args)
    nproc = args.nproc or 1
    if args.dry_run:  # rank 0's share at the real size, on a fake process group: nothing is allocated or trained
        from dsalite.parallel.plan import plan

        print(plan(r, nproc).table())
        return 0
    parallel.check_recipe(r, nproc)  # a bad layout fails here, before any process starts
    if nproc > 1:
        from dsalite.parallel.launch import launch

        return launch(_worker_argv(args, out), nproc)
    recs = train(r, out, max_steps=args.max_steps, resume=args.resume, progress=not args.quiet)
    _train_summary(r, out, recs)
    return 0


def _worker_argv(args, out: str) -> list[str]:
    argv = [args.recipe, "--out", out, "--nproc", str(args.nproc)]
    for key in ("max_steps", "init_from", *_LAYOUT_OPTIONS):
        if getattr(args, key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return argv + [flag for flag in ("--resume", "--quiet") if getattr(args, flag[2:])]


def _train_rank(r, out: str, args) -> int:
    import torch.distributed as dist

    from dsalite import parallel
    from dsalite.training.trainer import train

    world = int(os.environ["WORLD_SIZE"])
    if args.nproc and args.nproc != world:
        raise parallel.LayoutError(f"--nproc {args.nproc} but this worker's WORLD_SIZE is {world}")
    par = parallel.init(r)
    try:
        recs = train(r, out, max_steps=args.max_steps, resume=args.resume, progress=not args.quiet, par=par)
        if par.is_main:
            print(f"{par.layout.describe()}")
            if par.pipeline is not None:
                print(par.pipeline.describe(par.pipeline.roots[0].cfg, r.data.seq_len))
            _train_summary(r, out, recs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _train_summary(r, out: str, recs: list[dict]) -> None:
    if recs:
        print(f"trained {r.train.stage}: step {recs[-1]['step']}, loss {recs[0]['loss']:.4f} -> {recs[-1]['loss']:.4f}")
    print(f"  metrics     {os.path.join(out, 'metrics.jsonl')} (TensorBoard: {os.path.join(out, 'tensorboard')})")
    print(f"  loss plot   {os.path.join(out, 'loss.png')}")
    print(f"  checkpoints {os.path.join(out, 'checkpoints')}")
    print(f"  HF model    {os.path.join(out, 'hf')}" + (f", adapters {os.path.join(out, 'lora')}"
                                                         if r.train.stage == "lora" else ""))


def cmd_generate(args) -> int:
    from dsalite.inference import text

    return text.run(args)


def cmd_serve(args) -> int:
    from dsalite.inference.serve import server

    return server.run(args)


def cmd_export_gguf(args) -> int:
    from dsalite.checkpoint.gguf import export_checkpoint

    info = export_checkpoint(args.src, args.out, args.dtype, tokenizer=args.tokenizer, pre=args.tokenizer_pre,
                             mtp=not args.no_mtp)
    types = ", ".join(f"{n} {t}" for t, n in sorted(info["types"].items()))
    print(f"wrote {args.out} ({info['tensors']} tensors: {types}; {info['bytes'] / 2**20:.1f} MiB)")
    if "mtp" in info:
        m = info["mtp"]
        print(f"wrote {m['path']} (MTP draft, {m['tensors']} tensors; {m['bytes'] / 2**20:.1f} MiB)")
    return 0


def cmd_env(args) -> int:
    from dsalite import doctor

    return doctor.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsalite",
        description="dsalite: models, checkpoints, training, sparse inference and GGUF export for GLM-5.x, "
                    "DeepSeek-V3.2, DeepSeek-V4 and DeepSeek-V3 / Kimi-K2.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("create", help="write a randomly initialised model from a preset as an HF checkpoint",
                       description="Build a model from a named preset with random weights and save it in HF layout "
                                   "(MTP layers included).")
    c.add_argument("out", help="output directory (written atomically)")
    c.add_argument("--preset", choices=sorted(PRESETS), default="glm-5.2-tiny", help="architecture preset "
                   "(default glm-5.2-tiny: GLM-5.2 IndexShare schedule, one MTP layer)")
    c.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    c.add_argument("--init-std", type=float, default=0.1,
                   help="standard deviation of the normal weight init (default 0.1)")
    c.set_defaults(func=cmd_create)

    from dsalite import verify

    v = sub.add_parser("verify", help="compare logits, hidden states and top-k with HF transformers",
                       description="Load a checkpoint in dsalite and in transformers, run one batch long enough that "
                                   "the DSA top-k selection is sparse, print the comparison; exit 1 when outside "
                                   "tolerance. Needs the `verify` extra (transformers==5.23.0).")
    verify.add_arguments(v)
    v.set_defaults(func=cmd_verify)

    k = sub.add_parser("convert", help="dequantise an FP8 checkpoint to a plain bf16/fp32 HF checkpoint",
                       description="Read an HF checkpoint (FP8 block-scaled or not), dequantise every FP8 weight with "
                                   "its block scales, and write a plain HF checkpoint (MTP kept). DeepSeek-V4 "
                                   "original-layout files (FP8 `X.scale`, FP4 experts with E8M0 scales per 32 "
                                   "columns) keep their tensor names.")
    k.add_argument("src", help="input checkpoint directory")
    k.add_argument("dst", help="output directory (written to a temporary name, then renamed)")
    k.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="output dtype (default bf16)")
    k.add_argument("--max-shard-gb", type=float, default=5.0, help="largest shard in GiB (default 5)")
    k.set_defaults(func=cmd_convert)

    t = sub.add_parser("train", help="train from a TOML recipe (pretrain, SFT, LoRA, the two DSA stages)",
                       description="Run a training recipe (see recipes/). Writes DIR/metrics.jsonl (one JSON object "
                                   "per step), DIR/tensorboard, DIR/loss.png, DIR/checkpoints (atomic, last N kept) "
                                   "and the final model as an HF checkpoint in DIR/hf (LoRA adapters in DIR/lora). "
                                   "train.stage picks what trains: pretrain / sft (all parameters, top-k attention), "
                                   "dsa_warmup (dense attention, indexers only), dsa_sparse (top-k attention, all "
                                   "parameters, KL on the selection), lora (adapters only).")
    t.add_argument("recipe", help="recipe TOML file")
    t.add_argument("--out", metavar="DIR", help="output directory DIR (default out/RECIPE_NAME)")
    t.add_argument("--max-steps", type=int, metavar="N", help="override train.max_steps (the schedule follows it)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in DIR; the losses equal an uninterrupted run's")
    t.add_argument("--init-from", metavar="CKPT",
                   help="override model.init_from: start from this HF checkpoint directory")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--nproc", type=int, metavar="N",
                   help="train on N local processes (torch.distributed: gloo on CPU, NCCL on GPUs) with the recipe's "
                        "[parallel] layout; data.batch_size stays the global batch. Under your own torchrun "
                        "(`torchrun ... -m dsalite.cli train RECIPE`) leave it out")
    t.add_argument("--dry-run", action="store_true",
                   help="plan the layout for --nproc N at the model's real size without training: the model is built "
                        "on the meta device and sharded on a fake process group; prints per-rank bytes of parameters, "
                        "gradients and optimizer state, an activation estimate and the communication per step")
    t.add_argument("--dp-shard", type=int, metavar="N", help="override parallel.dp_shard (FSDP degree; -1 = fill)")
    t.add_argument("--dp-replicate", type=int, metavar="N", help="override parallel.dp_replicate (HSDP replicas)")
    t.add_argument("--ep", type=int, metavar="N",
                   help="override parallel.ep (expert-parallel degree, carved out of dp_shard)")
    t.add_argument("--pp", type=int, metavar="N", help="override parallel.pp (pipeline stages)")
    t.add_argument("--pp-microbatches", type=int, metavar="M", help="override parallel.pp_microbatches")
    t.add_argument("--cp", type=int, metavar="N",
                   help="override parallel.cp (context parallel: each sequence split over N ranks)")
    t.set_defaults(func=cmd_train)

    gn = sub.add_parser("generate", help="generate text with the latent-cache engine (sparse decode, MTP speculation)",
                        description="Generate from a checkpoint: chunked prefill, absorbed sparse decode, optional MTP "
                                    "speculative decoding. The tokenizer is the checkpoint's tokenizer.json; its chat "
                                    "template (tokenizer_config.json or chat_template.jinja) is applied when present. "
                                    "A closing line on stderr reports prefill and decode tokens/s. DeepSeek-V4 "
                                    "decodes with its window + compressor cache (no MTP speculation; prompts of "
                                    "different lengths run one at a time).")
    gn.add_argument("path", help="checkpoint directory")
    gn.add_argument("--prompt", help="prompt text")
    gn.add_argument("--prompts-file", help="batch: one prompt per line (or .jsonl objects with a \"prompt\" field)")
    gn.add_argument("--prompt-ids", help="comma-separated token ids instead of text (no tokenizer needed)")
    gn.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    gn.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    gn.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    gn.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off)")
    gn.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: unseeded)")
    gn.add_argument("--stop", action="append", help="stop string (repeatable); the output is cut before it")
    gn.add_argument("--eos-id", type=int, action="append",
                    help="end-of-sequence token id (repeatable; default: from the checkpoint's configs)")
    gn.add_argument("--no-chat", action="store_true", help="do not apply the chat template even when one exists")
    gn.add_argument("--speculative", choices=["none", "mtp"], default="none",
                    help="mtp: draft with the MTP layer, verify in one forward (batch size 1, not DeepSeek-V4; "
                         "default none)")
    gn.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (default fp32)")
    gn.add_argument("--prefill-chunk", type=int, default=2048,
                    help="prompt tokens per prefill forward; bounds peak memory (default 2048)")
    gn.add_argument("--compile", action="store_true",
                    help="torch.compile the decode steps (not DeepSeek-V4): the first steps take seconds to compile, "
                         "later ones run 2-5x faster (small models gain most); worth it for long generations")
    gn.add_argument("--no-stream", action="store_true", help="print the text at the end instead of as it is made")
    gn.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    gn.set_defaults(func=cmd_generate)


    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (paged latent cache)",
                        description="Serve a checkpoint over the OpenAI API: /v1/models, /v1/completions, "
                                    "/v1/chat/completions (streaming too), /health, /metrics. Requests are batched "
                                    "continuously over a paged latent cache with prefix sharing. MLA families "
                                    "(GLM-5.x, DeepSeek-V3.2, V3). See docs/inference.md (Serving).")
    from dsalite.inference.serve.options import add_arguments as serve_arguments

    serve_arguments(sv)
    sv.set_defaults(func=cmd_serve)

    g = sub.add_parser("export-gguf", help="write a GGUF file that llama.cpp runs (MTP included)",
                       description="Export an HF checkpoint (GLM-5.x -> glm-dsa, DeepSeek-V3.2 -> deepseek32, "
                                   "DeepSeek-V3 -> deepseek2, DeepSeek-V4 -> deepseek4) to a GGUF file with the "
                                   "metadata keys, tensor names and tokenizer llama.cpp's converter writes, keeping "
                                   "the MTP block (DeepSeek-V4: in a second file mtp-OUT beside OUT, the draft file "
                                   "llama.cpp's converter writes with --mtp). FP8/FP4 weights are dequantised first. "
                                   "Needs the `gguf` extra.")
    g.add_argument("src", help="input HF checkpoint directory")
    g.add_argument("out", help="output .gguf file (written to a temporary name, then renamed)")
    g.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], default="f32",
                   help="type of the weight matrices (default f32); norms, biases, the router and the indexer head "
                        "weights (DeepSeek-V4: also mHC mixers and compressor position biases) stay f32, and q8_0 "
                        "falls back to f16 for rows that are not a multiple of 32")
    g.add_argument("--tokenizer", default=None,
                   help="folder with tokenizer.json (+ tokenizer_config.json, chat_template.jinja); default: SRC")
    g.add_argument("--tokenizer-pre", default="auto",
                   help="llama.cpp pre-tokenizer name (tokenizer.ggml.pre); 'auto' (default) picks 'gpt-2' for a "
                        "plain ByteLevel pre-tokenizer and the family's released one otherwise (glm4, deepseek-v3)")
    g.add_argument("--no-mtp", action="store_true", help="leave the MTP (NextN) block out")
    g.set_defaults(func=cmd_export_gguf)

    e = sub.add_parser("env", help="print this machine's CPU, software and the fast paths chosen (for bug reports)",
                       description="Print the CPU model and ISA flags, core count, torch and BLAS builds, the C++ "
                                   "kernel build, whether the kernels or their PyTorch twins run and why (with the "
                                   "calibration's timings), which BLAS runs fp32 products and both measured rates.")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--recalibrate", action="store_true", help="forget this machine's cached measurements first")
    e.add_argument("--no-measure", action="store_true", help="skip timing the two BLAS libraries now")
    e.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    e.set_defaults(func=cmd_env)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    memory.keep_freed_memory()  # training and generation reuse their large buffers: no page faults per step
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError / CheckpointError name the field or tensor
        print(f"dsalite {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

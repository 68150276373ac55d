"""`dsalite serve`'s command-line options (kept apart from server.py so that building the `dsalite` parser does
not import the web stack)."""


def add_arguments(p) -> None:
    p.add_argument("path", help="checkpoint directory (tokenizer.json and the chat template are read from it)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together at most (default 32)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a batch slot at most; more are refused with 429 (default 256)")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="paged cache blocks (default: room for 65536 tokens); the cache's memory is fixed by this. "
                        "DeepSeek-V4: cache rows, one per running sequence, each --max-model-len tokens long "
                        "(default: --max-batch rows)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per cache block (default 16)")
    p.add_argument("--prefill-tokens", type=int, default=512,
                   help="prompt tokens prefilled per step, between decode steps (default 512)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + completion in tokens (default: the model's max_position_embeddings; "
                        "DeepSeek-V4: at most 65536, its rows are preallocated at this length)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not share the blocks of identical prefixes (DeepSeek-V4 never shares: its rows hold "
                        "one sequence's window and compressor state)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: PATH's name)")
    p.add_argument("--speculative", choices=["mtp"], default=None,
                   help="mtp: each sequence drafts its next-but-one token with the checkpoint's MTP layer and the "
                        "batched step verifies it (greedy output unchanged; needs MTP weights; not for DeepSeek-V4 "
                        "yet)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (seconds at first; not for DeepSeek-V4 yet)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests get to finish on SIGINT/SIGTERM before they are cancelled")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info also logs each request; default warning)")

"""Serving: continuous batching over a paged latent cache, and the OpenAI-compatible HTTP server on top.

Layers (nano-vllm's, STYLE.md item 11), one file each:
  sequence.py    a request's state: tokens, sampling options, block table, outputs so far
  blocks.py      block manager: free list, reference counts, prefix cache (content hashes, LRU eviction)
  paged_cache.py the paged latent cache the model writes to and reads from (the model sees the usual interface)
  scheduler.py   pure policy: which sequences prefill (in chunks) and which decode in this step
  runner.py      tensors: block tables -> slot indices -> one model call per step kind
  engine.py      Engine.step() = schedule -> run -> sample -> detokenize/stop -> outputs; `generate` loops it
  chat.py        chat-template rendering, reasoning and tool-call parsing (GLM-5.x, DeepSeek-V3.2/V4)
  server.py      FastAPI app: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics
The server only talks to the engine (through `AsyncEngine`, a thread that loops `step()`).
"""

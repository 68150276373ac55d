"""`dsalite serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streaming as server-sent events
ending in `data: [DONE]`), GET /health, GET /metrics (Prometheus text). Errors are OpenAI's shape
{"error": {"message", "type", "param", "code"}}: bad input 400 naming the field, a missing or wrong API key 401,
a full queue 429 with Retry-After, a request that fails inside the engine 500 for that request only.
A client that disconnects has its request cancelled: its batch slot and cache blocks are free within one step.
The server talks only to `AsyncEngine`; tokenization and chat parsing happen here, on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from dsalite.inference.serve.async_engine import AsyncEngine, QueueFull, Stopping
from dsalite.inference.serve.chat import ChatParser, render, starts_in_reasoning
from dsalite.inference.serve.engine import Output
from dsalite.inference.serve.protocol import APIError, ChatRequest, CompletionRequest
from dsalite.inference.serve.sequence import RequestParams

POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    text: object | None = None  # inference.text.TextModel; None: token ids only
    api_key: str | None = None
    created: int = 0
    shutdown_timeout: float = 10.0


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(state.engine.shutdown, state.shutdown_timeout)

    app = FastAPI(title="dsalite", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return _error_response(validation_error(e.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return _error_response(APIError(e.status_code, str(e.detail), type="invalid_request_error",
                                        code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {state.api_key}":
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        if not state.engine.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.engine.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "dsalite",
            "max_model_len": state.engine.engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        authorize(request)
        check_model(state, body.model)
        if isinstance(body.prompt, str):
            prompt = encode(state, body.prompt, "prompt")
        else:
            prompt = list(body.prompt)
            check_ids(state, prompt, "prompt")
        params = request_params(state, body, len(prompt), default_max=16, param="prompt",
                                logprobs=body.logprobs is not None, top=body.logprobs or 0)
        rid = f"cmpl-{uuid.uuid4().hex}"
        q = submit(state, rid, prompt, params)
        if body.stream:
            return sse(completion_events(state, body, rid, q, len(prompt)), state, rid)
        outs = await collect(state, rid, q, request)
        text = "".join(o.text for o in outs)
        lps = [e for o in outs for e in o.logprobs]
        last = outs[-1]
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": state.model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish(last),
                             "logprobs": completion_logprobs(state, lps, 0) if body.logprobs is not None else None}],
                "usage": usage(last)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        authorize(request)
        check_model(state, body.model)
        text = render_chat(state, body)
        prompt = encode(state, text, "messages")
        params = request_params(state, body, len(prompt), default_max=None, param="messages",
                                logprobs=body.logprobs, top=body.top_logprobs or 0,
                                max_tokens=body.max_completion_tokens or body.max_tokens)
        parser = ChatParser(starts_in_reasoning(text), tools=bool(body.tools) and body.tool_choice != "none")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        q = submit(state, rid, prompt, params)
        if body.stream:
            return sse(chat_events(state, body, rid, q, parser), state, rid)
        outs = await collect(state, rid, q, request)
        reasoning, content, calls = parser.feed("".join(o.text for o in outs))
        r2, c2 = parser.finish()
        reasoning, content = reasoning + r2, content + c2
        message = {"role": "assistant", "content": (content.strip() or None) if calls else content}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        last = outs[-1]
        lps = [e for o in outs for e in o.logprobs]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": state.model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish(last, bool(calls)),
                             "logprobs": {"content": chat_logprobs(state, lps)} if body.logprobs else None}],
                "usage": usage(last)}

    return app


# =========================================================================== request -> engine


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def validation_error(errors) -> APIError:
    """pydantic's first complaint as a 400 naming the field (dotted path into the body)."""
    err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}",
                        code="invalid_json")
    if not loc and err.get("type") == "missing":
        return APIError(400, "the body is empty: send a JSON object", code="invalid_json")
    if not loc and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return APIError(400, "the body must be a JSON object", code="invalid_body")
    param = ".".join(loc) or None
    msg = err["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise APIError(400, f"model {model!r} is not served here; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


def encode(state: ServerState, text: str, param: str) -> list[int]:
    if state.text is None:
        raise APIError(400, "this checkpoint has no tokenizer.json: send the prompt as token ids", param=param)
    ids = state.text.encode(text)
    if not ids:
        raise APIError(400, f"{param} encodes to zero tokens", param=param)
    return ids


def check_ids(state: ServerState, ids: list[int], param: str) -> None:
    V = state.engine.engine.model.cfg.vocab_size
    bad = [t for t in ids if not 0 <= t < V]
    if bad:
        raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary [0, {V})", param=param)


def render_chat(state: ServerState, body: ChatRequest) -> str:
    t = state.text
    if t is None or t.chat_template is None:
        raise APIError(400, "this checkpoint has no chat template (tokenizer_config.json chat_template or "
                       "chat_template.jinja): use /v1/completions", param="messages")
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    tools = None if not body.tools or body.tool_choice == "none" else [x.model_dump(exclude_none=True)
                                                                       for x in body.tools]
    try:
        return render(t.chat_template, messages, tools, True, t.bos or "", t.eos or "",
                      **(body.chat_template_kwargs or {}))
    except Exception as e:  # noqa: BLE001 — the template refused these messages (raise_exception) or broke
        raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None


def request_params(state: ServerState, body, n_prompt: int, default_max: int | None, param: str, logprobs: bool,
                   top: int, max_tokens: int | None = None) -> RequestParams:
    limit = state.engine.engine.max_model_len
    if n_prompt >= limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens; the prompt has {n_prompt}",
                       param=param, code="context_length_exceeded")
    explicit = max_tokens if max_tokens is not None else body.max_tokens
    cache = state.engine.engine.blocks
    room = min(limit, cache.num_blocks * cache.block_size) - n_prompt
    mt = explicit if explicit is not None else min(default_max or room, room)
    if mt < 1:
        raise APIError(400, f"the prompt ({n_prompt} tokens) leaves no room in the cache "
                       f"({cache.num_blocks * cache.block_size} tokens)", param=param, code="context_length_exceeded")
    if body.stop and state.text is None:
        raise APIError(400, "stop strings need the checkpoint's tokenizer.json", param="stop")
    if body.stop_token_ids:
        check_ids(state, body.stop_token_ids, "stop_token_ids")
    try:
        p = RequestParams(max_tokens=mt, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                          seed=body.seed, stop=list(body.stop or []), stop_token_ids=list(body.stop_token_ids or []),
                          ignore_eos=body.ignore_eos, logprobs=logprobs, top_logprobs=top)
        state.engine.engine.check(n_prompt, p.max_tokens)
    except ValueError as e:
        raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
    return p


def submit(state: ServerState, rid: str, prompt: list[int], params: RequestParams) -> asyncio.Queue:
    try:
        return state.engine.submit(rid, prompt, params)
    except QueueFull as e:
        raise APIError(429, str(e), type="requests", code="rate_limit_exceeded", headers={"Retry-After": "1"}) \
            from None
    except Stopping as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down") from None
    except ValueError as e:
        raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None


async def collect(state: ServerState, rid: str, q: asyncio.Queue, request: Request) -> list[Output]:
    """Every Output of a request; cancels it if the client goes away first."""
    outs: list[Output] = []
    try:
        while not outs or not outs[-1].finished:
            try:
                outs.append(await asyncio.wait_for(q.get(), POLL_S))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise asyncio.CancelledError from None
    finally:
        if not outs or not outs[-1].finished:
            state.engine.abort(rid)
    if outs[-1].finish_reason == "error":
        raise APIError(500, f"the request failed in the engine: {outs[-1].error}", type="server_error",
                       code="engine_error")
    return outs


# =========================================================================== engine -> response


def finish(out: Output, tool_calls: bool = False) -> str | None:
    if out.finish_reason == "stop" and tool_calls:
        return "tool_calls"
    return {"stop": "stop", "length": "length", "abort": "stop"}.get(out.finish_reason, out.finish_reason)


def usage(out: Output) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def token_text(state: ServerState, tok: int) -> str:
    if state.text is None:
        return f"token_id:{tok}"
    return state.text.tokenizer.decode([tok], skip_special_tokens=False)


def chat_logprobs(state: ServerState, entries: list[dict]) -> list[dict]:
    out = []
    for e in entries:
        t = token_text(state, e["id"])
        out.append({"token": t, "logprob": e["logprob"], "bytes": list(t.encode()),
                    "top_logprobs": [{"token": (s := token_text(state, i)), "logprob": lp, "bytes": list(s.encode())}
                                     for i, lp in e["top"]]})
    return out


def completion_logprobs(state: ServerState, entries: list[dict], offset: int) -> dict:
    tokens = [token_text(state, e["id"]) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{token_text(state, i): lp for i, lp in e["top"]} for e in entries],
            "text_offset": offsets}


def sse(events, state: ServerState, rid: str) -> StreamingResponse:
    async def body():
        done = False
        try:
            async for ev in events:
                yield f"data: {json.dumps(ev, ensure_ascii=False)}\n\n"
            done = True
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away (or the stream broke): cancel the request at once
                state.engine.abort(rid)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _error_event(out: Output) -> dict:
    return {"error": {"message": f"the request failed in the engine: {out.error}", "type": "server_error",
                      "param": None, "code": "engine_error"}}


async def completion_events(state: ServerState, body: CompletionRequest, rid: str, q: asyncio.Queue, n_prompt: int):
    created, include_usage = int(time.time()), bool(body.stream_options and body.stream_options.include_usage)
    base = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}
    offset = 0
    while True:
        out: Output = await q.get()
        if out.finish_reason == "error":
            yield _error_event(out)
            return
        if out.text or out.finished or out.token_ids:
            lp = completion_logprobs(state, out.logprobs, offset) if body.logprobs is not None else None
            offset += len(out.text)
            ev = {**base, "choices": [{"index": 0, "text": out.text, "logprobs": lp,
                                       "finish_reason": finish(out) if out.finished else None}]}
            if include_usage:
                ev["usage"] = None
            yield ev
        if out.finished:
            break
    if include_usage:
        yield {**base, "choices": [], "usage": usage(out)}


async def chat_events(state: ServerState, body: ChatRequest, rid: str, q: asyncio.Queue, parser: ChatParser):
    created, include_usage = int(time.time()), bool(body.stream_options and body.stream_options.include_usage)
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}

    def chunk(delta: dict, finish_reason=None, logprobs=None) -> dict:
        ev = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if include_usage:
            ev["usage"] = None
        return ev

    yield chunk({"role": "assistant", "content": ""})
    n_calls = 0
    while True:
        out: Output = await q.get()
        if out.finish_reason == "error":
            yield _error_event(out)
            return
        reasoning, content, calls = parser.feed(out.text)
        if out.finished:
            r2, c2 = parser.finish()
            reasoning, content = reasoning + r2, content + c2
        delta = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [{"index": n_calls + i, **c} for i, c in enumerate(calls)]
            n_calls += len(calls)
        lp = {"content": chat_logprobs(state, out.logprobs)} if body.logprobs and out.logprobs else None
        if delta or lp:
            yield chunk(delta, logprobs=lp)
        if out.finished:
            yield chunk({}, finish(out, n_calls > 0))
            break
    if include_usage:
        yield {**base, "choices": [], "usage": usage(out)}


# =========================================================================== the command


def run(args) -> int:
    """`dsalite serve`: see cli.py for the options."""
    import torch
    import uvicorn

    import dsalite
    from dsalite.inference.serve.engine import Engine
    from dsalite.inference.text import TextModel, checkpoint_eos_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = dsalite.from_pretrained(args.path, dtype=dtype).eval()
    has_tokenizer = os.path.exists(os.path.join(args.path, "tokenizer.json"))
    text = TextModel.load(args.path) if has_tokenizer else None
    eos = text.eos_ids if text is not None else checkpoint_eos_ids(args.path)
    engine = Engine(model, num_blocks=args.kv_blocks, block_size=args.block_size, max_batch=args.max_batch,
                    prefill_tokens=args.prefill_tokens, prefix_caching=not args.no_prefix_cache, tokenizer=text,
                    eos_ids=eos, max_model_len=args.max_model_len, compile=args.compile,
                    speculative=args.speculative)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.path))
    state = ServerState(AsyncEngine(engine, args.max_queue), name, text, args.api_key, int(time.time()),
                        args.shutdown_timeout)
    blocks = engine.blocks
    unit = "blocks" if getattr(engine.cache, "paged", False) else "rows"  # rows: one per sequence (DeepSeek-V4)
    print(f"dsalite serve: {name} ({model.cfg.model_type}) on http://{args.host}:{args.port}  "
          f"cache {blocks.num_blocks} {unit} x {blocks.block_size} tokens ({engine.cache.bytes() / 2**20:.1f} MiB), "
          f"batch <= {args.max_batch}, queue <= {args.max_queue}"
          + (", MTP speculation" if args.speculative else "")
          + ("" if text else "; no tokenizer.json: token-id prompts only"), file=sys.stderr, flush=True)
    config = uvicorn.Config(build_app(state), host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=args.log_level == "info")
    uvicorn.Server(config).run()
    return 0

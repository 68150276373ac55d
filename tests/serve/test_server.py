"""The HTTP server driven by the official openai client and by raw HTTP (bad input, auth, queue, disconnects)."""

import http.client
import json
import socket
import time

import openai
import pytest

from serve_fixtures import ServerThread

MSG = [{"role": "user", "content": "to be or not to be"}]


def client(server, key="none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def post(server, path, body, headers=None, raw=False):
    """(status, headers, parsed JSON or text) of one POST; body is sent as given when raw."""
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = body if raw else json.dumps(body)
    c.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    try:
        return r.status, dict(r.getheaders()), json.loads(text)
    except json.JSONDecodeError:
        return r.status, dict(r.getheaders()), text


def get(server, path, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    c.request("GET", path, headers=headers or {})
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    return r.status, text


def wait_idle(server, timeout=10.0):
    end = time.monotonic() + timeout
    while server.engine.has_work or server.aengine.pending:
        assert time.monotonic() < end, "the engine did not go idle"
        time.sleep(0.02)


def test_models_health_metrics(server):
    ms = client(server).models.list()
    assert [m.id for m in ms.data] == ["tiny-glm"]
    assert get(server, "/health") == (200, '{"status":"ok"}')
    status, text = get(server, "/metrics")
    assert status == 200
    for name in ("requests_total", "queue_depth", "running_batch", "generation_tokens_per_second",
                 "time_to_first_token_seconds_bucket", "cache_blocks_in_use"):
        assert f"dsalite_{name}" in text


def test_completion_greedy_matches_the_engine_alone(server, ckpt):
    import torch

    import dsalite
    from dsalite.inference.text import TextModel

    c = client(server)
    r = c.completions.create(model="tiny-glm", prompt="whether tis nobler", max_tokens=6, temperature=0,
                             logprobs=2, extra_body={"ignore_eos": True})
    ch = r.choices[0]
    assert ch.finish_reason == "length" and r.usage.completion_tokens == 6
    tm = TextModel.load(ckpt)
    ids = tm.encode("whether tis nobler")
    assert r.usage.prompt_tokens == len(ids)
    alone = dsalite.generate(server.engine.model, torch.tensor([ids]), max_new_tokens=6)[0, len(ids):].tolist()
    assert ch.text == tm.tokenizer.decode(alone, skip_special_tokens=False)
    assert len(ch.logprobs.token_logprobs) == 6 and all(len(t) <= 2 for t in ch.logprobs.top_logprobs)
    # token-id prompts are accepted too
    r2 = c.completions.create(model="tiny-glm", prompt=ids, max_tokens=6, temperature=0,
                              extra_body={"ignore_eos": True})
    assert r2.choices[0].text == ch.text


def test_streams_equal_non_streaming(server):
    c = client(server)
    full = c.chat.completions.create(model="tiny-glm", messages=MSG, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    chunks = list(c.chat.completions.create(model="tiny-glm", messages=MSG, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    comp = list(c.completions.create(model="tiny-glm", prompt="the slings", max_tokens=5, temperature=0,
                                     stream=True, extra_body={"ignore_eos": True}))
    plain = c.completions.create(model="tiny-glm", prompt="the slings", max_tokens=5, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in comp) == plain.choices[0].text


def test_sse_ends_with_done(server):
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    c.request("POST", "/v1/completions", json.dumps({"model": "tiny-glm", "prompt": "to be", "max_tokens": 3,
                                                     "stream": True}), {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_seeded_sampling_is_reproducible(server):
    c = client(server)
    kw = dict(model="tiny-glm", prompt="or to take arms", max_tokens=8, temperature=1.0, top_p=0.9,
              seed=1234, extra_body={"ignore_eos": True, "top_k": 50})
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text


def test_stop_string_cuts_and_finishes(server):
    c = client(server)
    base = c.completions.create(model="tiny-glm", prompt="the", max_tokens=12, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    stop = base[3:5]
    assert stop and stop not in base[:3]
    r = c.completions.create(model="tiny-glm", prompt="the", max_tokens=12, temperature=0, stop=[stop],
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == base[: base.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="tiny-glm", prompt="the", max_tokens=12, temperature=0, stop=stop,
                                    stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text


def test_concurrent_clients(server):
    from concurrent.futures import ThreadPoolExecutor

    c = client(server)
    prompts = ["to be", "whether tis nobler in the mind", "the", "or to take arms against a sea of troubles"] * 2

    def one(p):
        return c.completions.create(model="tiny-glm", prompt=p, max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text

    alone = [one(p) for p in prompts[:4]]
    with ThreadPoolExecutor(8) as ex:
        together = list(ex.map(one, prompts))
    assert together == alone * 2


# ----- bad input: (body, status, field the error must name) -----
OK = {"model": "tiny-glm", "prompt": "to be", "max_tokens": 2}
CHAT = {"model": "tiny-glm", "messages": MSG, "max_tokens": 2}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
BAD = [
    ("/v1/completions", {**OK, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": -5}, "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": 10**9}, "max_tokens"),
    ("/v1/completions", {**OK, "temperature": -1}, "temperature"),
    ("/v1/completions", {**OK, "temperature": 5}, "temperature"),
    ("/v1/completions", {**OK, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**OK, "top_p": 0}, "top_p"),
    ("/v1/completions", {**OK, "top_p": 1.5}, "top_p"),
    ("/v1/completions", {**OK, "top_k": -3}, "top_k"),
    ("/v1/completions", {**OK, "n": 2}, "n"),
    ("/v1/completions", {**OK, "model": "gpt-4"}, "model"),
    ("/v1/completions", {k: v for k, v in OK.items() if k != "model"}, "model"),
    ("/v1/completions", {k: v for k, v in OK.items() if k != "prompt"}, "prompt"),
    ("/v1/completions", {**OK, "prompt": ""}, "prompt"),
    ("/v1/completions", {**OK, "prompt": []}, "prompt"),
    ("/v1/completions", {**OK, "prompt": 42}, "prompt"),
    ("/v1/completions", {**OK, "prompt": [1, 99999]}, "prompt"),
    ("/v1/completions", {**OK, "prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {**OK, "prompt": "to be " * 3000}, "prompt"),
    ("/v1/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {**OK, "stop": [""]}, "stop"),
    ("/v1/completions", {**OK, "stop": 7}, "stop"),
    ("/v1/completions", {**OK, "stop_token_ids": [100000]}, "stop_token_ids"),
    ("/v1/completions", {**OK, "logprobs": 50}, "logprobs"),
    ("/v1/completions", {**OK, "echo": True}, "echo"),
    ("/v1/completions", {**OK, "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {**OK, "seed": "x"}, "seed"),
    ("/v1/completions", {**OK, "stream": "yes"}, "stream"),
    ("/v1/completions", {**OK, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {k: v for k, v in CHAT.items() if k != "messages"}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": "hello"}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, "messages.0"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools.0.function.name"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format.type"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": 1}, "frequency_penalty"),
]


@pytest.mark.parametrize("path,body,field", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_is_400_naming_the_field(server, path, body, field):
    status, _, r = post(server, path, body)
    assert status == 400, r
    e = r["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["type"] == "invalid_request_error"
    assert e["param"] == field or field in e["message"], e


@pytest.mark.parametrize("raw,what", [("{not json", "JSON"), ("", "JSON"), ("[1, 2]", "object"),
                                      ('{"model": "tiny-glm", "prompt": "a",}', "JSON")])
def test_malformed_bodies(server, raw, what):
    status, _, r = post(server, "/v1/completions", raw, raw=True)
    assert status == 400 and what in r["error"]["message"], r


def test_unknown_route_and_method(server):
    status, _, r = post(server, "/v1/engines", OK)
    assert status == 404 and "error" in r
    assert get(server, "/v1/completions")[0] == 405


def test_no_chat_template_is_400(tmp_path):
    from serve_fixtures import make_checkpoint

    s = ServerThread(make_checkpoint(tmp_path, template=None))
    try:
        status, _, r = post(s, "/v1/chat/completions", CHAT)
        assert status == 400 and r["error"]["param"] == "messages" and "chat template" in r["error"]["message"]
    finally:
        s.stop()


def test_api_key(ckpt):
    s = ServerThread(ckpt, api_key="sekrit")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(s, "wrong").models.list()
        status, headers, r = post(s, "/v1/completions", OK)
        assert status == 401 and r["error"]["code"] == "invalid_api_key"
        assert client(s, "sekrit").completions.create(**OK).usage.completion_tokens >= 1
        assert get(s, "/health")[0] == 200  # health and metrics stay open for probes
    finally:
        s.stop()


def _stream_socket(server, body):
    """A raw socket that has sent a streaming request and read its first event."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    buf = b""
    while b"data: " not in buf:
        buf += sock.recv(4096)
    return sock


def test_full_queue_is_429_and_disconnects_free_their_blocks(ckpt):
    s = ServerThread(ckpt, max_queue=2, max_batch=2)
    try:
        long = {"model": "tiny-glm", "prompt": "to be or not", "max_tokens": 400, "stream": True,
                "ignore_eos": True}
        socks = [_stream_socket(s, long) for _ in range(2)]  # the batch is full
        assert len(s.engine.scheduler.running) == 2 and s.engine.blocks.in_use > 0
        waiting = []
        for _ in range(2):  # fill the queue
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
            data = json.dumps(long).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            waiting.append(sock)
        end = time.monotonic() + 10
        while s.aengine.queue_depth < 2:
            assert time.monotonic() < end
            time.sleep(0.01)
        status, headers, r = post(s, "/v1/completions", OK)
        assert status == 429 and headers.get("retry-after") == "1" and r["error"]["code"] == "rate_limit_exceeded"
        for sock in socks + waiting:  # every client goes away mid-stream
            sock.close()
        wait_idle(s)
        assert s.engine.blocks.in_use == 0 and not s.engine.scheduler.running
        assert s.engine.stats.finished.get("abort", 0) >= 2
        assert s.engine.stats.generation_tokens < 4 * 400  # cancelled, not run to the end
        assert client(s).completions.create(**OK).choices[0].finish_reason in ("length", "stop")
    finally:
        s.stop()


def test_a_failing_request_fails_alone(server, monkeypatch):
    """A request whose model call raises gets a 500 in OpenAI's shape; one decoding beside it is not disturbed."""
    runner = server.engine.runner
    real = runner.run
    poison = 7  # a token id no other prompt of this test contains

    def run(rows):
        if any(poison in ids for _, _, ids in rows):
            raise RuntimeError("injected failure")
        return real(rows)

    c = client(server)
    want = c.completions.create(model="tiny-glm", prompt=[1, 2, 3], max_tokens=20, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    monkeypatch.setattr(runner, "run", run)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as ex:
        good = ex.submit(c.completions.create, model="tiny-glm", prompt=[1, 2, 3], max_tokens=20, temperature=0,
                         extra_body={"ignore_eos": True})
        time.sleep(0.05)
        bad = ex.submit(post, server, "/v1/completions", {**OK, "prompt": [poison, 8, 9]})
        status, _, r = bad.result()
        assert good.result().choices[0].text == want
    assert status == 500 and r["error"]["type"] == "server_error" and "injected failure" in r["error"]["message"]
    wait_idle(server)
    assert server.engine.blocks.in_use == 0


def test_deepseek_v4_serves_streaming_chat_and_concurrent_completions(tmp_path):
    """A DeepSeek-V4 checkpoint through the same server: one cache row per request; streamed chat equals the
    non-streamed answer, and concurrent completions each equal `dsalite.generate` alone."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    import dsalite
    from dsalite.inference.text import TextModel
    from serve_fixtures import make_checkpoint

    path = make_checkpoint(tmp_path, "tiny-v4", v4=True)
    s = ServerThread(path, name="tiny-v4", num_blocks=None, block_size=16, max_batch=4, max_model_len=256)
    try:
        c = client(s)
        kw = dict(model="tiny-v4", messages=MSG, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
        full = c.chat.completions.create(**kw)
        chunks = list(c.chat.completions.create(**kw, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
            full.choices[0].message.content
        tm = TextModel.load(path)
        prompts = ["to be or not", "whether tis nobler in the mind to suffer the slings", "or", "the question"] * 2
        with ThreadPoolExecutor(8) as ex:  # 8 clients, 4 rows: rows are reused while others decode
            got = list(ex.map(lambda p: c.completions.create(model="tiny-v4", prompt=p, max_tokens=8, temperature=0,
                                                             extra_body={"ignore_eos": True}), prompts))
        for p, r in zip(prompts, got):
            ids = tm.encode(p)
            alone = dsalite.generate(s.engine.model, torch.tensor([ids]), max_new_tokens=8)[0, len(ids):].tolist()
            assert r.choices[0].text == tm.tokenizer.decode(alone, skip_special_tokens=False)
        wait_idle(s)
        assert s.engine.blocks.in_use == 0
        status, text = get(s, "/metrics")
        assert status == 200 and "dsalite_cache_blocks_in_use 0" in text
    finally:
        s.stop()

"""Tiny models and a live server for the serving tests."""

import torch

from dsalite.config import ModelConfig
from dsalite.model import build_model
from dsalite.presets import PRESETS, TINY_MLA


def tiny_model(model_type: str = "glm_moe_dsa", seed: int = 0, **overrides):
    """A random tiny MLA model (index_topk 8, so decode past 8 tokens is sparse; 16
    indexer heads make exact-zero ReLU ties at the top-k boundary unlikely); std 0.1 keeps logits tie-free."""
    d = dict(TINY_MLA, model_type=model_type, index_topk=8, index_n_heads=16)
    if model_type == "glm_moe_dsa":
        d.update(index_topk_pattern="FSFS")
    if model_type == "deepseek_v3":
        d.pop("index_topk")
    d.update(overrides)
    m = build_model(ModelConfig.from_hf(d))
    m.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed), router_bias_std=0.05)
    return m.eval()


def tiny_v4(seed: int = 0, **overrides):
    """A random tiny DeepSeek-V4 model (CSA m 4, HCA m 8, window 8); random sinks and position biases so that both
    matter; 8 ReLU indexer heads keep the CSA top-k tie-free."""
    from dsalite.model import Transformer

    m = Transformer(ModelConfig.tiny("deepseek_v4", index_n_heads=8, **overrides))
    g = torch.Generator().manual_seed(seed)
    m.init_weights(std=0.2, generator=g)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("sinks", "position_bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def demo_model(seed: int = 0):
    """A random model of `make demo`'s size: the glm-5.2-tiny preset (8 layers, D 128, vocab 512, index_topk 32,
    one MTP layer)."""
    m = build_model(ModelConfig.from_hf(dict(PRESETS["glm-5.2-tiny"])))
    m.init_weights(std=0.02, generator=torch.Generator().manual_seed(seed))
    return m.eval()


WORDS = ["to be or not to be that is the question", "whether tis nobler in the mind to suffer",
         "the slings and arrows of outrageous fortune", "or to take arms against a sea of troubles"] * 20
# a tiny chat template in the GLM style: role tags, tool calls written back as <tool_call> blocks, tools listed
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content if m.content is string else '' }}"
    "{% if m.tool_calls %}{% for tc in m.tool_calls %}<tool_call>{{ tc.function.name }}"
    "{% for k, v in tc.function.arguments.items() %}<arg_key>{{ k }}</arg_key><arg_value>{{ v | tojson }}"
    "</arg_value>{% endfor %}</tool_call>{% endfor %}{% endif %}\n{% endfor %}"
    "{% if tools %}<|tools|>{{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking %}<think>{% endif %}{% endif %}"
)


def make_checkpoint(root, name: str = "tiny-glm", template: str | None = TEMPLATE, demo: bool = False,
                    v4: bool = False) -> str:
    """A tiny GLM-architecture checkpoint (demo: `demo_model`'s size; v4: a tiny DeepSeek-V4) with a byte-level BPE
    tokenizer.json and a chat template."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = root / name
    model = demo_model() if demo else tiny_v4(vocab_size=320) if v4 else tiny_model(vocab_size=320)
    model.save_pretrained(str(out))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(WORDS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out / "tokenizer.json"))
    conf = {"bos_token": "<s>", "eos_token": "</s>"}
    if template:
        conf["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(conf))
    return str(out)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """`dsalite serve`'s app on 127.0.0.1 in a thread of the test process (so tests can reach into the engine);
    stop() shuts uvicorn down and joins the thread with a timeout."""

    def __init__(self, path: str, api_key: str | None = None, max_queue: int = 64, name: str = "tiny-glm",
                 **engine_kw):
        import threading

        import uvicorn

        import dsalite
        from dsalite.inference.serve.async_engine import AsyncEngine
        from dsalite.inference.serve.engine import Engine
        from dsalite.inference.serve.server import ServerState, build_app
        from dsalite.inference.text import TextModel

        model = dsalite.from_pretrained(path).eval()
        text = TextModel.load(path)
        kw = dict(num_blocks=256, block_size=8, max_batch=16, prefill_tokens=64)
        kw.update(engine_kw)
        self.engine = Engine(model, tokenizer=text, eos_ids=text.eos_ids, **kw)
        self.aengine = AsyncEngine(self.engine, max_queue)
        self.name = name
        self.state = ServerState(self.aengine, self.name, text, api_key, 0, shutdown_timeout=2.0)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(build_app(self.state), host="127.0.0.1", port=self.port, log_level="error",
                             timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        import time

        end = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > end or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "the test server did not stop"
        assert not self.aengine.thread.is_alive(), "the engine thread did not stop"

"""Chat: messages -> prompt text through the checkpoint's own chat template, and the model's text -> reasoning,
content and tool calls.

Rendering follows transformers' `apply_chat_template` (a sandboxed jinja2 environment with trim_blocks and
lstrip_blocks, the loop-controls extension, `raise_exception`, a `tojson` filter that keeps non-ASCII text, and
`strftime_now`), so a template renders here as it does there (tests/serve/test_chat.py compares the two).

Output formats, as the public chat templates of these families write them:
- reasoning: `<think> ... </think>` (GLM-5.x, DeepSeek-V3.2 thinking mode; a prompt that already ends in `<think>`
  starts the reply inside the reasoning block);
- GLM-4.5 / GLM-5.x tool calls: `<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>...</tool_call>`,
  a value is JSON where it parses as JSON, else a string;
- DeepSeek-V3.2 ("DSML") tool calls: `<｜DSML｜function_calls>` holding `<｜DSML｜invoke name="NAME">` with
  `<｜DSML｜parameter name="K" string="true|false">V</｜DSML｜parameter>` (string="true": V is the raw string,
  else JSON), closed by `</｜DSML｜invoke>` and `</｜DSML｜function_calls>`;
- DeepSeek-V3 / V3.1 tool calls: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{JSON}`
  `<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`.
`ChatParser` takes the text as it streams and hands out pieces as soon as they cannot be the start of a marker.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime

THINK, END_THINK = "<think>", "</think>"
DSML = "｜DSML｜"
# (start marker, end marker, parser) of each tool-call block format
GLM_START, GLM_END = "<tool_call>", "</tool_call>"
DSML_START, DSML_END = f"<{DSML}function_calls>", f"</{DSML}function_calls>"
V3_START, V3_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"


# =========================================================================== rendering


def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_TEMPLATES: dict[str, object] = {}


def render(template: str, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", **kwargs) -> str:
    """The prompt text of `messages` (OpenAI message dicts) under a chat template (jinja2 source)."""
    if template not in _TEMPLATES:
        _TEMPLATES[template] = _environment().from_string(template)
    return _TEMPLATES[template].render(messages=[template_message(m) for m in messages], tools=tools or None,
                                       add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                                       eos_token=eos_token, **kwargs)


def template_message(m: dict) -> dict:
    """An OpenAI message as chat templates expect it: text parts joined into one string, tool-call arguments
    as a dict (the templates iterate them) where they are a JSON object."""
    m = {k: v for k, v in m.items() if v is not None}
    content = m.get("content")
    if isinstance(content, list):
        m["content"] = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if m.get("tool_calls"):
        calls = []
        for tc in m["tool_calls"]:
            fn = dict(tc.get("function", {}))
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    parsed = json.loads(args)
                    fn["arguments"] = parsed if isinstance(parsed, dict) else args
                except json.JSONDecodeError:
                    pass
            calls.append({**tc, "function": fn, **fn})  # some templates read tc.name, others tc.function.name
        m["tool_calls"] = calls
    return m


# =========================================================================== parsing


def _value(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def _call(name: str, args: dict) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name.strip(), "arguments": json.dumps(args, ensure_ascii=False)}}


def parse_glm(block: str) -> list[dict]:
    """One `<tool_call>...</tool_call>` block (markers included) -> one OpenAI tool call."""
    body = block[len(GLM_START) : -len(GLM_END)]
    name = body.split("<arg_key>", 1)[0]
    pairs = re.findall(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", body, re.S)
    return [_call(name, {k.strip(): _value(v) for k, v in pairs})]


def parse_dsml(block: str) -> list[dict]:
    calls = []
    for name, body in re.findall(rf'<{DSML}invoke name="(.*?)">(.*?)</{DSML}invoke>', block, re.S):
        args = {}
        for k, is_str, v in re.findall(rf'<{DSML}parameter name="(.*?)"(?: string="(true|false)")?>(.*?)'
                                       rf'</{DSML}parameter>', body, re.S):
            args[k] = v if is_str == "true" else _value(v)
        calls.append(_call(name, args))
    return calls


def parse_v3(block: str) -> list[dict]:
    """V3: `function<sep>NAME\n```json\n{...}\n```` per call; V3.1: `NAME<sep>{...}`."""
    calls = []
    for body in re.findall(r"<｜tool▁call▁begin｜>(.*?)<｜tool▁call▁end｜>", block, re.S):
        kind, _, rest = body.partition("<｜tool▁sep｜>")
        if kind == "function" and "<｜tool▁sep｜>" not in rest:
            name, _, args = rest.partition("\n")
            args = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", args)
        else:
            name, args = kind, rest
        parsed = _value(args.strip())
        calls.append(_call(name, parsed if isinstance(parsed, dict) else {"arguments": parsed}))
    return calls


FORMATS = [(GLM_START, GLM_END, parse_glm), (DSML_START, DSML_END, parse_dsml), (V3_START, V3_END, parse_v3)]


def _partial(text: str, markers) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of the markers (text to hold back)."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


class ChatParser:
    """Splits the reply text, fed as it streams, into reasoning, content and tool calls.

    feed(delta) returns (reasoning, content, tool_calls) that are final; finish() flushes what was held back
    (an unclosed tool-call block is returned as content, an unclosed reasoning block as reasoning)."""

    def __init__(self, in_reasoning: bool = False, tools: bool = True):
        self.reasoning = in_reasoning
        self.tools = tools
        self.buf = ""
        self.n_calls = 0

    def feed(self, delta: str) -> tuple[str, str, list[dict]]:
        self.buf += delta
        reasoning, content, calls = [], [], []
        while self.buf:
            if self.reasoning:
                i = self.buf.find(END_THINK)
                if i < 0:
                    keep = _partial(self.buf, [END_THINK])
                    reasoning.append(self.buf[: len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep :]
                    break
                reasoning.append(self.buf[:i])
                self.buf = self.buf[i + len(END_THINK) :]
                self.reasoning = False
                continue
            starts = [(self.buf.find(s), s, e, f) for s, e, f in (FORMATS if self.tools else [])]
            starts = [x for x in starts if x[0] >= 0]
            t = self.buf.find(THINK)
            if t >= 0 and (not starts or t < min(starts)[0]):
                content.append(self.buf[:t])
                self.buf = self.buf[t + len(THINK) :]
                self.reasoning = True
                continue
            if not starts:
                markers = [THINK] + [s for s, _, _ in (FORMATS if self.tools else [])]
                keep = _partial(self.buf, markers)
                content.append(self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep :]
                break
            i, start, end, parse = min(starts, key=lambda x: x[0])
            j = self.buf.find(end, i)
            content.append(self.buf[:i])
            self.buf = self.buf[i:]
            if j < 0:
                break  # wait for the block's end
            j -= i
            calls += parse(self.buf[: j + len(end)])
            self.buf = self.buf[j + len(end) :]
        self.n_calls += len(calls)
        return "".join(reasoning), "".join(content), calls

    def finish(self) -> tuple[str, str]:
        rest, self.buf = self.buf, ""
        return (rest, "") if self.reasoning else ("", rest)


def starts_in_reasoning(prompt: str) -> bool:
    """A rendered prompt that ends with an open `<think>` makes the reply begin inside the reasoning block."""
    s = prompt.rstrip()
    return s.endswith(THINK)

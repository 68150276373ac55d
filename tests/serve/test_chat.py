"""Chat templates rendered as transformers renders them; reasoning and tool calls parsed, whole and streamed."""

import json

import openai
import pytest

from dsalite.inference.serve import chat
from dsalite.inference.serve.chat import ChatParser, render
from serve_fixtures import TEMPLATE

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CONVERSATION = [
    {"role": "system", "content": "You are terse. Ünïcödé stays."},
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "18C", "tool_call_id": "call_1"},
    {"role": "user", "content": "and tomorrow?"},
]
# exercises loop controls, raise_exception, tojson with indent, strftime_now-free globals, whitespace control
TEMPLATE_2 = (
    "{%- for m in messages %}{% if m.role == 'wizard' %}{{ raise_exception('no wizards') }}{% endif %}"
    "{% if loop.index > 8 %}{% break %}{% endif %}"
    "[{{ m.role | upper }}]\n  {{ m.content | trim }}\n"
    "{%- if m.tool_calls %} calls={{ m.tool_calls | map(attribute='function') | map(attribute='name') | list | tojson }}"
    "{% endif %}\n{% endfor %}"
    "{% if tools %}TOOLS {{ tools | tojson(indent=2) }}{% endif %}"
    "{% if add_generation_prompt %}[ASSISTANT]{% if enable_thinking is defined and enable_thinking %}<think>"
    "{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def hf_tokenizer(ckpt):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=f"{ckpt}/tokenizer.json", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("template", [TEMPLATE, TEMPLATE_2])
@pytest.mark.parametrize("tools,kwargs", [(None, {}), (TOOLS, {}), (TOOLS, {"enable_thinking": True})])
def test_render_equals_transformers(hf_tokenizer, template, tools, kwargs):
    want = hf_tokenizer.apply_chat_template(CONVERSATION, tools=tools, chat_template=template, tokenize=False,
                                            add_generation_prompt=True, **kwargs)
    assert render(template, CONVERSATION, tools, True, "<s>", "</s>", **kwargs) == want


def test_render_refuses_what_the_template_refuses():
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="no wizards"):
        render(TEMPLATE_2, [{"role": "wizard", "content": "x"}])


def test_openai_arguments_string_becomes_a_dict_for_the_template():
    m = chat.template_message({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]})
    assert m["tool_calls"][0]["function"]["arguments"] == {"a": 1} and "content" not in m


GLM_REPLY = ("<think>the user wants weather</think>Let me check.<tool_call>get_weather\n<arg_key>city</arg_key>\n"
             "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
             "<tool_call>get_time\n<arg_key>tz</arg_key><arg_value>\"CET\"</arg_value></tool_call>")
D = "｜DSML｜"
DSML_REPLY = (f"I will look.\n\n<{D}function_calls>\n<{D}invoke name=\"get_weather\">\n"
              f"<{D}parameter name=\"city\" string=\"true\">Paris</{D}parameter>\n"
              f"<{D}parameter name=\"days\" string=\"false\">3</{D}parameter>\n"
              f"<{D}parameter name=\"opts\" string=\"false\">{{\"metric\": true}}</{D}parameter>\n</{D}invoke>\n"
              f"<{D}invoke name=\"get_time\">\n<{D}parameter name=\"tz\" string=\"true\">CET</{D}parameter>\n"
              f"</{D}invoke>\n</{D}function_calls>")
V3_REPLY = ("ok<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
            "{\"city\": \"Paris\", \"days\": 3}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>"
            "{\"tz\": \"CET\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
EXPECTED = [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"tz": "CET"})]


def _parse(text, step, in_reasoning=False):
    p = ChatParser(in_reasoning)
    r, c, calls = "", "", []
    for i in range(0, len(text), step):
        a, b, k = p.feed(text[i : i + step])
        r, c, calls = r + a, c + b, calls + k
    a, b = p.finish()
    return r + a, c + b, [(x["function"]["name"], json.loads(x["function"]["arguments"])) for x in calls]


@pytest.mark.parametrize("step", [1, 3, 10**6])  # streamed one character at a time, in pieces, whole
def test_tool_call_formats(step):
    assert _parse(GLM_REPLY, step) == ("the user wants weather", "Let me check.", EXPECTED)
    r, c, calls = _parse(DSML_REPLY, step)
    assert (r, c.strip()) == ("", "I will look.")
    assert calls == [("get_weather", {"city": "Paris", "days": 3, "opts": {"metric": True}}),
                     ("get_time", {"tz": "CET"})]
    assert _parse(V3_REPLY, step) == ("", "ok", EXPECTED)


@pytest.mark.parametrize("step", [1, 4, 10**6])
def test_reasoning_and_held_back_markers(step):
    # the prompt opened <think>: the reply starts inside the reasoning block
    assert _parse("plan a, then b</think>answer <tool", step, in_reasoning=True) == ("plan a, then b", "answer <tool", [])
    # an unclosed tool call is returned as text, never lost
    assert _parse("x<tool_call>get_weather<arg_key>a", step)[1] == "x<tool_call>get_weather<arg_key>a"
    assert chat.starts_in_reasoning("<|assistant|><think>\n") and not chat.starts_in_reasoning("<|assistant|>")


def test_parser_without_tools_leaves_markup_as_text():
    p = ChatParser(tools=False)
    assert p.feed(GLM_REPLY[GLM_REPLY.index("Let"):])[2] == []


def test_chat_endpoint_returns_reasoning_and_tool_calls(server, ckpt, monkeypatch):
    """A scripted reply (the sampler replaced) through the whole server: reasoning_content, tool_calls,
    finish_reason tool_calls — whole and streamed."""
    from dsalite.inference.serve import engine as engine_mod
    from dsalite.inference.text import TextModel

    tm = TextModel.load(ckpt)
    script = tm.encode(GLM_REPLY) + [tm.tokenizer.token_to_id("</s>")]
    state = {"i": 0}

    def scripted(logits, params, generator=None):
        t = script[min(state["i"], len(script) - 1)]
        state["i"] += 1
        return logits.new_tensor([t]).long()

    monkeypatch.setattr(engine_mod, "sample", scripted)
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    kw = dict(model="tiny-glm", messages=CONVERSATION[:2], tools=TOOLS, max_tokens=1000)
    r = c.chat.completions.create(**kw)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert m.content == "Let me check." and m.model_extra["reasoning_content"] == "the user wants weather"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in m.tool_calls] == EXPECTED
    assert all(t.id.startswith("call_") and t.type == "function" for t in m.tool_calls)
    state["i"] = 0
    chunks = list(c.chat.completions.create(**kw, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "the user wants weather"
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert [t.index for t in calls] == [0, 1]
    assert [(t.function.name, json.loads(t.function.arguments)) for t in calls] == EXPECTED
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice "none": the same reply is plain text
    state["i"] = 0
    r = c.chat.completions.create(**kw, tool_choice="none")
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    assert "<tool_call>" in r.choices[0].message.content

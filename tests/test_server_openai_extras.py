"""What real OpenAI clients send, through the official `openai` package against the app in-process:
fields we do not implement, structured outputs, tool calling, reasoning, chat-template arguments, and
echo + logprobs (the log-likelihood lm-evaluation-harness reads, checked against transformers)."""
from __future__ import annotations

import json
import math

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from nanovllm.config import EngineConfig
from nanovllm.engine.engine import LLMEngine
from nanovllm.model.loader import load_model
from nanovllm.server.app import ServerConfig, build_app
from nanovllm.server.openai_extras import IGNORED_FIELDS_HEADER
from nanovllm.server.tool_parsers import get_tool_parser
from nanovllm.tokenizer import Tokenizer

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

# Twenty fields of OpenAI's chat completions reference that nano-vllm does not implement.
UNIMPLEMENTED = {
    "store": True, "metadata": {"run": "1"}, "service_tier": "auto", "modalities": ["text"],
    "audio": None, "prediction": None, "reasoning_effort": "low", "web_search_options": {},
    "prompt_cache_key": "k", "safety_identifier": "s", "verbosity": "low", "functions": None,
    "function_call": None, "logit_bias_mode": "x", "max_output_tokens": 5, "truncation": "auto",
    "background": False, "include": [], "previous_response_id": None, "instructions": "be brief",
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
HERMES_CALL_REGEX = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,8}", "unit": "celsius"\}\}\n</tool_call>'


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama) -> LLMEngine:
    model, _ = load_model(str(tiny_llama))
    return LLMEngine(EngineConfig(model=str(tiny_llama), device="cpu", max_model_len=128, block_size=8),
                     model=model, tokenizer=Tokenizer.load(str(tiny_llama)))


@pytest.fixture(scope="module")
def embedded_engine() -> LLMEngine:
    return LLMEngine(EngineConfig(max_model_len=1024))


def serve(engine: LLMEngine, **server_args):
    """(openai client, TestClient) over an app serving `engine`, its step loop running."""
    http = TestClient(build_app(server_config=ServerConfig(served_model_name="m", **server_args), engine=engine))
    http.__enter__()
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0), http


@pytest.fixture
def tiny(tiny_engine):
    client, http = serve(tiny_engine)
    yield client, http
    http.__exit__(None, None, None)


@pytest.fixture
def embedded(embedded_engine):
    client, http = serve(embedded_engine)
    yield client, http
    http.__exit__(None, None, None)


def test_twenty_unimplemented_openai_fields_get_200_and_a_header_naming_them(tiny):
    client, _ = tiny
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body=UNIMPLEMENTED)
    assert raw.http_response.status_code == 200
    assert raw.headers[IGNORED_FIELDS_HEADER].split(", ") == sorted(UNIMPLEMENTED)
    assert raw.parse().choices[0].message.content is not None
    plain = client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                             max_tokens=2)
    assert IGNORED_FIELDS_HEADER not in plain.headers


def test_unknown_field_names_the_header_cannot_carry_are_escaped_and_many_are_cut(tiny):
    """A field name is the client's text: a newline, a control character or a non-ASCII letter goes
    into the header as a JSON string in ASCII (raw, it failed the response), and 100 names are cut to
    the first 32 and a count."""
    client, _ = tiny
    odd = {"a\nb": 1, "caf\u00e9": 2, "tab\tx": 3, "plain_name": 4}
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body=odd)
    assert raw.http_response.status_code == 200
    assert raw.headers[IGNORED_FIELDS_HEADER] == '"a\\nb", "caf\\u00e9", plain_name, "tab\\tx"'
    many = {f"f{i:03d}": i for i in range(100)}
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body=many)
    names = raw.headers[IGNORED_FIELDS_HEADER].split(", ")
    assert names == [f"f{i:03d}" for i in range(32)] + ["... and 68 more"]


@pytest.mark.parametrize("field, value", [("logit_bias", {"5": 500}), ("response_format", {"type": "xml"}),
                                          ("guided_regex", "(unclosed"), ("logit_bias", {"99999": 1})])
def test_known_fields_with_bad_values_still_get_a_400(tiny, field, value):
    client, _ = tiny
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt="hi", max_tokens=2, extra_body={field: value})
    assert client.completions.create(model="m", prompt="hi", max_tokens=2).choices[0].finish_reason == "length"


@pytest.mark.parametrize("warm", [False, True])
def test_echo_logprobs_log_likelihood_equals_transformers(tiny, tiny_llama, warm):
    client, _ = tiny
    context, continuation = "The quick brown fox", " jumps over the lazy dog"
    tokenizer = Tokenizer.load(str(tiny_llama))
    ids = tokenizer.encode(context + continuation)
    num_context = len(tokenizer.encode(context))
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = math.fsum(logprobs[i - 1, ids[i]].item() for i in range(num_context, len(ids)))
    if warm:   # the prompt's blocks are in the prefix cache before the scoring request
        client.completions.create(model="m", prompt=ids, max_tokens=1)
    result = client.completions.create(model="m", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    token_logprobs = result.choices[0].logprobs.token_logprobs
    assert token_logprobs[0] is None and len(token_logprobs) == len(ids) + 1
    assert math.fsum(token_logprobs[num_context:len(ids)]) == pytest.approx(expected, abs=1e-4)


def test_a_streamed_echo_with_logprobs_joins_up_to_the_reply_and_leads_with_the_prompt(tiny):
    client, _ = tiny
    request = dict(model="m", prompt=["The quick brown fox", "A tiny llama"], max_tokens=5, echo=True, logprobs=2,
                   temperature=0, stop=[" lazy"])
    reply = client.completions.create(**request)
    joined: dict[int, dict[str, list]] = {}
    for chunk in client.completions.create(**request, stream=True):
        for choice in chunk.choices:
            if choice.index not in joined:   # the first chunk of a choice: the prompt, with its logprobs
                assert choice.text == request["prompt"][choice.index] and choice.logprobs.token_logprobs[0] is None
            parts = joined.setdefault(choice.index, {"text": [], "tokens": [], "token_logprobs": [],
                                                     "top_logprobs": [], "text_offset": []})
            parts["text"].append(choice.text)
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                parts[name] += getattr(choice.logprobs, name) if choice.logprobs else []
    for choice in reply.choices:
        parts = joined[choice.index]
        assert "".join(parts["text"]) == choice.text
        assert parts["tokens"] == choice.logprobs.tokens and parts["text_offset"] == choice.logprobs.text_offset
        assert parts["token_logprobs"] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-5)
        assert [sorted(top) if top else top for top in parts["top_logprobs"]] == \
            [sorted(top) if top else top for top in choice.logprobs.top_logprobs]


def test_a_json_schema_response_format_gives_valid_json(embedded):
    client, _ = embedded
    schema = WEATHER_TOOL["function"]["parameters"]
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather in Paris, as JSON."}], max_tokens=60,
        temperature=1.0, seed=3, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_a_forced_tool_call_then_its_result_then_the_final_answer(embedded):
    client, _ = embedded
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model="m", messages=messages, tools=[WEATHER_TOOL], max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.type == "function" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
    messages += [first.choices[0].message.model_dump(),   # as clients send it back: refusal, audio, ... too
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    final = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL], max_tokens=20,
                                           temperature=0)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.usage.prompt_tokens > first.usage.prompt_tokens + 5   # the call and its result were in the prompt


def test_tool_choice_required_gives_calls_that_validate(embedded):
    client, _ = embedded
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER_TOOL],
        tool_choice="required", parallel_tool_calls=False, max_tokens=80, temperature=1.0, seed=1)
    [call] = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])


def test_auto_reads_a_hermes_call_and_the_stream_concatenates_to_the_same_reply(embedded):
    client, _ = embedded
    # The small model does not write tool calls of its own accord: a regex makes it write one in Hermes form.
    request = dict(model="m", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER_TOOL],
                   max_tokens=100, temperature=0, extra_body={"guided_regex": r"Checking\. " + HERMES_CALL_REGEX})
    whole = client.chat.completions.create(**request).choices[0]
    [call] = whole.message.tool_calls
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Checking. "
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["unit"] == "celsius"
    content, calls, finish = "", [], None
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert content == whole.message.content and finish == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in calls] == [(call.function.name, call.function.arguments)]


def test_the_hermes_parser_reads_a_hand_written_assistant_turn():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}\n'
            '</tool_call>')
    content, calls = get_tool_parser("hermes").parse(text)
    assert content == "Let me check.\n"
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Oslo", "Rome"]
    assert get_tool_parser("hermes").parse("I would use <tool_call> here") == ("I would use <tool_call> here", [])
    llama = get_tool_parser("llama3_json").parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert llama[0] is None and json.loads(llama[1][0].arguments) == {"city": "Oslo"}


def test_the_qwen3_reasoning_parser_splits_think_text_in_the_message_and_the_stream(embedded_engine):
    client, http = serve(embedded_engine, reasoning_parser="qwen3")
    try:
        request = dict(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=40, temperature=0,
                       extra_body={"guided_regex": r"<think>[a-z ]{3,20}</think>\n\n[A-Z][a-z]{2,10}"})
        message = client.chat.completions.create(**request).choices[0].message
        reasoning, content = "", ""
        for chunk in client.chat.completions.create(**request, stream=True):
            for choice in chunk.choices:
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                content += choice.delta.content or ""
    finally:
        http.__exit__(None, None, None)
    assert message.reasoning_content and "<think>" not in message.content and message.content[0].isupper()
    assert (reasoning, content) == (message.reasoning_content, message.content)


def test_chat_template_file_kwargs_and_continue_final_message(tiny_engine, tiny_llama):
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}{% if shout %}!!!{% endif %}")
    client, http = serve(tiny_engine, chat_template=template)
    tokenizer = Tokenizer.load(str(tiny_llama))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]

    def prompt_tokens(**extra_body) -> int:
        return client.chat.completions.create(model="m", messages=messages, max_tokens=1,
                                              extra_body=extra_body).usage.prompt_tokens
    try:
        assert prompt_tokens() == len(tokenizer.encode("<user>hi<assistant>Hel<assistant>", add_special_tokens=False))
        assert prompt_tokens(chat_template_kwargs={"shout": True}) == prompt_tokens() + 3
        assert prompt_tokens(add_generation_prompt=False, continue_final_message=True) == len(
            tokenizer.encode("<user>hi<assistant>Hel", add_special_tokens=False))
        with pytest.raises(openai.BadRequestError):
            prompt_tokens(continue_final_message=True)   # add_generation_prompt is true by default
    finally:
        http.__exit__(None, None, None)

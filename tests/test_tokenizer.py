"""Tokenizer over HuggingFace files, and incremental detokenization that never splits a character."""
from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.tokenizer import HFTokenizer, IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_factory) -> Tokenizer:
    return Tokenizer.load(str(tiny_model_factory("llama-gqa4")))


def copy_model_dir(tiny_model_factory, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama-gqa4"), target)
    return target


def test_hf_directory_gives_an_hf_tokenizer_with_its_special_tokens(tokenizer):
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.vocab_size == 260   # 256 bytes + <s> </s> <|im_start|> <|im_end|>
    assert tokenizer.bos_token_id == 256 and tokenizer.eos_token_ids == [257]
    assert tokenizer.all_special_ids == {256, 257, 258, 259}


def test_encode_decode_round_trips_unicode(tokenizer):
    text = "naïve café — 東京 🎉\n\ttabs"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode())   # one token per byte in the tiny vocabulary
    assert tokenizer.decode(ids) == text


def test_bos_is_added_only_when_the_tokenizer_template_adds_it(tiny_model_factory, tmp_path, tokenizer):
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)   # no BOS template
    model_dir = copy_model_dir(tiny_model_factory, tmp_path)
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    spec["post_processor"] = {   # what Llama tokenizers carry: "<s> $A"
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [256], "tokens": ["<s>"]}}}
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    with_bos = Tokenizer.load(str(model_dir))
    assert with_bos.encode("hi") == [256] + with_bos.encode("hi", add_special_tokens=False)
    assert with_bos.decode(with_bos.encode("hi")) == "hi"


def test_chat_template_renders_chatml(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = tokenizer.apply_chat_template(messages)
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert ids[0] == 258   # <|im_start|> is one special token, not its characters
    without_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert ids[:len(without_prompt)] == without_prompt and len(ids) > len(without_prompt)


def test_a_model_without_chat_template_refuses_chat_messages(tiny_model_factory, tmp_path):
    model_dir = copy_model_dir(tiny_model_factory, tmp_path)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.load(str(model_dir))
    assert not tokenizer.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_generation_config_eos_joins_the_tokenizer_eos(tiny_model_factory, tmp_path):
    model_dir = copy_model_dir(tiny_model_factory, tmp_path)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [259, 257]}))
    assert Tokenizer.load(str(model_dir)).eos_token_ids == [257, 259]


def test_tokenizer_argument_overrides_the_model_path(tiny_model_factory, tmp_path):
    tokenizer = Tokenizer.load(str(tmp_path / "nothing-here"), tokenizer=str(tiny_model_factory("qwen3")))
    assert tokenizer.decode(tokenizer.encode("ok")) == "ok"


# ---- incremental detokenization -------------------------------------------------------------------

def stream(tokenizer: Tokenizer, ids: list[int], chunk_sizes: list[int], skip_special_tokens: bool = True):
    detokenizer = IncrementalDetokenizer(tokenizer, [256], skip_special_tokens)
    pieces, start = [], 0
    for size in chunk_sizes:
        pieces.append(detokenizer.add_tokens(ids[start:start + size]))
        start += size
    pieces.append(detokenizer.add_tokens(ids[start:]))
    return pieces, detokenizer


@settings(max_examples=150, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30),
       chunk_sizes=st.lists(st.integers(1, 4), max_size=40))
def test_streamed_pieces_concatenate_to_the_full_decode_and_never_split_a_character(tokenizer, text, chunk_sizes):
    ids = tokenizer.encode(text)
    pieces, detokenizer = stream(tokenizer, ids, chunk_sizes)
    assert "".join(pieces) == detokenizer.text == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, 259), max_size=30), chunk_sizes=st.lists(st.integers(1, 3), max_size=30),
       skip_special_tokens=st.booleans())
def test_streaming_arbitrary_tokens_emits_a_prefix_of_the_full_decode(tokenizer, ids, chunk_sizes,
                                                                      skip_special_tokens):
    pieces, detokenizer = stream(tokenizer, ids, chunk_sizes, skip_special_tokens)
    full = tokenizer.decode(ids, skip_special_tokens)
    assert full.startswith(detokenizer.text) and detokenizer.text == "".join(pieces)
    if not full.endswith("\ufffd"):   # a broken last character is held back until more tokens come
        assert detokenizer.text == full


def test_multibyte_character_is_emitted_once_its_last_byte_arrives(tokenizer):
    ids = tokenizer.encode("a€")   # 'a' then the 3 bytes of €
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert [detokenizer.add_tokens([i]) for i in ids] == ["a", "", "", "€"]


def test_special_tokens_are_streamed_only_when_not_skipped(tokenizer):
    ids = tokenizer.encode("x") + [259] + tokenizer.encode("y")
    assert "".join(stream(tokenizer, ids, [1, 1, 1])[0]) == "xy"
    assert "".join(stream(tokenizer, ids, [1, 1, 1], skip_special_tokens=False)[0]) == "x<|im_end|>y"

"""The offline LLM API: greedy output equal to transformers', order, prompt forms, chat, progress bar, errors."""
from __future__ import annotations

import pytest
import torch

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), max_model_len=128)


@pytest.mark.parametrize("name", ["llama-gqa4", "qwen3", "llama3-scaled"])
def test_greedy_generation_matches_transformers(tiny_model_factory, name):
    import transformers

    path = tiny_model_factory(name)
    llm = LLM(str(path), max_model_len=256, max_num_batched_tokens=32)
    prompts = ["The capital of France is", "a", "0123456789" * 5]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor([output.prompt_token_ids])
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=16, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert output.outputs[0].token_ids == expected, prompt


def test_outputs_come_back_in_prompt_order_with_their_own_params(llm):
    prompts = ["x" * 30, "short", "medium length"]
    params = [SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True) for k in (2, 7, 4)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [out.prompt for out in outputs] == prompts
    assert [len(out.outputs[0].token_ids) for out in outputs] == [2, 7, 4]
    assert all(out.finished for out in outputs)


def test_prompts_may_be_token_ids_or_a_single_string(llm):
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode("same prompt")
    [from_text] = llm.generate("same prompt", GREEDY, use_tqdm=False)
    [from_ids] = llm.generate(ids, GREEDY, use_tqdm=False)
    [from_list] = llm.generate([ids], GREEDY, use_tqdm=False)
    assert from_text.prompt_token_ids == from_ids.prompt_token_ids == ids
    assert from_text.outputs[0].token_ids == from_ids.outputs[0].token_ids == from_list.outputs[0].token_ids
    assert llm.generate([], GREEDY, use_tqdm=False) == []


def test_chat_renders_the_template_with_the_assistant_turn_open(llm):
    conversation = [{"role": "user", "content": "hi"}]
    [output] = llm.chat(conversation, GREEDY, use_tqdm=False)
    assert output.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert output.prompt_token_ids == llm.get_tokenizer().apply_chat_template(conversation)
    two = llm.chat([conversation, [{"role": "user", "content": "bye"}]], GREEDY, use_tqdm=False)
    assert two[0].outputs[0].token_ids == output.outputs[0].token_ids and len(two) == 2


def test_the_progress_bar_shows_prefill_and_decode_speed(llm, capsys):
    llm.generate(["one", "two"], GREEDY, use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "2/2" in err
    assert "prefill" in err and "decode" in err and "tok/s" in err


def test_one_bad_prompt_fails_the_call_before_any_prompt_runs(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(["fine", "x" * 500], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)
    assert llm.generate("still serving", GREEDY, use_tqdm=False)[0].finished


def test_unknown_engine_arguments_raise_instead_of_being_dropped(tiny_llama):
    with pytest.raises(ValueError, match="unknown engine argument 'max_batch_size'.*max_num_seqs"):
        LLM(str(tiny_llama), max_batch_size=8)


def test_a_failed_request_raises_from_generate(llm, monkeypatch):
    monkeypatch.setattr(llm.engine.runner, "launch", lambda batch: 1 / 0)
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        llm.generate(["doomed"], GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert not llm.engine.has_unfinished_requests()


def test_a_model_without_a_tokenizer_takes_token_ids_and_skip_tokenizer_init_gives_empty_text(tiny_llama, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_llama, bare)
    (bare / "tokenizer.json").unlink()
    with_ids = LLM(str(bare), max_model_len=64)
    reference = LLM(str(tiny_llama), max_model_len=64)
    prompt = reference.get_tokenizer().encode("Hello there")
    [output] = with_ids.generate([prompt], GREEDY, use_tqdm=False)
    assert output.outputs[0].token_ids == reference.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert output.outputs[0].text == "".join(f"<{t}>" for t in output.outputs[0].token_ids)
    with pytest.raises(ValueError, match="send prompts as token ids"):
        with_ids.generate("Hello there", GREEDY, use_tqdm=False)

    skipped = LLM(str(tiny_llama), max_model_len=64, skip_tokenizer_init=True)
    [output] = skipped.generate([prompt], GREEDY, use_tqdm=False)
    assert output.outputs[0].text == "" and len(output.outputs[0].token_ids) == 12
    with pytest.raises(ValueError, match="use stop_token_ids"):
        skipped.generate([prompt], SamplingParams(stop=["."]), use_tqdm=False)


def test_dummy_weights_of_a_builtin_shape_need_no_tokenizer(monkeypatch):
    from nanovllm.model import dummy

    small = dict(dummy.BUILTIN_CONFIGS["qwen3-0.6b"], vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    monkeypatch.setitem(dummy.BUILTIN_CONFIGS, "qwen3-0.6b", small)   # the real shape, smaller
    llm = LLM("qwen3-0.6b", load_format="dummy", max_model_len=64)
    [output] = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 4

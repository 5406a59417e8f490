"""The CPU weight formats: each packed kernel equals its plain-torch reference, converted models
survive the cache, and the quality guard holds on the embedded SmolLM2-135M.

The guard: on a fixed 256-token text, the next-token top-1 of a reduced format agrees with
float32's on at least 98% of positions and its mean log-likelihood is within 2% of float32's.
int4 multiplies every step through its packed kernel, so one prefill of the text checks the path
that decodes too.
"""
from __future__ import annotations

import re

import pytest
import torch

from nanovllm.config import EngineConfig
from nanovllm.model.loader import load_model
from nanovllm.model.quantize import load_quantized, load_quantized_model, quantize_model, save_quantized
from nanovllm.ops.quant import (PackedLinear, RefinedLMHead, dequantize_int4, int4_linear, int4_linear_torch,
                                int8_linear, int8_linear_torch, pack_int4, quantize_int4, quantize_int8)
from nanovllm.tokenizer import Tokenizer
from conftest import prompt_logits

GUARD_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small tin of oil and a "
    "cloth for the lens. For thirty years he had watched the ships pass the rocky point, and he knew most of "
    "them by the shape of their sails. In winter the storms came from the north, and the waves broke so high "
    "against the cliffs that salt spray reached the lamp room windows. On calm nights he sat by the glass with "
    "a book, listening to the slow turning of the great light above him. He kept a logbook of every vessel, "
    "the weather, and the hour the lamp was lit. One spring morning a young woman arrived on the supply boat "
    "with a letter from the harbour office. She had been sent to learn the work, because the keeper was "
    "growing old and the office wanted someone ready to take his place. At first he said very little to her. "
    "He showed her how to trim the wick, how to wind the clockwork that turned the lens, and how to read the "
    "barometer before the sky changed. She asked many questions, and slowly he began to answer them with "
    "stories: the night the fishing fleet was caught in fog, the winter the supply boat could not come for six "
    "weeks, the summer a whale rested in the bay for three days. By autumn she could run the light alone."
)
GUARD_TOKENS = 256
GUARDED_FORMATS = ("int4",)      # the reduced formats dtype="auto" may pick


# ---- kernels against references ---------------------------------------------------------------

@pytest.mark.parametrize("rows, out_features, in_features", [(1, 48, 32), (3, 80, 96), (9, 16, 160)])
def test_int4_kernel_equals_its_reference(rows, out_features, in_features):
    torch.manual_seed(rows)
    weight = torch.randn(out_features, in_features)
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    q, scale_and_zero = quantize_int4(weight)
    scale_and_zero = scale_and_zero.to(torch.bfloat16)
    got = int4_linear(x, pack_int4(q), scale_and_zero).float()
    want = int4_linear_torch(x, q, scale_and_zero).float()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("rows, out_features, in_features", [(1, 7, 48), (5, 50, 80), (12, 3, 128)])
def test_int8_kernel_equals_its_reference(rows, out_features, in_features):
    torch.manual_seed(rows)
    weight = torch.randn(out_features, in_features)
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    q, scales = quantize_int8(weight)
    got = int8_linear(x, q, scales.to(torch.bfloat16)).float()
    want = int8_linear_torch(x, q, scales.to(torch.bfloat16)).float()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_int4_reproduces_q4_1_groups_exactly():
    # A Q4_1 group is d * q + m with q in 0..15 using both ends of the range.
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (16, 64))
    codes[:, ::32] = 0
    codes[:, 1::32] = 15
    d, m = torch.rand(16, 2, 1) * 0.1, torch.randn(16, 2, 1)
    weight = (codes.view(16, 2, 32) * d + m).view(16, 64)
    q, scale_and_zero = quantize_int4(weight)
    torch.testing.assert_close(dequantize_int4(q, scale_and_zero), weight, rtol=0, atol=1e-6)


def test_int8_quantization_error_is_half_a_step_per_channel():
    torch.manual_seed(0)
    weight = torch.randn(10, 40)
    q, scales = quantize_int8(weight)
    assert (q.float() * scales[:, None] - weight).abs().le(scales[:, None] / 2 + 1e-7).all()


def exactly(sentence: str) -> str:
    """A `pytest.raises` pattern matching the whole message, not a part of it."""
    return f"^{re.escape(sentence)}$"


def test_int4_rejects_shapes_the_kernel_cannot_pack():
    with pytest.raises(ValueError, match=exactly("int4 needs the input size (40) to be a multiple of 32; "
                                                 "use dtype='int8' or 'bfloat16' for this model")):
        quantize_int4(torch.randn(16, 40))
    with pytest.raises(ValueError, match=exactly("torch's int4 CPU kernel needs the output size (8) to be a "
                                                 "multiple of 16; use dtype='int8' or 'bfloat16' for this model")):
        pack_int4(torch.zeros(8, 32, dtype=torch.int32))


def test_packed_linear_refuses_what_it_cannot_run_in_a_sentence():
    with pytest.raises(ValueError, match=exactly("torch's int8 CPU kernel needs the input size (40) to be a "
                                                 "multiple of 16; keep this layer in float32")):
        PackedLinear.from_weight(torch.randn(16, 40), "int8")
    with pytest.raises(ValueError, match=exactly("PackedLinear format must be 'int8' or 'int4', got 'int2'")):
        PackedLinear.from_weight(torch.randn(16, 32), "int2")
    q, scales = quantize_int8(torch.randn(16, 32))
    with pytest.raises(ValueError, match=exactly("an int8 PackedLinear needs its bfloat16 copy (dense) for "
                                                 "steps of many rows")):
        PackedLinear(q, scales.to(torch.bfloat16), None)


def test_packed_linears_describe_their_format_and_shape():
    int8 = PackedLinear.from_weight(torch.randn(48, 64), "int8", max_packed_rows=4)
    int4 = PackedLinear.from_weight(torch.randn(48, 64), "int4")
    assert repr(int8) == "PackedLinear(int8, kernel=torch, in_features=64, out_features=48, max_packed_rows=4)"
    assert repr(int4) == "PackedLinear(int4, kernel=torch, in_features=64, out_features=48, max_packed_rows=None)"
    assert repr(PackedLinear.from_weight(torch.randn(64, 64), "int4")) == \
        f"PackedLinear(int4, kernel={PackedLinear.from_weight(torch.randn(64, 64), 'int4').kernel}, in_features=64, " \
        "out_features=64, max_packed_rows=None)"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_packed_steps_are_the_packed_kernel_plus_the_bias_bit_for_bit(fmt):
    torch.manual_seed(0)
    weight, bias = torch.randn(32, 64), torch.randn(32).to(torch.bfloat16)
    layer = PackedLinear.from_weight(weight, fmt, bias=bias, max_packed_rows=3)
    matmul = int8_linear if fmt == "int8" else int4_linear
    for rows in (1, 3):                     # up to and at max_packed_rows: the packed kernel, bias added
        x = torch.randn(rows, 64)
        want = (matmul(x.to(torch.bfloat16), layer.packed, layer.scales) + bias).float()
        assert torch.equal(layer(x), want)


def test_int8_packed_linear_takes_the_bfloat16_path_above_max_packed_rows():
    torch.manual_seed(0)
    weight, bias = torch.randn(32, 64), torch.randn(32)
    layer = PackedLinear.from_weight(weight, "int8", bias=bias.to(torch.bfloat16), max_packed_rows=2)
    for rows in (1, 2, 3, 17):
        x = torch.randn(rows, 64)
        got = layer(x)
        assert got.dtype == torch.float32 and got.shape == (rows, 32)
        torch.testing.assert_close(got, x @ weight.T + bias, rtol=0.1, atol=0.15 * (x @ weight.T).abs().max().item())


def test_the_references_return_the_inputs_dtype():
    torch.manual_seed(0)
    weight, x = torch.randn(16, 64), torch.randn(3, 64).to(torch.bfloat16)
    q8, scales = quantize_int8(weight)
    q4, scale_and_zero = quantize_int4(weight)
    assert int8_linear_torch(x, q8, scales.to(torch.bfloat16)).dtype == torch.bfloat16
    assert int4_linear_torch(x, q4, scale_and_zero.to(torch.bfloat16)).dtype == torch.bfloat16


def test_int8_large_steps_use_onednns_layout_exactly_where_torch_supports_it():
    from nanovllm.ops.quant import onednn_bfloat16_supported
    layer = PackedLinear.from_weight(torch.randn(32, 64), "int8", max_packed_rows=2)
    layer(torch.randn(2, 64))
    assert layer._onednn_dense is None, "a packed step needs no dense layout"
    layer(torch.randn(3, 64))
    assert (layer._onednn_dense is not None) == onednn_bfloat16_supported()


def test_the_refined_lm_head_recomputes_each_rows_top_k_logits_in_float32():
    torch.manual_seed(0)
    weight, hidden = torch.randn(512, 64), torch.randn(3, 64)
    head = RefinedLMHead(PackedLinear.from_weight(weight, "int4"), weight, top_k=8)
    logits, exact = head(hidden), hidden @ weight.T                              # [3, 512]
    coarse = head.coarse(hidden).float()                                        # the packed head's logits
    for row in range(3):
        top = coarse[row].topk(8).indices
        torch.testing.assert_close(logits[row, top], exact[row, top], rtol=1e-6, atol=1e-5)
        rest = torch.ones(512, dtype=torch.bool)
        rest[top] = False
        assert (logits[row, rest] - exact[row, rest]).abs().max() > 1e-3, "the rest keep the packed head's logits"


def test_cpu_formats_need_the_cpu_and_one_process():
    with pytest.raises(ValueError, match="device='cpu'"):
        EngineConfig(dtype="int4", device="cpu", tensor_parallel_size=2)


def test_auto_picks_a_guarded_format_for_the_embedded_model_and_float32_for_others(tmp_path):
    assert EngineConfig(device="cpu").dtype in GUARDED_FORMATS
    assert EngineConfig(model=str(tmp_path), device="cpu").dtype == "float32"


# ---- the embedded model ----------------------------------------------------------------------

def _guard_figures(logits: torch.Tensor, reference: torch.Tensor, token_ids: list[int]) -> tuple[float, float]:
    """-> (fraction of positions whose top-1 matches the reference, mean log-likelihood of the text)."""
    next_ids = torch.tensor(token_ids[1:])[:, None]
    agreement = (logits[:-1].argmax(-1) == reference[:-1].argmax(-1)).float().mean().item()
    log_likelihood = logits[:-1].log_softmax(-1).gather(1, next_ids).mean().item()
    return agreement, log_likelihood


@pytest.fixture(scope="module")
def guard_reference():
    token_ids = Tokenizer.load(None).encode(GUARD_TEXT)[:GUARD_TOKENS + 1]
    assert len(token_ids) == GUARD_TOKENS + 1
    model, _ = load_model(None)
    return token_ids, prompt_logits(model, token_ids, torch.float32)


@pytest.mark.parametrize("fmt", GUARDED_FORMATS)
def test_reduced_format_meets_the_quality_guard(fmt, guard_reference):
    """Through the KV cache the format gets by default (float16 for the int formats)."""
    token_ids, reference = guard_reference
    model, _ = load_quantized_model(None, fmt)
    kv_dtype = EngineConfig(dtype=fmt, device="cpu").kv_cache_torch_dtype
    assert kv_dtype == torch.float16
    agreement, log_likelihood = _guard_figures(prompt_logits(model, token_ids, kv_dtype), reference, token_ids)
    _, reference_log_likelihood = _guard_figures(reference, reference, token_ids)
    assert agreement >= 0.98
    assert abs(log_likelihood - reference_log_likelihood) <= 0.02 * abs(reference_log_likelihood)


def test_converted_model_loads_from_the_cache_with_the_same_weights(tmp_path):
    first, config = load_quantized_model(None, "int4")
    path = tmp_path / "int4.pt"
    save_quantized(first, path)
    second = load_quantized(path, config)                 # memory-mapped
    assert second is not None
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for name, tensor in first_state.items():
        assert torch.equal(tensor, second_state[name]), name
    assert second.lm_head.weight.data_ptr() == second.embed_tokens.weight.data_ptr()   # still tied
    assert load_quantized(tmp_path / "absent.pt", config) is None


def test_quantize_model_replaces_every_linear():
    model, _ = load_model(None)
    quantize_model(model, "int8")
    assert not [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_engine_with_int4_runs_the_packed_model_and_keeps_a_float16_kv_cache():
    from nanovllm import LLM, SamplingParams

    llm = LLM(dtype="int4", num_kv_blocks=32, max_model_len=256)
    model = llm.engine.runner.model
    assert isinstance(model.layers[0].mlp.gate_up_proj, PackedLinear)
    assert llm.engine.runner.kv_cache.dtype == torch.float16
    [output] = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 4

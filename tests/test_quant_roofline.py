"""The roofline counts a quantized model's weights at their stored size: FP8 linears at one byte
a weight, 4-bit ones at half a byte plus a float32 scale and a uint8 zero per group (GGUF's layouts:
tests/test_gguf_quantized.py); the LM
head at its own (16-bit for checkpoints, quantized by the online methods); norms and KV cache
at the model's dtype."""
from __future__ import annotations

from nanovllm.bench.roofline import ModelCost
from nanovllm.model.dummy import dummy_config
from nanovllm.model.quantization import quantization_method


def test_quantized_linears_count_their_stored_bytes_and_a_float_head_its_dtype():
    config = dummy_config("llama-3.2-1b")
    bf16 = ModelCost.from_config(config, 2)
    fp8 = ModelCost.from_config(config, 2, linear_weight_bytes=quantization_method(None, "fp8").bytes_per_weight)
    w4 = ModelCost.from_config(config, 2, linear_weight_bytes=quantization_method(None, "w4a16").bytes_per_weight)
    head_and_norms = bf16.lm_head_params * 2 + bf16.norm_params * 2
    assert fp8.weight_bytes == bf16.linear_params * 1 + head_and_norms
    assert w4.weight_bytes == round(bf16.linear_params * (0.5 + 5 / 128) + head_and_norms)
    assert fp8.kv_bytes_per_token == bf16.kv_bytes_per_token
    # Llama-3.2-1B: the 16-bit LM head is a fifth of the bf16 bytes, so FP8 reads ~60%, not 50%
    assert 0.55 < fp8.weight_bytes / bf16.weight_bytes < 0.65


def test_checkpoint_methods_know_their_group_size():
    gptq = quantization_method({"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False})
    assert gptq.bytes_per_weight == 0.5 + 5 / 64
    ct = quantization_method({"quant_method": "compressed-tensors", "ignore": ["lm_head"], "config_groups": {"g": {
        "targets": ["Linear"], "format": "float-quantized",
        "weights": {"type": "float", "num_bits": 8, "strategy": "channel"},
        "input_activations": {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True}}}})
    assert ct.bytes_per_weight == 1.0


def test_the_eight_bit_layouts_count_a_byte_a_code_and_their_scales_and_offsets():
    def compressed(weights: dict, fmt: str = "pack-quantized", activations: dict | None = None):
        return quantization_method({"quant_method": "compressed-tensors", "ignore": ["lm_head"], "config_groups": {
            "g": {"targets": ["Linear"], "format": fmt, "weights": weights, "input_activations": activations}}})

    gptq8 = quantization_method({"quant_method": "gptq", "bits": 8, "group_size": 128, "desc_act": False})
    assert gptq8.bytes_per_weight == 1 + 8 / 128                    # int8 codes, a float32 scale and offset
    w6 = compressed({"type": "int", "num_bits": 6, "strategy": "group", "group_size": 128, "symmetric": False})
    assert w6.bytes_per_weight == 1 + 8 / 128
    w8 = compressed({"type": "int", "num_bits": 8, "strategy": "group", "group_size": 64})
    assert w8.bytes_per_weight == 1 + 4 / 64
    w8a8 = compressed({"type": "int", "num_bits": 8, "strategy": "channel"}, "int-quantized",
                      {"type": "int", "num_bits": 8, "strategy": "token", "dynamic": True})
    assert w8a8.bytes_per_weight == 1.0                             # a scale a row, left out as FP8's
    block = compressed({"type": "float", "num_bits": 8, "strategy": "block", "block_structure": [128, 128]},
                       "float-quantized", {"type": "float", "num_bits": 8, "strategy": "group", "dynamic": True})
    assert block.bytes_per_weight == 1 + 4 / 128
    hf_fp8 = quantization_method({"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]})
    assert hf_fp8.bytes_per_weight == 1 + 4 / 128


def test_an_online_quantized_head_counts_at_its_stored_size():
    config = dummy_config("llama-3.2-1b")
    method = quantization_method(None, "fp8")
    assert method.quantizes_lm_head
    bf16 = ModelCost.from_config(config, 2)
    fp8 = ModelCost.from_config(config, 2, linear_weight_bytes=1.0, lm_head_weight_bytes=1.0)
    assert fp8.weight_bytes == bf16.linear_params + bf16.lm_head_params + bf16.norm_params * 2


def test_online_w4a16_keeps_its_head_in_e4m3_and_counts_it_at_one_byte():
    method = quantization_method(None, "w4a16")
    head = method.lm_head_method()
    assert head is not None and head.name == "fp8" and head.bytes_per_weight == 1.0
    assert method.bytes_per_weight == 0.5 + 5 / 128


def test_online_w4a16_with_its_head_in_4_bits_counts_the_head_as_a_4_bit_layer(monkeypatch):
    from nanovllm.model.quantization import online

    monkeypatch.setattr(online, "W4A16_HEAD_IN_4_BITS", True)
    head = quantization_method(None, "w4a16").lm_head_method()
    assert head is not None and head.name == "w4a16" and head.bytes_per_weight == 0.5 + 5 / 128


def test_online_gguf_layouts_count_their_stored_bytes():
    """int8 codes and a float32 scale per 32 (Q8_0); 4-bit codes, a float32 scale and offset per 32 (Q4_K)."""
    assert quantization_method(None, "gguf-q8_0").bytes_per_weight == 1 + 4 / 32
    assert quantization_method(None, "gguf-q4_k").bytes_per_weight == 0.5 + 8 / 32
    assert not quantization_method(None, "gguf-q4_k").quantizes_lm_head

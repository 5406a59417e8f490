"""Quantized checkpoints load quantized and compute what their format's own library computes.

The oracles are libraries we did not write:
- `compressed-tensors` quantizes tiny random Llama and Qwen3 models (FP8 weights per channel
  or per tensor with dynamic per-token activations, W4A16 symmetric and asymmetric in groups
  of 128) and packs them; transformers loads the files through compressed-tensors, whose
  forward dequantizes the weights and quantizes each activation row as ours does (FP8). For
  W4A16 the reference is the float model with the weights compressed-tensors' `fake_quantize`
  gives back (transformers cannot load its asymmetric packing: packed zero points).
  Tolerance 1e-4 of the logit scale: both sides multiply the same float32 weights and
  activation codes, and differ only by float32 summation order (observed below 1e-6).
- GPTQ and AWQ files are packed here by transcriptions of AutoGPTQ's and AutoAWQ's packing
  loops (their published packers, independent of our unpacking); transformers runs the
  dequantized weights as a float model.
Greedy tokens are equal for 32 steps.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import PagedSequence, assert_logits_close, write_tiny_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

PROMPT = [256, 17, 99, 3, 250, 64, 7, 180, 42, 5]
NUM_GREEDY_STEPS = 32


def write_compressed_tensors(src: Path, out: Path, scheme_name: str) -> tuple[Path, Path]:
    """Quantize the HF model at `src` with compressed-tensors' preset `scheme_name`, every Linear but
    lm_head, min-max weight ranges (what llmcompressor's default observer picks), and save it at `out`.
    -> (out, the model to compare with: `out` itself for FP8, else a float model of the dequantized weights)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    scheme = preset_name_to_scheme(scheme_name.removesuffix("_PER_TENSOR"), ["Linear"])
    if scheme_name.endswith("_PER_TENSOR"):
        scheme.weights.strategy = "tensor"
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    for module in model.modules():
        if not hasattr(module, "weight_scale"):
            continue
        args, weight = module.quantization_scheme.weights, module.weight.data
        if args.strategy == "group":
            grouped = weight.reshape(weight.shape[0], -1, args.group_size)
            low, high = grouped.amin(-1), grouped.amax(-1)
        elif args.strategy == "channel":
            low, high = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
        else:
            low, high = weight.amin().reshape(1), weight.amax().reshape(1)
        scale, zero = calculate_qparams(low, high, args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(
                module.weight_zero_point.shape)
    dequantized = {name: fake_quantize(module.weight.data, module.weight_scale.data,
                                       getattr(module, "weight_zero_point", None), module.quantization_scheme.weights)
                   for name, module in model.named_modules() if hasattr(module, "weight_scale")}
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            (out / name).write_bytes((src / name).read_bytes())
    if scheme_name.startswith("FP8"):
        return out, out
    reference = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for name, weight in dequantized.items():
        reference.get_submodule(name).weight.data.copy_(weight)
    reference.save_pretrained(out.with_name("dequantized"))
    return out, out.with_name("dequantized")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def make(model_name: str, scheme_name: str) -> tuple[Path, Path]:
        if (model_name, scheme_name) not in cache:
            root = tmp_path_factory.mktemp(f"{model_name}-{scheme_name}")
            src = write_tiny_model(root / "float", model_name)
            cache[model_name, scheme_name] = write_compressed_tensors(src, root / "quantized", scheme_name)
        return cache[model_name, scheme_name]

    return make


def _reference(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _load(path: Path, **kwargs):
    from nanovllm.model.loader import load_model

    return load_model(str(path), **kwargs)[0]


def _assert_matches_reference(ours, reference) -> None:
    with torch.no_grad():
        theirs = reference(torch.tensor([PROMPT])).logits[0]
        assert_logits_close(PagedSequence(ours).step(PROMPT), theirs)
        generated = reference.generate(torch.tensor([PROMPT]), max_new_tokens=NUM_GREEDY_STEPS, do_sample=False,
                                       min_new_tokens=NUM_GREEDY_STEPS)
    assert PagedSequence(ours).greedy(PROMPT, NUM_GREEDY_STEPS) == generated[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("model_name,scheme_name,layer", [
    ("llama-gqa4", "FP8_DYNAMIC", "Fp8Linear"),
    ("llama-gqa4", "FP8_DYNAMIC_PER_TENSOR", "Fp8Linear"),
    ("llama-gqa4", "W4A16", "W4A16Linear"),
    ("qwen3", "FP8_DYNAMIC", "Fp8Linear"),
    ("qwen3", "W4A16_ASYM", "W4A16Linear"),
])
def test_compressed_tensors_checkpoint_matches_the_library(compressed, model_name, scheme_name, layer):
    path, reference = compressed(model_name, scheme_name)
    ours = _load(path)
    assert type(ours.layers[0].self_attn.qkv_proj).__name__ == layer
    assert type(ours.layers[-1].mlp.down_proj).__name__ == layer
    _assert_matches_reference(ours, _reference(reference))

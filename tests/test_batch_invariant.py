"""`batch_invariant`: what it accepts, and what it does to a model (the kernels themselves are checked
in the Triton interpreter, tests/test_ops_triton.py, and on the GPU, tests/gpu/test_batch_invariant_gpu.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nanovllm.config import EngineConfig
from nanovllm.engine_args import add_engine_args, engine_config_from_args
from nanovllm.model.loader import load_model
from nanovllm.ops.linear import BatchInvariantLinear


@pytest.mark.parametrize("dtype", ["int4", "float32"])
def test_the_cpu_formats_that_are_invariant_already_accept_it(dtype):
    assert EngineConfig(device="cpu", dtype=dtype, batch_invariant=True).batch_invariant


@pytest.mark.parametrize("args, message", [
    (dict(dtype="bfloat16"), "needs dtype 'int4' or 'float32'"),
    (dict(dtype="int8"), "needs dtype 'int4' or 'float32'"),
    (dict(dtype="float32", tensor_parallel_size=2), "tensor_parallel_size=1 only"),
    (dict(dtype="float32", batch_invariant="yes"), "must be True or False"),
])
def test_what_has_no_invariant_kernels_is_refused(args, message):
    args.setdefault("batch_invariant", True)
    with pytest.raises(ValueError, match=message):
        EngineConfig(device="cpu", **args)


def test_the_flag_reaches_the_config():
    import argparse
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(["--batch-invariant", "--device", "cpu"]))
    assert config.batch_invariant and not engine_config_from_args(parser.parse_args(["--device", "cpu"])).batch_invariant


@pytest.mark.parametrize("name", ["llama-gqa4", "qwen2", "llama-mha-hd80"])
def test_every_linear_layer_becomes_invariant_over_the_same_parameters(tiny_model_factory, name):
    model, _ = load_model(str(tiny_model_factory(name)))
    before = {id(p) for p in model.parameters()}
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    model.use_batch_invariant_kernels()
    assert model.batch_invariant and all(layer.self_attn.batch_invariant for layer in model.layers)
    assert not [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert sorted(n for n, m in model.named_modules() if isinstance(m, BatchInvariantLinear)) == sorted(linears)
    assert {id(p) for p in model.parameters()} == before                       # shared, nothing copied
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight
    x = torch.randn(5, model.config.hidden_size)
    assert torch.equal(model.lm_head(x), nn.functional.linear(x, model.lm_head.weight))   # the CPU: nn.Linear's


def test_a_model_with_quantized_layers_is_refused(tiny_model_factory):
    model, _ = load_model(str(tiny_model_factory("llama-gqa4")))

    class QuantizedLinear(nn.Module):   # what the quantized layers offer the model
        def forward_or_partials(self, x):
            return x

    model.layers[0].mlp.down_proj = QuantizedLinear()
    with pytest.raises(ValueError, match="QuantizedLinear layers have none"):
        model.use_batch_invariant_kernels()

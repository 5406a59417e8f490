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
Greedy tokens are equal for 32 steps. FP8's one-row steps are weight-only in the engine
(fp8_linear_torch), so after the prompt (compressed-tensors' own forward) the oracle of each
token is the float model of compressed-tensors' dequantized weights, on the KV cache the prompt
left.
"""
from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch

from conftest import PagedSequence, assert_logits_close, write_tiny_model

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

    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    preset = scheme_name.removesuffix("_PER_TENSOR")
    asymmetric = preset not in PRESET_SCHEMES and preset.endswith("_ASYM")   # e.g. W6A16_ASYM: W6A16 with zeros
    scheme = preset_name_to_scheme(preset.removesuffix("_ASYM") if asymmetric else preset, ["Linear"])
    if scheme_name.endswith("_PER_TENSOR"):
        scheme.weights.strategy = "tensor"
    if asymmetric:
        scheme.weights.symmetric = False
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
        elif args.strategy == "block":      # rows padded with zeros to whole blocks (absmax is unchanged)
            (rows, cols), (block_rows, block_cols) = weight.shape, args.block_structure
            padded = torch.nn.functional.pad(weight, (0, -cols % block_cols, 0, -rows % block_rows))
            blocks = padded.reshape(padded.shape[0] // block_rows, block_rows, -1, block_cols)
            low, high = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
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
    reference = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for name, weight in dequantized.items():
        reference.get_submodule(name).weight.data.copy_(weight)
    reference.save_pretrained(out.with_name("dequantized"))     # FP8 too: the oracle of one-row steps
    weight_only = not scheme_name.startswith("FP8") or scheme_name == "FP8_BLOCK"   # the engine's compute
    return out, out.with_name("dequantized") if weight_only else out


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


def _assert_matches_reference(ours, reference, decode_reference=None) -> None:
    """The prompt's logits, then 32 greedy tokens. decode_reference: the model that computes the one-token
    steps after the prompt, on the KV cache reference left (FP8: the engine multiplies one row by the
    dequantized weights, x as it is, where compressed-tensors' forward would round x to e4m3)."""
    with torch.no_grad():
        theirs = reference(torch.tensor([PROMPT])).logits[0]
        assert_logits_close(PagedSequence(ours).step(PROMPT), theirs)
        if decode_reference is not None:
            assert PagedSequence(ours).greedy(PROMPT, NUM_GREEDY_STEPS) == _prefill_then_decode(reference,
                                                                                                  decode_reference)
            return
        generated = reference.generate(torch.tensor([PROMPT]), max_new_tokens=NUM_GREEDY_STEPS, do_sample=False,
                                       pad_token_id=0)
    theirs = generated[0, len(PROMPT):].tolist()   # transformers stops at EOS; our greedy runs on
    assert theirs and (len(theirs) == NUM_GREEDY_STEPS or theirs[-1] == reference.config.eos_token_id)
    assert PagedSequence(ours).greedy(PROMPT, NUM_GREEDY_STEPS)[:len(theirs)] == theirs


def _prefill_then_decode(prefill, decode) -> list[int]:
    """NUM_GREEDY_STEPS greedy tokens: the prompt through `prefill`, each later token through `decode`,
    which reads and extends the KV cache that `prefill` left."""
    name = _cache_name(decode)
    out = prefill(torch.tensor([PROMPT]), use_cache=True)
    cache, tokens = getattr(out, name), [int(out.logits[0, -1].argmax())]
    while len(tokens) < NUM_GREEDY_STEPS:
        out = decode(torch.tensor([[tokens[-1]]]), use_cache=True, **{name: cache})
        cache = getattr(out, name)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def _cache_name(model) -> str:
    """What transformers calls the KV cache among a model's forward arguments and outputs: `cache` in
    recent releases (where `past_key_values` is deprecated, to go in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@pytest.mark.parametrize("num_bits", [2, 3, 5, 6, 7, 8])
@pytest.mark.parametrize("count", [1, 31, 32, 33, 100])
def test_dense_codes_unpack_as_compressed_tensors_packs_them(num_bits, count):
    """unpack_dense against the library's own pack_to_int32, every bit width the loader reads, rows
    whose codes end inside a word and codes that straddle two."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from nanovllm.model.quantization.compressed_tensors import unpack_dense

    offset = 1 << (num_bits - 1)
    codes = torch.randint(-offset, offset, (5, count), generator=torch.Generator().manual_seed(count)).to(torch.int8)
    assert torch.equal(unpack_dense(pack_to_int32(codes, num_bits), num_bits, count), codes.to(torch.int32) + offset)


@pytest.mark.parametrize("model_name,scheme_name,layer", [
    ("llama-gqa4", "FP8_DYNAMIC_PER_TENSOR", "Fp8Linear"),
    ("llama-gqa4", "W4A16", "W4A16Linear"),
    ("qwen3", "FP8_DYNAMIC", "Fp8Linear"),
    ("qwen3", "W4A16_ASYM", "W4A16Linear"),
    ("llama-gqa4", "W8A16", "W8A16Linear"),        # 8-bit codes, four a word
    ("qwen3", "W8A8", "W8A16Linear"),              # int8 [N, K] as stored; activations kept in 16 bits
    ("llama-gqa4", "W3A16", "W8A16Linear"),        # codes that straddle two words
    ("qwen3", "W6A16_ASYM", "W8A16Linear"),        # and zero points packed so along N
    ("llama-gqa4", "FP8_BLOCK", "W8A16Linear"),    # e4m3 codes, a scale per 128 x 128 (k_proj: 64 rows)
])
def test_compressed_tensors_checkpoint_matches_the_library(compressed, model_name, scheme_name, layer):
    path, reference = compressed(model_name, scheme_name)
    ours = _load(path)
    assert type(ours.layers[0].self_attn.qkv_proj).__name__ == layer
    assert type(ours.layers[-1].mlp.down_proj).__name__ == layer
    if layer == "W8A16Linear":     # an asymmetric scheme's zero points become offsets
        assert (ours.layers[0].self_attn.qkv_proj.offsets is not None) == scheme_name.endswith("_ASYM")
    one_row = _reference(path.with_name("dequantized")) if reference == path else None
    _assert_matches_reference(ours, _reference(reference), one_row)


# ---- GPTQ and AWQ, packed by transcriptions of their packers ------------------------------

GROUP_SIZE = 64
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def _pack_gptq_rows(intweight, bits=4):
    """AutoGPTQ's QuantLinear.pack (bits 4 or 8): [K, N] codes -> [K / (32 / bits), N], input j of a
    run of 32 / bits in bits `bits` (j - i)."""
    import numpy as np

    per_word = 32 // bits
    qweight = np.zeros((intweight.shape[0] // per_word, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + per_word):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += per_word
        row += 1
    return qweight


def _pack_gptq_columns(zeros, bits=4):
    """AutoGPTQ's qzeros packing: [G, N] -> [G, N / (32 / bits)]."""
    import numpy as np

    per_word = 32 // bits
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // per_word), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + per_word):
            qzeros[:, col] |= zeros[:, j] << (bits * (j - i))
        i += per_word
        col += 1
    return qzeros


def _pack_awq(intweight):
    """AutoAWQ's WQLinear_GEMM.from_linear: [R, N] -> [R, N / 8] in the order 0, 2, 4, 6, 1, 3, 5, 7."""
    import numpy as np

    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    qweight = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)
    return qweight


def write_four_bit(src: Path, out: Path, method: str, desc_act: bool = False, bits: int = 4) -> tuple[Path, Path]:
    """Quantize every decoder linear of the model at `src` to 4 bits (GPTQ: or 8; random codes, zeros
    and scales near the weights' range) in `method`'s packing; -> (checkpoint, float model of the
    same weights)."""
    import numpy as np
    from safetensors.torch import save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    orders: dict[str, torch.Tensor] = {}      # one act order per input (q/k/v share theirs, as GPTQ makes them)
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and ".layers." in name):
            continue
        n, k = module.weight.shape
        groups = k // GROUP_SIZE
        levels = 1 << bits
        codes = torch.randint(0, levels, (n, k), generator=generator)
        zeros = torch.randint(1, levels, (groups, n), generator=generator)
        scales = (torch.rand(groups, n, generator=generator) + 0.5) * module.weight.abs().max() / (levels // 2)
        scales = scales.half()
        g_idx = torch.arange(k) // GROUP_SIZE
        if desc_act:
            layer, leaf = name.rsplit(".", 2)[0], name.rsplit(".", 1)[1]
            order = orders.setdefault(f"{layer}.{SHARED_INPUT.get(leaf, leaf)}", torch.randperm(k, generator=generator))
            g_idx = torch.empty(k, dtype=torch.int64)
            g_idx[order] = torch.arange(k) // GROUP_SIZE
        dequantized = (codes - zeros[g_idx].T) * scales.float()[g_idx].T                  # [N, K]
        module.weight.data.copy_(dequantized)
        if method == "gptq":
            qweight = _pack_gptq_rows(codes.T.numpy().astype(np.uint32), bits)
            qzeros = _pack_gptq_columns((zeros - 1).numpy().astype(np.uint32), bits)
            tensors[f"{name}.g_idx"] = g_idx.to(torch.int32)
        else:
            qweight = _pack_awq(codes.T.numpy().astype(np.uint32))
            qzeros = _pack_awq(zeros.numpy().astype(np.uint32))
        tensors[f"{name}.qweight"] = torch.from_numpy(qweight.view(np.int32))
        tensors[f"{name}.qzeros"] = torch.from_numpy(qzeros.view(np.int32))
        tensors[f"{name}.scales"] = scales
    reference = out.with_name("dequantized")
    model.save_pretrained(reference)
    for name, value in model.state_dict().items():
        if not (".layers." in name and name.endswith("proj.weight")):
            tensors[name] = value.clone()     # a tied head shares the embedding's storage
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors")
    config = json.loads((reference / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": bits, "group_size": GROUP_SIZE, "desc_act": desc_act, "sym": False,
         "checkpoint_format": "gptq"} if method == "gptq" else
        {"quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True, "version": "gemm"})
    (out / "config.json").write_text(json.dumps(config))
    return out, reference


@pytest.mark.parametrize("model_name,method,desc_act,bits", [
    ("llama-gqa4", "gptq", False, 4), ("qwen3", "gptq", True, 4), ("llama-gqa4", "awq", False, 4),
    ("llama-gqa4", "gptq", False, 8), ("qwen3", "gptq", True, 8),
])
def test_gptq_and_awq_checkpoints_match_their_dequantized_weights(tmp_path, model_name, method, desc_act, bits):
    src = write_tiny_model(tmp_path / "float", model_name)
    path, reference = write_four_bit(src, tmp_path / "quantized", method, desc_act, bits)
    ours = _load(path)
    layer = ours.layers[0].self_attn.qkv_proj
    assert type(layer).__name__ == {4: "W4A16Linear", 8: "W8A16Linear"}[bits]
    assert (layer.input_perm is not None) == desc_act
    _assert_matches_reference(ours, _reference(reference))


# ---- transformers' fine-grained FP8, written as its quantizer writes it --------------------

def write_fp8_block(src: Path, out: Path, block: tuple[int, int] = (128, 128)) -> Path:
    """Every decoder linear of the model at `src` as e4m3 with a float32 scale per block (the
    block's largest magnitude / 448, as transformers' FP8 quantizer computes it: `weight_scale_inv`),
    the LM head left out; transformers loads the file (dequantizing it on a machine without a GPU)."""
    from safetensors.torch import save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tensors = {name: value.clone() for name, value in model.state_dict().items()}
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and ".layers." in name):
            continue
        weight = module.weight.data
        (rows, cols), (block_rows, block_cols) = weight.shape, block
        padded = torch.nn.functional.pad(weight, (0, -cols % block_cols, 0, -rows % block_rows))
        blocks = padded.reshape(padded.shape[0] // block_rows, block_rows, -1, block_cols)
        scale = blocks.abs().amax(dim=(1, 3)) / 448                                       # [N / bn, K / bk]
        expanded = scale.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]
        tensors[f"{name}.weight"] = (weight / expanded).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors[f"{name}.weight_scale_inv"] = scale
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": list(block), "modules_to_not_convert": ["lm_head"]}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("model_name", ["llama-gqa4", "qwen3"])
def test_block_fp8_checkpoints_match_transformers(tmp_path, model_name):
    """transformers dequantizes the blocks on a machine without a GPU (its kernels run activations in
    e4m3 on one): the float model of the same weights, which is what the engine computes."""
    src = write_tiny_model(tmp_path / "float", model_name)
    path = write_fp8_block(src, tmp_path / "quantized")
    ours = _load(path)
    layer = ours.layers[0].self_attn.qkv_proj
    assert type(layer).__name__ == "W8A16Linear" and layer.qweight.dtype == torch.float8_e4m3fn
    _assert_matches_reference(ours, _reference(path))


def test_block_fp8_settings_nano_vllm_cannot_run_are_refused():
    from nanovllm.model.errors import ModelLoadError
    from nanovllm.model.quantization import quantization_method

    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert quantization_method(fp8).block == (128, 128)
    with pytest.raises(ModelLoadError, match="without a weight_block_size"):
        quantization_method({**fp8, "weight_block_size": None})
    with pytest.raises(ModelLoadError, match="static activation scales"):
        quantization_method({**fp8, "activation_scheme": "static"})
    with pytest.raises(ModelLoadError, match="leaves 'model.layers.0.mlp.down_proj' unquantized"):
        quantization_method({**fp8, "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.down_proj"]})


# ---- online quantization and errors -------------------------------------------------------

@pytest.mark.parametrize("method,head_in_4_bits,layer,head,rel", [
    ("fp8", False, "Fp8Linear", "Fp8Linear", 0.25),
    ("w4a16", False, "W4A16Linear", "Fp8Linear", 0.55),
    ("w4a16", True, "W4A16Linear", "W4A16Linear", 0.55),     # W4A16_HEAD_IN_4_BITS
])
def test_online_quantization_stays_near_the_float_model(tiny_llama, method, head_in_4_bits, layer, head, rel,
                                                        monkeypatch):
    """e4m3 rounds weights and activations to 3 mantissa bits (relative error up to 2^-4 each, partly
    averaging out over a dot product), the LM head's included; 4-bit round-to-nearest errs by up to
    half a step of a group's 16. The tiny models' sharp attention amplifies both: the bounds are twice
    the errors observed in the logits (12% and 27% of the largest logit). The library-oracle tests above
    hold the formats to the rounding itself; this one catches a wrong scale or a shifted code, which
    moves the logits by several times the largest logit."""
    from nanovllm.model.quantization import online

    monkeypatch.setattr(online, "W4A16_HEAD_IN_4_BITS", head_in_4_bits)
    float_model, quantized = _load(tiny_llama), _load(tiny_llama, quantization=method)
    assert type(quantized.layers[1].mlp.gate_up_proj).__name__ == layer
    assert type(quantized.lm_head).__name__ == head
    assert_logits_close(PagedSequence(quantized).step(PROMPT), PagedSequence(float_model).step(PROMPT), rel=rel)


def record_rows_given(monkeypatch, products: tuple[str, ...], rows_type: type) -> list[bool]:
    """Wrap the quantized layers' product functions `products` (model/quantization/layers.py) so that
    each call appends to the returned list whether its x came as rows_type, in the order of the calls."""
    from nanovllm.model.quantization import layers

    taken = []
    for name in products:
        product = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda x, *args, product=product: taken.append(isinstance(x, rows_type))
                            or product(x, *args))
    return taken


def test_fp8_products_take_their_rows_quantized_by_the_kernel_before(tiny_llama, monkeypatch):
    """In an FP8 model the norms hand qkv_proj and gate_up_proj their rows already quantized
    (Fp8Rows), and SiLU-and-mul hands down_proj its; o_proj, after the attention, quantizes its
    own. Quantizing where the rows are computed is the same rounding as in the product, so the
    prompt's and a decode step's logits are the same bits with and without it."""
    from nanovllm.ops import quant_linear
    from nanovllm.ops.quant_format import Fp8Rows

    model = _load(tiny_llama, quantization="fp8")
    taken = record_rows_given(monkeypatch, ("fp8_linear", "fp8_linear_or_partials", "fp8_linear_silu_and_mul"),
                              Fp8Rows)
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(quant_linear, "FP8_ROWS_FROM_PRODUCER", fused)
        taken.clear()
        sequence = PagedSequence(model)
        runs.append((sequence.step(PROMPT), sequence.step([11])))
        per_layer = taken[:4]                    # the first layer's prompt: qkv, o, gate_up, down
        assert per_layer == ([True, False, True, True] if fused else [False] * 4)
    for fused, unfused in zip(*runs):
        assert torch.equal(fused, unfused)


def test_a_split_gate_up_proj_hands_silu_and_mul_its_partial_products(tiny_llama, monkeypatch):
    """With PARTIALS_INTO_SILU on, a quantized gate_up_proj whose product splits K hands SiLU-and-mul
    the float32 partials, which it adds up itself: here the CPU's product stands in for the GPU's
    split (its output halved, twice: their sum is the output exactly), and the logits are the same bits."""
    from nanovllm.model.quantization import layers
    from nanovllm.ops import activation

    model = _load(tiny_llama, quantization="w4a16")
    split = layers.W4A16Linear.forward_or_partials
    monkeypatch.setattr(layers.W4A16Linear, "forward_or_partials",
                        lambda self, x: (split(self, x).float() * 0.5).expand(2, -1, -1))
    given = []       # the partials' dtype of each SiLU-and-mul call
    silu = activation.silu_and_mul
    monkeypatch.setattr(activation, "silu_and_mul", lambda x, *args, partials_dtype=None:
                        given.append(partials_dtype) or silu(x, *args, partials_dtype=partials_dtype))
    runs = []
    for into_silu in (True, False):
        monkeypatch.setattr(activation, "PARTIALS_INTO_SILU", into_silu)
        given.clear()
        sequence = PagedSequence(model)
        runs.append((sequence.step(PROMPT), sequence.step([11])))
        assert given and all(dtype == (torch.float32 if into_silu else None) for dtype in given)
    for into_silu, summed in zip(*runs):
        assert torch.equal(into_silu, summed)


def test_unknown_quantization_method_is_named_in_the_error(tiny_llama, tmp_path):
    from nanovllm.model.errors import ModelLoadError

    path = tmp_path / "model"
    path.mkdir()
    for item in tiny_llama.iterdir():
        (path / item.name).write_bytes(item.read_bytes())
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="quantization method 'bitsandbytes' is not supported"):
        _load(path)


def test_online_quantization_rejects_an_unknown_name_and_a_quantized_checkpoint(tiny_llama, compressed):
    with pytest.raises(ValueError, match="quantization='int3' is not supported"):
        _load(tiny_llama, quantization="int3")
    with pytest.raises(ValueError, match="already quantized"):
        _load(compressed("llama-gqa4", "W4A16")[0], quantization="fp8")


def test_a_checkpoint_missing_a_quantized_tensor_names_the_module(tmp_path):
    from safetensors.torch import load_file, save_file

    from nanovllm.model.errors import ModelLoadError

    path, _ = write_four_bit(write_tiny_model(tmp_path / "float", "llama-gqa4"), tmp_path / "quantized", "awq")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.qzeros"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj lacks the tensor\(s\) qzeros"):
        _load(path)


@pytest.mark.parametrize("damage", ["scale-shape", "weight-dtype", "packed-shape", "gptq8-shape"])
def test_a_damaged_eight_bit_tensor_is_named_in_one_clear_error(tmp_path, damage):
    """Block-scaled FP8 with scales that do not tile the weight, or a weight not in e4m3; dense-packed
    codes and 8-bit GPTQ words of the wrong shape: a ModelLoadError naming the module and the shapes."""
    from safetensors.torch import load_file, save_file

    from nanovllm.model.errors import ModelLoadError

    src = write_tiny_model(tmp_path / "float", "llama-gqa4")
    if damage in ("scale-shape", "weight-dtype"):
        path = write_fp8_block(src, tmp_path / "quantized")
    elif damage == "packed-shape":
        path = write_compressed_tensors(src, tmp_path / "quantized", "W6A16")[0]
    else:
        path = write_four_bit(src, tmp_path / "quantized", "gptq", bits=8)[0]
    tensors = load_file(path / "model.safetensors")
    module = "model.layers.1.mlp.up_proj"
    if damage == "scale-shape":
        name, value, words = "weight_scale_inv", torch.ones(3, 2), r"\(3, 2\) block scales .* expected \(2, 2\)"
    elif damage == "weight-dtype":
        name, value, words = "weight", tensors[f"{module}.weight"].float(), "torch.float32; an FP8 checkpoint stores"
    elif damage == "packed-shape":
        name, value = "weight_packed", tensors[f"{module}.weight_packed"][:, :-1].contiguous()
        words = r"weight_packed is torch.int32 \(256, 47\); expected int32 \(256, 48\) for 6-bit codes"
    else:
        name, value = "qweight", tensors[f"{module}.qweight"][:-1].contiguous()
        words = r"qweight: converted to shape \(256, 252\), the config implies \(256, 256\)"
    tensors[f"{module}.{name}"] = value
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=rf"{module}.*{words}"):
        _load(path)


def test_settings_nano_vllm_cannot_run_are_refused_up_front():
    from nanovllm.model.errors import ModelLoadError
    from nanovllm.model.quantization import quantization_method

    with pytest.raises(ValueError, match="act order.*tensor_parallel_size=1"):
        quantization_method({"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True}, tp_size=2)
    assert quantization_method({"quant_method": "gptq", "bits": 4, "group_size": 64}, tp_size=2).name == "gptq"
    with pytest.raises(ModelLoadError, match="3-bit weights is not supported; nano-vllm runs 4 and 8-bit GPTQ"):
        quantization_method({"quant_method": "gptq", "bits": 3, "group_size": 128})
    with pytest.raises(ModelLoadError, match="8-bit weights is not supported; nano-vllm runs 4-bit AWQ"):
        quantization_method({"quant_method": "awq", "bits": 8, "group_size": 128})
    with pytest.raises(ModelLoadError, match="quantizes lm_head"):
        quantization_method({"quant_method": "compressed-tensors", "ignore": [], "config_groups": {"g": {
            "targets": ["Linear"], "format": "pack-quantized",
            "weights": {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 128}}}})


def test_engine_config_takes_an_online_method_with_a_float_dtype():
    from nanovllm.config import EngineConfig

    assert EngineConfig(quantization="fp8", device="cpu").dtype == "float32"   # not the CPU's int4 default
    with pytest.raises(ValueError, match="quantization must be one of fp8, w4a16"):
        EngineConfig(quantization="fp8", dtype="int4", device="cpu")


def test_the_engine_serves_a_quantized_checkpoint(compressed):
    """Through LLM.generate (continuous batching, chunked prefill, prefix caching): the same greedy
    tokens as the model run alone, for two requests sharing a prefix."""
    from nanovllm import LLM, SamplingParams

    path, _ = compressed("llama-gqa4", "W4A16")
    prompts = [PROMPT, PROMPT[:6] + [11, 12, 13]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(str(path), device="cpu", max_num_batched_tokens=8, max_model_len=64)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    ours = _load(path)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == PagedSequence(ours).greedy(prompt, 8)


def test_online_w4a16_rounds_as_compressed_tensors_does(tiny_llama, tmp_path):
    """Online w4a16 (asymmetric min-max groups of 128) gives the logits of the weights that
    compressed-tensors' W4A16_ASYM preset rounds to: the library is the oracle for each code and zero
    of the decoder's layers (both sides take the engine's e4m3 LM head, held to the library by the
    FP8 tests)."""
    _, dequantized = write_compressed_tensors(tiny_llama, tmp_path / "quantized", "W4A16_ASYM")
    ours = _load(tiny_llama, quantization="w4a16")
    reference = _load(dequantized)
    reference.lm_head = ours.lm_head    # online w4a16 keeps the head in e4m3: the same head on both sides
    assert_logits_close(PagedSequence(ours).step(PROMPT), PagedSequence(reference).step(PROMPT), rel=1e-4)

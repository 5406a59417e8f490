"""Perplexity of the embedded SmolLM2-135M in each quantized format, on the CPU, through the
engine's own loaders and torch references.

The evaluation text is tests/data/quality_text.txt (English prose written for the project); its
first 2,001 tokens give 2,000 predictions. The baseline is the embedded model's Q4_1 weights
dequantized and run in bfloat16 (float32 too, for reference). Each format's checkpoint is made
from those dequantized weights by the format's own tool:

    ct-fp8-dynamic   llmcompressor `oneshot`, QuantizationModifier FP8_DYNAMIC, ignore lm_head
                     (e4m3 weights with a scale per output channel, activations per token)
    ct-w4a16-gptq    llmcompressor `oneshot`, GPTQModifier, 4-bit symmetric groups of 64, ignore
                     lm_head, calibrated on tests/data/calibration_text.txt (another English text,
                     932 tokens). Groups of 64, not 128: SmolLM2's hidden size 576 is no multiple of 128.
    ct-w4a16-asym-gptq   the same with zero points (asymmetric) in groups of 32
    ct-w4a16-asym-rtn    asymmetric groups of 32 by round-to-nearest (QuantizationModifier, no calibration)
    gguf-q8_0, gguf-q4_0, gguf-q4_1, gguf-q5_0, gguf-q5_1
                     the gguf package's quantizer (`gguf.quants.quantize`), every linear layer
    gguf-q4_k/q5_k/q6_k
                     tests/conftest.py's `quantize_k_blocks` (round-to-nearest, not llama.cpp's
                     search); only down_proj (K = 1536) can hold 256-weight superblocks, the 576-wide
                     layers fall back to Q8_0 as tests/conftest.py's writer does (llama.cpp falls
                     back too: Q4_K to Q5_0, Q6_K to Q8_0)
    fp8, w4a16, online-gguf-q8_0, online-gguf-q4_k
                     online `quantization=...` (the engine's own round-to-nearest; gguf-q4_k on every
                     layer, with float scales and offsets per 32 rather than 6-bit sub-scales)

Two rows take ct-fp8-dynamic apart: "-weights-only" keeps every activation in 16 bits (e4m3
weights alone), "-down-a16" keeps down_proj's input in 16 bits and quantizes the others.

The GGUF files keep the embedding in float32 (the LM head is tied to it), so each GGUF row
measures the format's linear layers. Run from the repository root, in an environment with
llmcompressor for the ct-* rows (a separate venv: it pins its own transformers):

    python tools/quality_guard.py                       # every format: 20-60 s each on 2 cores, GPTQ ~20 min
    python tools/quality_guard.py --formats bf16 fp8    # some of them

It prints one line a format: perplexity, its change from bfloat16, top-1 agreement with bfloat16.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanovllm.model.gguf import gguf_config, gguf_tokenizer_dir, gguf_weights   # noqa: E402
from nanovllm.model.loader import load_model, resolve_model                       # noqa: E402
from tests.conftest import QUALITY_TEXT, perplexity, prompt_logits, quality_tokens, write_tiny_gguf  # noqa: E402

CALIBRATION_TEXT = ROOT / "tests" / "data" / "calibration_text.txt"
FORMATS = ("float32", "bf16", "fp8", "w4a16", "online-gguf-q8_0", "online-gguf-q4_k", "ct-fp8-dynamic",
           "ct-fp8-dynamic-weights-only", "ct-fp8-dynamic-down-a16", "ct-w4a16-gptq", "ct-w4a16-asym-gptq",
           "ct-w4a16-asym-rtn", "gguf-q8_0", "gguf-q4_k", "gguf-q6_k", "gguf-q4_0", "gguf-q4_1", "gguf-q5_0",
           "gguf-q5_1", "gguf-q5_k")
# compressed-tensors 4-bit schemes: (symmetric, group size); SmolLM2's 576 inputs are no multiple of 128
W4A16_SCHEMES = {"w4a16-gptq": (True, 64), "w4a16-asym-gptq": (False, 32), "w4a16-asym-rtn": (False, 32)}


# ---- checkpoints ---------------------------------------------------------------------------------

def export_hf_dir(out: Path) -> Path:
    """The embedded GGUF as a HuggingFace directory: config.json, float32 model.safetensors (the
    dequantized weights, q and k rows back in rotate-half order), the tokenizer."""
    from safetensors.torch import save_file

    path = resolve_model(None)
    config = gguf_config(path)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids[0],
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file({name: tensor.contiguous() for name, tensor in gguf_weights(path, config)}, str(out / "model.safetensors"))
    for item in gguf_tokenizer_dir(path).iterdir():
        shutil.copy(item, out / item.name)
    return out


def llmcompressor_checkpoint(hf_dir: Path, out: Path, scheme: str) -> Path:
    """hf_dir quantized by llmcompressor's oneshot: "fp8-dynamic" (no calibration), or a 4-bit scheme
    of W4A16_SCHEMES: by GPTQ calibrated on CALIBRATION_TEXT, or round-to-nearest ("-rtn")."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    if scheme == "fp8-dynamic":
        oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]))
    else:
        symmetric, group_size = W4A16_SCHEMES[scheme]
        weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group_size}
        config_groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
        if scheme.endswith("-rtn"):
            oneshot(model=model, recipe=QuantizationModifier(config_groups=config_groups, ignore=["lm_head"]))
        else:
            from datasets import Dataset

            calibration = tokenizer(CALIBRATION_TEXT.read_text())["input_ids"]
            chunks = [calibration[i:i + 256] for i in range(0, len(calibration) - 64, 128)]   # overlapping windows
            dataset = Dataset.from_dict({"input_ids": chunks, "attention_mask": [[1] * len(c) for c in chunks]})
            oneshot(model=model, dataset=dataset, recipe=GPTQModifier(config_groups=config_groups, ignore=["lm_head"]),
                    num_calibration_samples=len(chunks), max_seq_length=256)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return out


def gguf_checkpoint(hf_dir: Path, out: Path, qtype: str) -> Path:
    """hf_dir as a GGUF whose linear layers are `qtype` blocks (tests/conftest.py's writer), the
    embedding float32."""
    return write_tiny_gguf(hf_dir, out, lambda name: "F32" if name == "token_embd.weight" else qtype)


# ---- the table -----------------------------------------------------------------------------------

def load(fmt: str, work: Path):
    """fmt -> (model, its activations' dtype), its checkpoint made under `work` when needed."""
    if fmt == "float32":
        return load_model(None, dtype=torch.float32)[0], torch.float32
    if fmt == "bf16":
        return load_model(None, dtype=torch.bfloat16)[0], torch.bfloat16
    if fmt in ("fp8", "w4a16") or fmt.startswith("online-"):
        return load_model(None, dtype=torch.bfloat16, quantization=fmt.removeprefix("online-"))[0], torch.bfloat16
    hf_dir = work / "hf"
    if not (hf_dir / "model.safetensors").is_file():
        export_hf_dir(hf_dir)
    if fmt.startswith("ct-fp8-dynamic-"):
        model, kv_dtype = load("ct-fp8-dynamic", work)
        keep_activations_16_bit(model, "" if fmt.endswith("-weights-only") else "down_proj")
        return model, kv_dtype
    if fmt.startswith("ct-"):
        path = work / fmt
        if not (path / "config.json").is_file():
            llmcompressor_checkpoint(hf_dir, path, fmt.removeprefix("ct-"))
        return load_model(str(path), dtype=torch.bfloat16)[0], torch.bfloat16
    path = gguf_checkpoint(hf_dir, work / f"{fmt}.gguf", fmt.removeprefix("gguf-").upper())
    return load_model(str(path), dtype=torch.bfloat16, quantization="gguf")[0], torch.bfloat16


def keep_activations_16_bit(model, suffix: str) -> None:
    """Fp8Linear layers whose name ends with `suffix` ("": all) multiply their e4m3 weight, scaled,
    by the unquantized activations: what the activations' rounding costs, taken out."""
    from nanovllm.model.quantization.layers import Fp8Linear

    for name, layer in model.named_modules():
        if isinstance(layer, Fp8Linear) and name.endswith(suffix):
            def forward(x: torch.Tensor, layer=layer) -> torch.Tensor:
                weight = layer.weight.float() * layer.weight_scale[:, None]                     # [N, K]
                bias = None if layer.bias is None else layer.bias.float()
                return torch.nn.functional.linear(x.float(), weight, bias).to(x.dtype)
            layer.forward = layer.forward_or_partials = forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--tokens", type=int, default=2000, help="predictions (default: 2000)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the checkpoints (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="quality-guard-"))
    token_ids = quality_tokens(args.tokens)
    baseline, _ = load("bf16", work)
    reference = prompt_logits(baseline, token_ids, torch.bfloat16)
    del baseline
    reference_perplexity = perplexity(reference, token_ids)
    print(f"{len(token_ids) - 1} predictions of {QUALITY_TEXT.name}; bf16 perplexity {reference_perplexity:.4f}")
    for fmt in args.formats:
        start = time.perf_counter()
        model, kv_dtype = load(fmt, work)
        logits = prompt_logits(model, token_ids, kv_dtype)
        value = perplexity(logits, token_ids)
        agreement = (logits[:-1].argmax(-1) == reference[:-1].argmax(-1)).float().mean().item()
        print(f"{fmt:16s} perplexity {value:8.4f}  {100 * (value / reference_perplexity - 1):+6.2f}%  "
              f"top-1 agreement {100 * agreement:5.1f}%  ({time.perf_counter() - start:.0f} s)", flush=True)
        del model, logits


if __name__ == "__main__":
    main()

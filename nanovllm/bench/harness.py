"""The engine under benchmark: built from an EngineConfig, fed token ids, stepped to completion.

Benchmarks send token ids, never text, so every engine (and every peer) sees
exactly the same prompts. A dummy model (random weights of a built-in config
such as `qwen3-0.6b`) comes without a tokenizer; it gets `TokenIdTokenizer`,
which cannot encode text and decodes each id to a short tag: the engine still
pays for detokenizing every token, as it would with a real vocabulary.
"""
from __future__ import annotations

import itertools

from tqdm import tqdm

from nanovllm.config import EngineConfig
from nanovllm.engine.engine import LLMEngine
from nanovllm.model.errors import ModelLoadError
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.tokenizer import TokenIdTokenizer, Tokenizer

_request_ids = itertools.count()


def make_engine(config: EngineConfig) -> LLMEngine:
    """The engine for `config`; a dummy model without a tokenizer of its own gets TokenIdTokenizer."""
    tokenizer = None
    if config.load_format == "dummy" and config.tokenizer is None:
        try:
            tokenizer = Tokenizer.load(config.model)
        except (ModelLoadError, OSError, ValueError):
            from nanovllm.model.loader import load_model_config

            model_config = load_model_config(config.model, "dummy")
            tokenizer = TokenIdTokenizer(model_config.vocab_size, model_config.eos_token_ids,
                                         model_config.bos_token_id)
    return LLMEngine(config, tokenizer=tokenizer)


def generate(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams], use_tqdm: bool = False,
             desc: str = "nano-vllm") -> list[RequestOutput]:
    """Submit every prompt at once, step until all are finished; final outputs in prompt order."""
    request_ids = [f"bench-{next(_request_ids)}" for _ in prompts]
    engine.add_requests(list(zip(request_ids, prompts, params)), stream=False)
    finished: dict[str, RequestOutput] = {}
    with tqdm(total=len(request_ids), desc=desc, disable=not use_tqdm, dynamic_ncols=True) as bar:
        while len(finished) < len(request_ids):
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
                    bar.update(1)
    failed = [output.error for output in finished.values() if output.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(request_ids)} requests failed; the first: {failed[0]}")
    return [finished[request_id] for request_id in request_ids]

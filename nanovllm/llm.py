"""The offline API: load a model once, generate for a list of prompts.

    from nanovllm import LLM, SamplingParams
    llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    outputs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0, max_tokens=32))
    print(outputs[0].outputs[0].text)

`generate` queues every prompt at once and steps the engine until all are done:
continuous batching does the rest (prompts are prefilled in chunks beside the
decodes of those already running). Outputs come back in the order of the prompts.
"""
from __future__ import annotations

import itertools
import time
from typing import Any

from tqdm import tqdm

from nanovllm.config import EngineConfig
from nanovllm.engine.engine import LLMEngine, Prompt
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.tokenizer import Tokenizer

Conversation = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any):
        """model: a HF directory, a .gguf or llama2.c .bin file; None for the embedded default.
        engine_args: the fields of EngineConfig (an unknown one raises, naming the valid ones)."""
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._request_ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop tensor-parallel worker processes now (otherwise done at interpreter exit)."""
        self.engine.shutdown()

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Every prompt is checked before any runs."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompt_list)} prompts; "
                                 "pass one for all prompts or one per prompt")
        request_ids = [f"generate-{next(self._request_ids)}" for _ in prompt_list]
        self.engine.add_requests(list(zip(request_ids, prompt_list, params_list)), stream=False)
        return self._run_to_completion(request_ids, use_tqdm)

    def chat(self, messages: Conversation | list[Conversation],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} messages) or a list of them,
        each rendered by the model's chat template with the assistant's turn opened."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts = [tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
                   for conversation in conversations]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for output in outputs:
            output.prompt = tokenizer.decode(output.prompt_token_ids, skip_special_tokens=False)
        return outputs

    def _run_to_completion(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        position = {request_id: i for i, request_id in enumerate(request_ids)}
        results: list[RequestOutput | None] = [None] * len(request_ids)
        remaining = len(request_ids)
        bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        start = time.perf_counter()
        prefill_start, decode_start = engine.prefill_tokens_total, engine.decode_tokens_total
        try:
            while remaining:
                for output in engine.step():
                    if output.finished and output.request_id in position:
                        results[position[output.request_id]] = output
                        remaining -= 1
                        bar.update(1)
                if use_tqdm:
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(f"prefill {(engine.prefill_tokens_total - prefill_start) / elapsed:.0f} "
                                        f"tok/s, decode {(engine.decode_tokens_total - decode_start) / elapsed:.0f} "
                                        "tok/s", refresh=False)
        finally:
            bar.close()
            if remaining:   # interrupted: leave nothing of ours running
                for request_id, result in zip(request_ids, results):
                    if result is None:
                        engine.abort_request(request_id)
        failed = [(i, output.error) for i, output in enumerate(results) if output.error is not None]
        if failed:
            i, error = failed[0]
            raise RuntimeError(f"{len(failed)} of {len(results)} requests failed; prompt {i}: {error}")
        return results


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a string, a list of strings or a list of token-id lists, "
                         f"got {type(prompts).__name__}")
    if prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        return [list(prompts)]   # one prompt given as token ids
    return list(prompts)

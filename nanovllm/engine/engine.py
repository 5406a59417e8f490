"""LLMEngine: requests in, a step at a time, outputs out.

    add_request(id, prompt, params)   validate, tokenize, queue n sequences (WAITING)
    step()                            1. Scheduler.schedule()     -> Batch
                                      2. ModelRunner.launch(batch) -> the step queued on the device
                                      3. Scheduler.advance(batch)  -> counters, token placeholders
                                      4. Scheduler.complete(...)   -> tokens in, stop checks, free blocks
                                      -> RequestOutput for each request that made progress
    step_with_deltas()                the same, with delta streams' news left as columns (the server's)
    abort_request(id)                 free its blocks now; it ends with finish_reason "abort"

A request's outputs come in one of three kinds (outputs.py): the whole state so
far at every step, only what is new since its last output (`delta=True`, what a
server streams: a step then costs the same at token 10 and at token 10,000), or
one final output (`stream=False`). Until their final output, delta streams
report in the columns of one `StepDeltas` per step rather than in an object
per request: at batch 256 those objects cost the server's engine core more
host time than the rest of the step (tools/core_loop_probe.py).

Async scheduling (on by default with one CUDA GPU; `async_scheduling=False`
turns it off): step 4 is done for the *previous* step, after this one is
launched. So while the GPU computes step n, the host completes step n-1 and
schedules step n+1; the tokens of step n reach step n+1's inputs on the
device (model_runner.py), not through the host. The host's work then hides
behind the GPU's instead of adding to it. Costs: outputs come one step later,
and a sequence that ends by a stop token or string runs one step too many
(its token is dropped; sequences that end by length are known in advance and
never do). A step with repetition, frequency or presence penalties needs
every earlier token on the host, so the step before it is completed first.
On the CPU the forward runs inside `launch`, so there is nothing to overlap
and only the extra steps would remain: it is off there by default. With
tensor parallelism it runs when asked for (`async_scheduling=True`; off by
default until measured on GPUs): every rank takes the tokens still on rank 0's
device from one broadcast of its sample buffer (model_runner.py).

Measured on an H200 with warm kernel caches (docs/reference/gpu-kernels.md):
`throughput` Llama-3.2-1B 40,882 tok/s on against 33,319 off, Qwen3-0.6B
22,621 against 18,766; a decode step at batch 1 1.37 against 1.53 ms.

Everything a caller can get wrong is checked in `add_request`, before anything
is queued. A step that fails (a device error, say) ends the requests it was
running with finish_reason "error" and the message; the others carry on. When
the fault lies in some requests' own sampling parameters (their rows cannot
be built alone), only those end, and the rest of the batch runs next step. No
request ever ends without a final output.

Observers (`add_step_observer`) see a `StepInfo` after each step: what ran,
how the KV pool looks, how long each phase took. They cost nothing when none
is registered.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nanovllm.config import QUANTIZED_DTYPES, EngineConfig
from nanovllm.engine.block_manager import BlockManager, KVCacheUsage
from nanovllm.engine.scheduler import Batch, Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.model.config import ModelConfig
from nanovllm.model.llama import LlamaForCausalLM
from nanovllm.outputs import CompletionOutput, RequestMetrics, RequestOutput, StepDeltas
from nanovllm.runner.model_runner import ModelRunner
from nanovllm.runner.sampler import DeviceSamples, SamplerOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.structured.grammar import GrammarCompiler, GrammarState
from nanovllm.structured.grammar_process import GrammarProcessError
from nanovllm.tokenizer import IncrementalDetokenizer, TokenIdTokenizer, Tokenizer

logger = logging.getLogger(__name__)

Prompt = str | list[int]


@dataclass
class ScheduledChunk:
    request_id: str
    seq_id: int
    num_new_tokens: int
    is_prefill: bool


@dataclass
class StepInfo:
    """What one step did, for observers (the visualizer, tracing)."""
    step: int
    scheduled: list[ScheduledChunk]
    preempted: list[str]            # request ids preempted while scheduling this step
    finished: list[str]             # request ids that finished in this step
    num_prefill_tokens: int
    num_decode_tokens: int
    kv_usage: KVCacheUsage
    schedule_time: float            # seconds
    run_time: float
    postprocess_time: float


@dataclass
class LaunchedStep:
    """A step queued on the device, waiting for `Scheduler.complete`."""
    batch: Batch
    samples: DeviceSamples | None       # None: no sequence samples in it
    needs_tokens_first: bool            # a later step must not be scheduled before this one completes
    t_start: float                      # perf_counter times: schedule began and ended
    t_scheduled: float


@dataclass
class EngineStats:
    num_running: int                # sequences holding KV blocks
    num_waiting: int                # sequences queued (incl. preempted and samples waiting for their prompt)
    num_preemptions: int
    kv_usage: KVCacheUsage
    num_steps: int
    num_requests_finished: int
    prompt_tokens_total: int        # prompt tokens of the requests added
    generation_tokens_total: int    # tokens sampled
    prefill_tokens_total: int       # tokens computed to (re)build context: prompts, recomputation
    decode_tokens_total: int        # tokens computed one at a time, as decodes

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.kv_usage.prefix_cache_hit_rate

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the pool's blocks in use."""
        return self.kv_usage.used_blocks / self.kv_usage.num_blocks


class LLMEngine:
    def __init__(self, config: EngineConfig, *, model: LlamaForCausalLM | None = None,
                 tokenizer: Tokenizer | None = None):
        """Load the model and tokenizer named by `config`, or use the ones given
        (already loaded on config.device in config.dtype, e.g. shared by several engines)."""
        from nanovllm.model.loader import load_model
        from nanovllm.model.quantize import load_quantized_model, packed_format

        if model is None and config.dtype in QUANTIZED_DTYPES:   # CPU weight formats: ops/quant.py
            model, model_config = load_quantized_model(config.model, config.dtype, config.load_format)
        elif model is None:
            model, model_config = load_model(config.model, device=config.device, dtype=config.torch_dtype,
                                             load_format=config.load_format, tp_size=config.tensor_parallel_size,
                                             quantization=config.quantization)
        else:
            model_config = model.config
            param = next(model.parameters())
            weights = packed_format(model) or "float"
            asked = config.dtype if config.dtype in QUANTIZED_DTYPES else "float"
            if param.device.type != config.device or param.dtype != config.torch_dtype or weights != asked:
                raise ValueError(f"the model given is on {param.device} in {param.dtype} with {weights} linear "
                                 f"weights but the config asks for device={config.device!r}, dtype={config.dtype!r}; "
                                 "make them agree")
        self.config = config = config.fit_model(model_config)
        self.model_config = model_config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config, model_config)
        self.eos_token_ids = sorted(set(self.tokenizer.eos_token_ids) | set(model_config.eos_token_ids))
        self.runner = ModelRunner(config, model, model_config, self.eos_token_ids)
        block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
                                     config.kv_policy, config.max_model_len)
        if block_manager.num_reserved_blocks > block_manager.num_blocks:
            raise ValueError(f"the naive policy reserves {block_manager.num_reserved_blocks} blocks per sequence "
                             f"(max_model_len={config.max_model_len}) but the KV pool has "
                             f"{block_manager.num_blocks}; lower max_model_len or give the pool more memory")
        self.scheduler = Scheduler(block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_model_len, self.eos_token_ids)
        self.requests: dict[str, list[Sequence]] = {}   # unfinished requests -> their samples
        self.final_only: set[str] = set()               # requests that want no intermediate outputs
        self.delta_only: set[str] = set()               # requests whose outputs carry only what is new
        self.pending_outputs: list[RequestOutput] = []  # final outputs of requests ended between steps
        self.in_flight: LaunchedStep | None = None      # async scheduling: the step launched, not completed
        self.step_observers: list[Callable[[StepInfo], None]] = []
        self.rng = random.Random(config.seed)           # seeds of requests that bring none
        self.grammar_compiler: GrammarCompiler | None = None   # made by the first structured-outputs request
        self.next_seq_id = 0
        self.num_steps = 0
        self.num_requests_finished = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.prefill_tokens_total = 0
        self.decode_tokens_total = 0

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes, if any (also done at interpreter exit)."""
        self.runner.shutdown()

    @classmethod
    def from_engine_args(cls, **engine_args) -> "LLMEngine":
        return cls(EngineConfig(**engine_args))

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None, stream: bool = True, delta: bool = False) -> None:
        """Validate and queue a request; ValueError (and nothing queued) if it cannot be served.

        prompt: text, or token ids. stream=False: `step` returns only its final output.
        delta=True: each output carries only what is new since the request's previous one.
        """
        self.add_requests([(request_id, prompt, params)], arrival_time, stream, delta)

    def add_requests(self, requests: list[tuple[str, Prompt, SamplingParams | None]],
                     arrival_time: float | None = None, stream: bool = True, delta: bool = False,
                     detokenize: bool = True) -> None:
        """Queue several requests, all or none: any invalid one raises before any is queued.

        detokenize=False: outputs carry token ids and no text (the caller decodes them, as the
        server's API process does); not with stop strings, which are matched in the text."""
        arrival_time = time.time() if arrival_time is None else arrival_time
        ids = [request_id for request_id, _, _ in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique; the same id appears twice in one call")
        prepared = [self._make_sequences(request_id, prompt, params, arrival_time, detokenize)
                    for request_id, prompt, params in requests]
        for request_id, seqs in zip(ids, prepared):
            self.requests[request_id] = seqs
            if not stream:
                self.final_only.add(request_id)
                # No stream and no stop strings: no one needs the text before the request ends.
                for seq in seqs:
                    seq.detokenize_at_finish = not seq.sampling_params.stop
            elif delta:
                self.delta_only.add(request_id)
            self.prompt_tokens_total += seqs[0].num_prompt_tokens
            self.scheduler.add_sequences(seqs)

    def _make_sequences(self, request_id: str, prompt: Prompt, params: SamplingParams | None,
                        arrival_time: float, detokenize: bool = True) -> list[Sequence]:
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use by an unfinished request; "
                             "pick a unique id")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if params.stop and self.config.skip_tokenizer_init:
            raise ValueError("stop strings need the text, and skip_tokenizer_init makes none; "
                             "use stop_token_ids instead")
        if params.stop and not detokenize:
            raise ValueError("stop strings are matched in the text: a request with them must be detokenized")
        prompt_text, prompt_token_ids = self._tokenize(prompt)
        vocab_size = self.model_config.vocab_size
        outside = [token_id for token_id in params.stop_token_ids if token_id >= vocab_size]
        if outside:
            raise ValueError(f"stop_token_ids {outside} are not in the vocabulary [0, {vocab_size}); "
                             "remove them")
        max_model_len = self.config.max_model_len
        max_tokens = params.max_tokens if params.max_tokens is not None else max(max_model_len -
                                                                                 len(prompt_token_ids), 1)
        seed = params.seed if params.seed is not None else self.rng.getrandbits(63)
        grammars = self._grammar_states(params)
        seqs = []
        for index in range(params.n):
            seqs.append(Sequence(
                seq_id=self.next_seq_id + index, request_id=request_id, index=index,
                prompt_token_ids=prompt_token_ids, sampling_params=params,
                seed=seed if index == 0 else hash((seed, index)), max_tokens=max_tokens,
                arrival_time=arrival_time, prompt=prompt_text,
                detokenizer=None if self.config.skip_tokenizer_init or not detokenize else
                IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
                grammar=grammars[index],
            ))
        self.scheduler.check_fits(seqs[0])
        self.next_seq_id += params.n
        return seqs

    def _grammar_states(self, params: SamplingParams) -> list[GrammarState | None]:
        """One grammar matcher per sample of a structured-outputs request (compiled now, off the step
        loop, and cached by constraint); Nones otherwise. Also checks logit_bias."""
        vocab_size = self.model_config.vocab_size
        if params.logit_bias and max(params.logit_bias) >= vocab_size:
            raise ValueError(f"logit_bias names token {max(params.logit_bias)}, outside the vocabulary "
                             f"[0, {vocab_size})")
        if params.structured_outputs is None:
            return [None] * params.n
        if self.grammar_compiler is None:
            self.grammar_compiler = GrammarCompiler(self.tokenizer, vocab_size, self.eos_token_ids)
            self.runner.grammar_masks_for(self.grammar_compiler)   # its process starts now, before any step
        return [self.grammar_compiler.new_state(params.structured_outputs) for _ in range(params.n)]

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty; send at least one character")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("the prompt is empty; send at least one token id")
        vocab_size = self.model_config.vocab_size
        for token_id in prompt:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
                raise ValueError(f"prompt token id {token_id!r} is not in the vocabulary [0, {vocab_size})")
        return None, list(prompt)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks; its final output (finish_reason "abort")
        comes with the next step. Unknown or finished ids are ignored."""
        seqs = self.requests.get(request_id)
        if seqs is None:
            return
        for seq in seqs:
            self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
        self.pending_outputs.append(self._finish_request(request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self.pending_outputs)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def get_num_waiting(self) -> int:
        """Sequences queued to run (new, preempted, or samples waiting for their prompt); cheap, unlike get_stats."""
        return len(self.scheduler.waiting) + self.scheduler.num_held()

    # ---- the step ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; outputs of the requests that made progress (or ended) in it, or, with async
        scheduling, in the step before it."""
        outputs, deltas = self.step_with_deltas()
        return outputs + deltas.outputs() if deltas else outputs

    def step_with_deltas(self) -> tuple[list[RequestOutput], StepDeltas]:
        """`step`, with the intermediate outputs of delta streams left as columns (outputs.py): what the
        server's engine core sends on, without an object per request per step."""
        outputs, self.pending_outputs = self.pending_outputs, []
        deltas = StepDeltas()
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None and in_flight.needs_tokens_first:
            self._complete(in_flight, outputs, deltas)
            in_flight = None
        t_start = time.perf_counter()
        batch = self.scheduler.schedule()
        launched = None
        if not batch.is_empty:
            t_scheduled = time.perf_counter()
            try:
                samples = self.runner.launch(batch)
            except Exception as error:
                outputs += self._fail_launch(batch, error)
            else:
                self.scheduler.advance(batch)
                needs_tokens_first = any(seq.reads_own_tokens for seq in batch.sampling_seqs)
                launched = LaunchedStep(batch, samples, needs_tokens_first, t_start, t_scheduled)
        if in_flight is not None:
            self._complete(in_flight, outputs, deltas)
        if launched is not None:
            if self.config.async_scheduling:
                self.in_flight = launched
            else:
                self._complete(launched, outputs, deltas)
        return outputs, deltas

    def _complete(self, launched: LaunchedStep, outputs: list[RequestOutput], deltas: StepDeltas) -> None:
        """Wait for a launched step's tokens and apply them. The requests it moved report to `outputs`,
        or, unfinished delta streams, to `deltas`."""
        batch = launched.batch
        try:
            sampled = launched.samples.result() if launched.samples is not None else SamplerOutput.empty()
        except Exception as error:
            logger.exception("a step failed; its requests end with finish_reason 'error'")
            outputs += self._fail_batch(batch, error)
            return
        t_run = time.perf_counter()
        finished = self.scheduler.complete(batch, sampled)
        self.num_steps += 1
        self.generation_tokens_total += len(sampled.token_ids)
        self.prefill_tokens_total += batch.num_prefill_tokens
        self.decode_tokens_total += batch.num_decode_tokens

        # Requests that may have ended, and, if any request streams, every request that moved.
        moved = batch.sampling_seqs if len(self.final_only) < len(self.requests) else finished
        ended = {seq.request_id for seq in finished}
        finished_ids: list[str] = []
        reported: set[str] = set()   # requests of several samples already seen in this step
        for seq in moved:
            request_id = seq.request_id
            seqs = self.requests.get(request_id)
            if seqs is None:   # aborted, or ended by the step before (async) or by a sample before this one
                continue
            if len(seqs) > 1:
                if request_id in reported:
                    continue
                reported.add(request_id)
            if request_id in ended and all(sample.is_finished for sample in seqs):
                finished_ids.append(request_id)
                outputs.append(self._finish_request(request_id))
            elif request_id in self.delta_only and not _owes_prompt_logprobs(seqs[0]):
                for sample in seqs:
                    token_ids, text, logprobs = _take_new(sample)
                    deltas.add(request_id, token_ids, text, sample.cumulative_logprob, logprobs)
            elif request_id not in self.final_only:
                outputs.append(self._make_output(request_id, seqs))
        if self.step_observers:
            self._notify(batch, finished_ids, launched.t_start, launched.t_scheduled, t_run)

    def _fail_launch(self, batch: Batch, error: Exception) -> list[RequestOutput]:
        """A step failed before it was launched. When some requests' own sampling rows cannot be built
        (the rest's can), the fault is theirs: they end alone with their error, and the others are
        scheduled again next step (nothing of this step was applied to them). Otherwise every request
        of the batch ends with the step's error. A dead grammar process is the fault of the requests
        with structured outputs: they end, and the others run on. The rows are built without grammar
        masks: a constrained row's masks may wait on the last step's sampling, not queued yet."""
        faults: dict[str, Exception] = {}
        for request_id in dict.fromkeys(seq.request_id for seq in batch.sampling_seqs):
            seqs = [seq for seq in batch.sampling_seqs if seq.request_id == request_id]
            if isinstance(error, GrammarProcessError) and any(seq.grammar is not None for seq in seqs):
                faults[request_id] = error
                continue
            try:
                self.runner.prepare_sampling(Batch(sampling_seqs=seqs), with_grammar=False)
            except Exception as fault:
                faults[request_id] = fault
        if not faults or len(faults) == len({seq.request_id for seq, _ in batch.scheduled}):
            logger.exception("a step failed; its requests end with finish_reason 'error'")
            return self._fail_batch(batch, error)
        logger.error("a step failed on the sampling parameters of request(s) %s; they end with an error, "
                     "the others run next step", sorted(faults), exc_info=error)
        outputs = []
        for request_id, fault in faults.items():
            if request_id in self.requests:
                for seq in self.requests[request_id]:
                    self.scheduler.finish(seq, SequenceStatus.FINISHED_ERROR)
                    seq.error = f"{type(fault).__name__}: {fault}"
                    seq.error_in_request = not isinstance(fault, GrammarProcessError)   # that one is ours
                outputs.append(self._finish_request(request_id))
        return outputs

    def _fail_batch(self, batch: Batch, error: Exception) -> list[RequestOutput]:
        message = f"{type(error).__name__}: {error}"
        outputs = []
        for request_id in dict.fromkeys(seq.request_id for seq, _ in batch.scheduled):
            if request_id not in self.requests:   # aborted while the step ran
                continue
            for seq in self.requests[request_id]:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ERROR)
                seq.error = message
            outputs.append(self._finish_request(request_id))
        return outputs

    def _finish_request(self, request_id: str) -> RequestOutput:
        output = self._make_output(request_id, self.requests.pop(request_id))
        self.final_only.discard(request_id)
        self.delta_only.discard(request_id)
        self.num_requests_finished += 1
        return output

    def _make_output(self, request_id: str, seqs: list[Sequence]) -> RequestOutput:
        first = seqs[0]
        token_times = [seq.token_times[-1] for seq in seqs if seq.token_times]
        finish_times = [seq.finish_time for seq in seqs if seq.finish_time is not None]
        finished = all(seq.is_finished for seq in seqs)
        delta = request_id in self.delta_only
        return RequestOutput(
            request_id=request_id,
            prompt=first.prompt if finished or not delta else None,
            prompt_token_ids=first.prompt_token_ids if finished or not delta else [],
            outputs=[_delta_completion(seq) if delta else _whole_completion(seq) for seq in seqs],
            finished=finished,
            metrics=RequestMetrics(
                arrival_time=first.arrival_time,
                first_scheduled_time=min((s.first_scheduled_time for s in seqs
                                          if s.first_scheduled_time is not None), default=None),
                first_token_time=min((s.first_token_time for s in seqs if s.first_token_time is not None),
                                     default=None),
                last_token_time=max(token_times, default=None),
                finish_time=max(finish_times) if finished else None,
                token_times=list(first.token_times) if finished or not delta else [],
            ),
            num_cached_tokens=first.num_cached_tokens,
            prompt_logprobs=_prompt_logprobs(first, delta),
            error=next((seq.error for seq in seqs if seq.error is not None), None),
            error_in_request=any(seq.error_in_request for seq in seqs),
        )

    # ---- observation ---------------------------------------------------------------------

    def add_step_observer(self, observer: Callable[[StepInfo], None]) -> None:
        """Call `observer(StepInfo)` after every step that ran something."""
        self.step_observers.append(observer)

    def remove_step_observer(self, observer: Callable[[StepInfo], None]) -> None:
        self.step_observers.remove(observer)

    def _notify(self, batch: Batch, finished_ids: list[str], t_start: float, t_scheduled: float,
                t_run: float) -> None:
        info = StepInfo(
            step=self.num_steps - 1,
            scheduled=[ScheduledChunk(seq.request_id, seq.seq_id, num_new, is_prefill)
                       for (seq, num_new), is_prefill in zip(batch.scheduled, batch.is_prefill)],
            preempted=[seq.request_id for seq in batch.preempted],
            finished=finished_ids,
            num_prefill_tokens=batch.num_prefill_tokens,
            num_decode_tokens=batch.num_decode_tokens,
            kv_usage=self.scheduler.block_manager.usage(),
            schedule_time=t_scheduled - t_start,
            run_time=t_run - t_scheduled,
            postprocess_time=time.perf_counter() - t_run,
        )
        for observer in self.step_observers:
            try:
                observer(info)
            except Exception:
                logger.exception("a step observer failed; the engine goes on")

    def get_stats(self) -> EngineStats:
        scheduler = self.scheduler
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=self.get_num_waiting(),
            num_preemptions=scheduler.num_preemptions,
            kv_usage=scheduler.block_manager.usage(),
            num_steps=self.num_steps,
            num_requests_finished=self.num_requests_finished,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            prefill_tokens_total=self.prefill_tokens_total,
            decode_tokens_total=self.decode_tokens_total,
        )


def load_tokenizer(config: EngineConfig, model_config: ModelConfig) -> Tokenizer:
    """The model's tokenizer, or a token-id-only stand-in (TokenIdTokenizer: text prompts are refused)
    with skip_tokenizer_init or for a model that brings none: dummy weights of a built-in shape, or a
    HF directory without tokenizer files (then with a warning)."""
    def ids_only() -> Tokenizer:
        return TokenIdTokenizer(model_config.vocab_size, model_config.eos_token_ids, model_config.bos_token_id)

    if config.skip_tokenizer_init:
        return ids_only()
    if config.tokenizer is None and config.model is not None:
        path = Path(config.model)
        builtin_shape = config.load_format == "dummy" and not path.exists()
        if builtin_shape or (path.is_dir() and not (path / "tokenizer.json").is_file()):
            if not builtin_shape:
                logger.warning("%s has no tokenizer.json: prompts must be token ids, outputs are decoded as "
                               "<id>; pass tokenizer=PATH for text", config.model)
            return ids_only()
    return Tokenizer.load(config.model, config.tokenizer)


def _owes_prompt_logprobs(seq: Sequence) -> bool:
    """A delta stream whose prompt log-probabilities have not gone out yet: its next output is a whole
    RequestOutput (they ride with its first token), not a row of StepDeltas."""
    return seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent


def _prompt_logprobs(seq: Sequence, delta: bool) -> list[dict[int, float] | None] | None:
    """The prompt's log-probabilities so far; a delta stream gets them once, in the first output after
    they are all known (the one with the first token, so that a server can send the echoed prompt
    with them before the completion), or in the final output if the request ends before that."""
    if seq.prompt_logprobs is None:
        return None
    if delta:
        if seq.prompt_logprobs_sent or (seq.needs_prompt_logprobs and not seq.is_finished):
            return None
        seq.prompt_logprobs_sent = True
    return list(seq.prompt_logprobs)


def _whole_completion(seq: Sequence) -> CompletionOutput:
    """Everything the sample has so far (copies its history: O(length) a call)."""
    return CompletionOutput(
        index=seq.index,
        text=seq.output_text[:_visible_length(seq)],
        token_ids=seq.known_output_token_ids,
        cumulative_logprob=seq.cumulative_logprob,
        logprobs=None if seq.logprobs is None else list(seq.logprobs),
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
    )


def _delta_completion(seq: Sequence) -> CompletionOutput:
    """What the sample gained since its previous delta (O(new) a call); marks it as sent."""
    token_ids, text, logprobs = _take_new(seq)
    return CompletionOutput(index=seq.index, text=text, token_ids=token_ids, cumulative_logprob=seq.cumulative_logprob,
                            logprobs=logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)


def _take_new(seq: Sequence) -> tuple[list[int], str, list[dict[int, float]] | None]:
    """The token ids, text and logprobs the sample gained since its previous delta; marks them as sent."""
    num_known = len(seq.output_token_ids) - seq.num_pending
    visible_length = _visible_length(seq)
    new = (seq.output_token_ids[seq.num_sent_tokens:num_known], seq.output_text[seq.num_sent_chars:visible_length],
           None if seq.logprobs is None else seq.logprobs[seq.num_sent_tokens:num_known])
    seq.num_sent_tokens, seq.num_sent_chars = num_known, visible_length
    return new


def _visible_length(seq: Sequence) -> int:
    """How much of the output text may be shown: all but a tail that could still begin a stop string."""
    stops = seq.sampling_params.stop
    if not stops or seq.is_finished:
        return len(seq.output_text)
    hold = max(len(stop) for stop in stops) - 1
    return max(len(seq.output_text) - hold, 0)

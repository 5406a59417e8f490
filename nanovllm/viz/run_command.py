"""`nano-vllm run`: generate text and watch the engine work.

    nano-vllm run                                   chat with the embedded SmolLM2-135M-Instruct (in a terminal)
    nano-vllm run -i "The capital of France is"     stream a completion, then a summary line
    nano-vllm run -i "Hi" -i "Tell me a joke" --chat   several prompts: one continuously batched workload
    nano-vllm run --demo                            staggered arrivals, chunked prefill, prefix caching, live
    nano-vllm run --demo --viz plain --kv both --report demo.html

Text goes to stdout as it is generated (with `[ReqN]` tags when several
requests interleave); the visualizer, when on, draws its panels instead and
the texts follow at the end. The summary line (tokens, time, prefill and
decode rates, peak KV usage, prefix-cache hit rate) goes to stderr, so
stdout holds only text. `--viz auto` is live in a terminal and off elsewhere
(plain for `--demo`, whose point is the pictures).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import itertools
import sys
import time
from typing import TextIO

from rich import box
from rich.console import Console
from rich.panel import Panel

from nanovllm.cli import UserError
from nanovllm.engine.engine import LLMEngine
from nanovllm.engine_args import add_engine_args, engine_config_from_args
from nanovllm.model.loader import EMBEDDED_MODEL, load_model_config
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.viz.demo import DEMO_ENGINE_ARGS, DEMO_TEMPERATURE, DEMO_VIZ_EVERY, demo_arrivals
from nanovllm.viz.live import LiveView
from nanovllm.viz.panels import timeline_grid
from nanovllm.viz.plain import PlainView, render_plain
from nanovllm.viz.report import write_report
from nanovllm.viz.workload import Arrival, RunResult, Visualizer, run_workload

VIZ_MODES = ("auto", "live", "plain", "off")
PROMPT_SHOWN = 60   # characters of a prompt shown above its final text
DEFAULT_TEMPERATURE = 0.7


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="HF directory, .gguf or llama2.c .bin (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("-n", "--max-tokens", type=int, default=64,
                        help="tokens to generate per prompt (the demo's requests have their own)")
    parser.add_argument("-i", "--prompt", dest="prompts", action="append", default=[],
                        help="a prompt; repeat for several (run as one continuously batched workload)")
    parser.add_argument("--chat", action="store_true",
                        help="apply the model's chat template (without -i in a terminal: an interactive chat)")
    parser.add_argument("-t", "--temperature", type=float, default=None,
                        help=f"0 = greedy (default {DEFAULT_TEMPERATURE}; greedy for --demo)")
    parser.add_argument("-p", "--top-p", type=float, default=0.95)
    parser.add_argument("--demo", action="store_true",
                        help="replay a scenario: staggered arrivals, a long prompt prefilled in chunks")
    parser.add_argument("--kv", choices=("paged", "naive", "both"), default="paged",
                        help="KV allocation policy; both = run paged, then naive, and compare")
    parser.add_argument("--chunk-size", "--max-num-batched-tokens", dest="max_num_batched_tokens", type=int,
                        default=None, help="token budget of a step: prefill chunks + decodes")
    parser.add_argument("--viz", choices=VIZ_MODES, default="auto",
                        help="live (redrawn in a terminal), plain (ASCII frames), off; auto = live in a terminal")
    parser.add_argument("--viz-every", type=int, default=None, metavar="N",
                        help="plain mode: a frame every N steps (default 1, 4 for --demo)")
    parser.add_argument("--viz-layer", type=int, default=None, metavar="L",
                        help="layer whose attention is shown (default: the middle one)")
    parser.add_argument("--report", metavar="FILE.html", default=None,
                        help="write an HTML report with pictures (needs matplotlib)")
    add_engine_args(parser, skip=("model", "kv_policy", "max_num_batched_tokens"))


def main(args: argparse.Namespace) -> int:
    if args.demo and args.prompts:
        raise UserError("--demo runs its own requests; leave out -i")
    if args.viz_every is not None and args.viz_every < 1:
        raise UserError(f"--viz-every must be a positive number of steps, got {args.viz_every}")
    if args.viz_layer is not None and args.viz_layer < 0:
        raise UserError(f"--viz-layer must be 0 or more, got {args.viz_layer}")
    interactive = not args.prompts and not args.demo and sys.stdin.isatty()
    if interactive and args.kv == "both":
        raise UserError("--kv both compares two runs of the same prompts; give them with -i (or use --demo)")
    if args.report:
        _check_report_deps()
    prompts = args.prompts or ([] if interactive or args.demo else [_read_stdin_prompt()])
    viz = _viz_mode(args, interactive)
    temperature = args.temperature
    if temperature is None:
        temperature = DEMO_TEMPERATURE if args.demo else DEFAULT_TEMPERATURE
    params = SamplingParams(temperature=temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    policies = ["paged", "naive"] if args.kv == "both" else [args.kv]
    capture = viz != "off" or bool(args.report)

    overrides: dict = {"model": args.model, "kv_policy": policies[0]}
    if args.demo:
        overrides.update({k: v for k, v in DEMO_ENGINE_ARGS.items() if getattr(args, k) is None})
    if capture:
        overrides["enforce_eager"] = True   # the attention hooks must see every step (no CUDA-graph replay)
    config = engine_config_from_args(args, **overrides)
    layer = _check_viz_layer(args, config)

    engine = _load_engine(config)
    layer = engine.model_config.num_hidden_layers // 2 if layer is None else layer
    if interactive:
        return _interactive_chat(engine, args, params, viz, layer)

    if args.demo:
        arrivals = demo_arrivals(engine.tokenizer, params)
    else:
        arrivals = [_arrival(engine, i, prompt, params, args.chat) for i, prompt in enumerate(prompts)]
    results = []
    for policy in policies:
        if policy != engine.config.kv_policy:
            model, tokenizer = engine.runner.model, engine.tokenizer
            engine = None
            gc.collect()   # free the first engine's KV pool before the second is made
            engine = LLMEngine(dataclasses.replace(config, kv_policy=policy), model=model, tokenizer=tokenizer)
        result = _run(engine, arrivals, args, viz, layer, capture, show_prompt=not args.chat and not args.demo,
                      label=policy if len(policies) > 1 else "")
        results.append(result)
    if args.report:
        write_report(args.report, results, title=_title(args, engine))
        print(f"report written to {args.report}", file=sys.stderr)
    return 0


# ---- setup -----------------------------------------------------------------------------------

def _check_report_deps() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("--report draws its pictures with matplotlib, which is not installed; "
                        "pip install 'nano-vllm[report]'")


def _read_stdin_prompt() -> str:
    text = sys.stdin.read().strip()
    if not text:
        raise UserError("no prompt: pass -i PROMPT (or pipe one on stdin), or run in a terminal for a chat")
    return text


def _viz_mode(args: argparse.Namespace, interactive: bool) -> str:
    if args.viz != "auto":
        return args.viz
    if interactive:
        return "off"
    if sys.stdout.isatty():
        return "live"
    return "plain" if args.demo else "off"


def _check_viz_layer(args: argparse.Namespace, config) -> int | None:
    """Check --viz-layer against the model's depth before the weights are loaded."""
    if args.viz_layer is None:
        return None
    num_layers = load_model_config(config.model, config.load_format).num_hidden_layers
    if args.viz_layer >= num_layers:
        raise UserError(f"--viz-layer {args.viz_layer} is out of range: the model has {num_layers} layers "
                        f"(0 to {num_layers - 1})")
    return args.viz_layer


def _load_engine(config) -> LLMEngine:
    name = config.model or EMBEDDED_MODEL
    print(f"loading {name} on {config.device} ({config.dtype}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    engine = LLMEngine(config)
    c = engine.config
    print(f"loaded in {time.perf_counter() - start:.1f} s: {engine.model_config.num_hidden_layers} layers, "
          f"KV pool {engine.runner.num_blocks} blocks x {c.block_size} tokens "
          f"= {engine.runner.num_blocks * c.block_size} tokens of {c.kv_cache_dtype_name}, step budget "
          f"{c.max_num_batched_tokens} tokens, max_model_len {c.max_model_len}", file=sys.stderr, flush=True)
    return engine


def _arrival(engine: LLMEngine, index: int, prompt: str, params: SamplingParams, chat: bool) -> Arrival:
    if chat:
        token_ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return Arrival(0, f"Req{index}", token_ids, params, prompt_text=prompt)
    return Arrival(0, f"Req{index}", prompt, params, prompt_text=prompt)


def _title(args: argparse.Namespace, engine: LLMEngine) -> str:
    what = "demo" if args.demo else f"{len(args.prompts)} prompt{'s' if len(args.prompts) != 1 else ''}"
    return f"nano-vllm run: {args.model or EMBEDDED_MODEL}, {what}, {engine.config.device}"


# ---- running ---------------------------------------------------------------------------------

def _run(engine: LLMEngine, arrivals: list[Arrival], args: argparse.Namespace, viz: str, layer: int,
         capture: bool, show_prompt: bool, label: str = "") -> RunResult:
    visualizer = None
    if capture:
        visualizer = Visualizer(engine, _make_view(viz, args), layer, capture_all_layers=bool(args.report))
    streaming = viz == "off"
    printer = StreamPrinter(sys.stdout, arrivals, show_prompt) if streaming else None
    if label:
        print(f"--- kv policy: {label} ---", file=sys.stderr, flush=True)
    result = run_workload(engine, arrivals, printer or (lambda output: None), visualizer)
    if printer is not None:
        printer.close()
    if not streaming or len(arrivals) > 1:
        print_final_texts(sys.stdout, result)
    if visualizer is not None and visualizer.view is not None:
        _print_timeline(result, viz)
    print((f"{label}: " if label else "") + result.summary_line(), file=sys.stderr, flush=True)
    return result


def _make_view(viz: str, args: argparse.Namespace) -> LiveView | PlainView | None:
    if viz == "live":
        return LiveView()
    if viz == "plain":
        return PlainView(args.viz_every or (DEMO_VIZ_EVERY if args.demo else 1))
    return None


def _print_timeline(result: RunResult, viz: str) -> None:
    grid = timeline_grid(result.recorder.history, result.recorder.request_ids)
    if viz == "live":
        Console().print(Panel(grid, title="timeline", title_align="left"))
        return
    sys.stdout.write(render_plain(Panel(grid, title="timeline", title_align="left", box=box.ASCII)))
    sys.stdout.flush()


class StreamPrinter:
    """Writes each request's new text as it is generated.

    One request: its text, bare (after the prompt, for a completion). Several:
    a `[ReqN] ` tag on a new line whenever the text comes from another request
    than the last piece, so the interleaving of continuous batching shows.
    """

    def __init__(self, out: TextIO, arrivals: list[Arrival], show_prompt: bool):
        self.out = out
        self.tagged = len(arrivals) > 1
        self.prompt = arrivals[0].prompt_text if show_prompt and not self.tagged else ""
        self.printed: dict[str, int] = {}       # request id -> characters written
        self.last_request: str | None = None
        self.wrote = False

    def __call__(self, output: RequestOutput) -> None:
        text = output.outputs[0].text
        done = self.printed.get(output.request_id, 0)
        if self.prompt:   # written with the first output: a prompt the engine refuses is not echoed
            self._write(self.prompt)
            self.prompt = ""
        if len(text) > done:
            if self.tagged and output.request_id != self.last_request:
                self._write(("\n" if self.last_request is not None else "") + f"[{output.request_id}] ")
            self._write(text[done:])
            self.printed[output.request_id] = len(text)
            self.last_request = output.request_id
        self.out.flush()

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.wrote = True

    def close(self) -> None:
        if self.wrote:
            self.out.write("\n")
            self.out.flush()


def print_final_texts(out: TextIO, result: RunResult) -> None:
    for request_id, output in result.outputs.items():
        completion = output.outputs[0]
        prompt = result.prompts[request_id]
        prompt = prompt if len(prompt) <= PROMPT_SHOWN else prompt[:PROMPT_SHOWN - 3] + "..."
        out.write(f"--- {request_id} ({completion.finish_reason}, {len(completion.token_ids)} tokens): "
                  f"{prompt!r}\n{completion.text}\n")
    out.flush()


# ---- interactive chat ------------------------------------------------------------------------

def _interactive_chat(engine: LLMEngine, args: argparse.Namespace, params: SamplingParams, viz: str,
                      layer: int) -> int:
    tokenizer = engine.tokenizer
    chat = tokenizer.has_chat_template
    print(f"{'chat' if chat else 'completion'} mode: type a message, an empty line or Ctrl-D to quit",
          file=sys.stderr, flush=True)
    conversation: list[dict[str, str]] = []
    result = None
    for turn in itertools.count():
        try:
            line = input(">>> ")
        except EOFError:
            break
        if not line.strip():
            break
        conversation.append({"role": "user", "content": line})
        prompt = tokenizer.apply_chat_template(conversation) if chat else line
        arrival = Arrival(0, f"Req{turn}", prompt, params, prompt_text=line)
        try:
            result = _run(engine, [arrival], args, viz, layer, viz != "off" or bool(args.report), show_prompt=False)
        except ValueError as error:   # e.g. the conversation outgrew max_model_len
            print(f"nano-vllm run: error: {error}", file=sys.stderr, flush=True)
            conversation.pop()
            continue
        reply = result.outputs[arrival.request_id].outputs[0].text
        conversation.append({"role": "assistant", "content": reply})
    print(file=sys.stderr)
    if args.report and result is not None:
        write_report(args.report, [result], title=_title(args, engine) + " (last turn)")
        print(f"report written to {args.report}", file=sys.stderr)
    return 0

"""`nano-vllm bench throughput|latency|serve|cpu|report`: a measured figure beside its limit and a peer's.

    nano-vllm bench throughput --dummy qwen3-0.6b --peer hf          bench.py's workload on a GPU
    nano-vllm bench latency MODEL                                    TTFT and decode tok/s of one request
    nano-vllm bench serve --launch --request-rate 1,4,inf           Poisson arrivals against the server
    nano-vllm bench cpu --peer hf,llama.cpp                          the 2-core CPU workload (embedded model)
    nano-vllm bench report                                           the results tables, from benchmarks/results/

Every run measures the machine (copy bandwidth, matmul FLOP/s) in this process
before and after the runs, runs the peers and nano-vllm, computes the roofline
of the exact workload (roofline.py) and prints one table; `--save` keeps every number as one
JSON file in benchmarks/results/ (`--save-dir DIR` elsewhere, `--json FILE` as FILE), whose
fields docs/benchmarks.md describes. `report` regenerates benchmarks/README.md and the README's
performance table from those files (`--check`: only say whether they are current).
Each result is printed with the load average beside it, and `bench cpu` also splits a
decode step at batch 1 and 16 into the model's time and the host overhead around it
(step_overhead.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from nanovllm.bench import report
from nanovllm.bench.harness import make_engine
from nanovllm.bench.latency import DEFAULT_NUM_RUNS, LatencyResult, run_latency
from nanovllm.bench.step_overhead import StepOverhead, load_average_text, measure_step_overhead
from nanovllm.bench.peers import PEERS, PeerSettings, PeerUnavailable, make_peer
from nanovllm.bench.roofline import (WEIGHT_FORMAT_BYTES, Ceilings, ModelCost, Roofline, matmul_dtype,
                                     measure_ceilings, workload_roofline)
from nanovllm.bench.serve import (
    DEFAULT_URL, LocalServer, measure_client_ceiling, parse_rates, run_serve_processes, served_model_name,
)
from nanovllm.bench.throughput import ThroughputResult, run_throughput
from nanovllm.bench.workloads import (DATASETS, Workload, cpu_batch_workload, dataset_workload,
                                      latency_workload)
from nanovllm.config import EngineConfig
from nanovllm.engine_args import add_engine_args, engine_config_from_args

KINDS = ("throughput", "latency", "serve", "cpu", "report")
DEFAULT_PEERS = {"throughput": "none", "latency": "none", "serve": "none", "cpu": "hf,llama.cpp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="the workload (see docs/benchmarks.md), or report")
    parser.add_argument("model", nargs="?", default=None,
                        help="HF directory, .gguf or llama2.c .bin (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dummy", metavar="NAME",
                        help="random weights of a built-in config (qwen3-0.6b, llama-3.2-1b, llama-3.1-8b) "
                             "or of a config.json / directory holding one")
    workload = parser.add_argument_group("workload")
    workload.add_argument("--dataset", choices=DATASETS,
                          help="throughput/serve requests (default: throughput, or random with --input-len)")
    workload.add_argument("--num-prompts", type=int, help="requests (default 256)")
    workload.add_argument("--input-len", type=int, help="prompt tokens of each request (random dataset, latency)")
    workload.add_argument("--output-len", type=int, help="output tokens of each request")
    workload.add_argument("--num-runs", type=int, default=DEFAULT_NUM_RUNS, help="timed latency runs (median)")
    workload.add_argument("--structured-output-ratio", type=float, default=0.0, metavar="R",
                          help="throughput: the share of requests under a JSON schema (0.5: every second)")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--peer", help=f"comma-separated peers to run too: {', '.join(PEERS)} or none "
                                      f"(default: none; hf,llama.cpp for cpu)")
    bench.add_argument("--ceiling-repeats", type=int, default=None,
                       help="timed runs of each ceiling probe, best kept (default: 10 on cuda, 30 on cpu)")
    bench.add_argument("--threads", type=int, help="torch (and llama.cpp) CPU threads (default: torch's)")
    bench.add_argument("--json", metavar="FILE", help="write every number, the machine and versions as JSON")
    bench.add_argument("--save", action="store_true",
                       help=f"keep the run as {report.RESULTS_DIR}/<date>-<card>-<kind>-<model>.json")
    bench.add_argument("--save-dir", metavar="DIR", help="keep the run as DIR/<date>-<card>-<kind>-<model>.json")
    bench.add_argument("--note", action="append", default=[], help="a line for the saved result (repeatable)")
    bench.add_argument("--check", action="store_true",
                       help="with report: change nothing, exit 1 if a generated table is out of date")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    serve = parser.add_argument_group("serve")
    serve.add_argument("--url", default=None, help=f"the server (default {DEFAULT_URL}, or the launched one)")
    serve.add_argument("--launch", action="store_true", help="start `nano-vllm serve` with this model first")
    serve.add_argument("--port", type=int, default=8000, help="port of the launched server")
    serve.add_argument("--api-server-count", type=int, default=1,
                       help="HTTP processes of the launched server (its --api-server-count)")
    serve.add_argument("--request-rate", default="inf",
                       help="Poisson arrival rates in requests/s, comma-separated; inf sends all at once")
    serve.add_argument("--client-processes", type=int, default=1,
                       help="spread the client over this many processes (when one cannot keep up)")
    serve.add_argument("--no-client-ceiling", action="store_true",
                       help="skip measuring the client's own ceiling against a stub server")
    add_engine_args(parser)


def main(args: argparse.Namespace) -> int:
    if args.kind == "report":
        return report_main(args.check)
    if not 0.0 <= args.structured_output_ratio <= 1.0 or (args.structured_output_ratio and args.kind != "throughput"):
        raise ValueError("--structured-output-ratio is a share from 0 to 1, for the throughput benchmark, got "
                         f"{args.structured_output_ratio} for {args.kind}")
    if args.ceiling_repeats is not None and args.ceiling_repeats < 1:
        raise ValueError(f"--ceiling-repeats must be at least 1, got {args.ceiling_repeats}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.kind == "cpu" and args.device == "auto":
        args.device = "cpu"
    model, load_format = (args.dummy, "dummy") if args.dummy else (args.model, args.load_format)
    if args.dummy and args.model:
        raise ValueError("give a MODEL or --dummy NAME, not both")
    config = engine_config_from_args(args, model=model, load_format=load_format)
    bench = Bench(args, config)
    result = bench.run()
    print()
    print(result["table"])
    write_outputs(args, result)
    return 0


class Bench:
    """One benchmark run: ceilings, rooflines, peers, nano-vllm, figures."""

    def __init__(self, args: argparse.Namespace, config: EngineConfig):
        from nanovllm.config import GGUF_CHOICES
        from nanovllm.model.loader import keeps_gguf_blocks, load_model_config, resolve_model
        from nanovllm.model.quantization import quantization_method

        self.args = args
        self.config = config
        self.progress = not args.no_progress
        self.model_config = load_model_config(config.model, config.load_format)
        online = None if config.quantization in GGUF_CHOICES else config.quantization
        quantized = quantization_method(None if config.load_format == "dummy" else self.model_config.quantization_config,
                                        online)
        linear_bytes = None if quantized is None else quantized.bytes_per_weight
        if config.load_format != "dummy" and keeps_gguf_blocks(config.model, config.load_format, config.quantization,
                                                               config.device):
            from nanovllm.model.quantization.gguf import gguf_bytes_per_weight
            linear_bytes = gguf_bytes_per_weight(resolve_model(config.model))   # as loaded, not as in the file
        self.cost = ModelCost.from_config(self.model_config, torch.tensor([], dtype=config.torch_dtype).element_size(),
                                          WEIGHT_FORMAT_BYTES.get(config.dtype), linear_bytes,
                                          quantized.lm_head_method().bytes_per_weight
                                          if quantized and quantized.lm_head_method() else None,
                                          config.kv_cache_torch_dtype.itemsize
                                          if config.kv_cache_torch_dtype != config.torch_dtype else None)
        self.peers = _parse_peers(args.peer if args.peer is not None else DEFAULT_PEERS[args.kind])
        self.notes: list[str] = list(args.note)
        self.ceilings: Ceilings | None = None     # the best of the measurements before and after the runs
        self.ceiling_measurements: dict[str, dict] = {}
        self.step_overheads: list[StepOverhead] = []   # bench cpu: decode steps split into model and host
        self.kv_pool: dict | None = None              # the engine's KV pool (dtype, blocks, tokens); None for serve

    def run(self) -> dict:
        self.load_average_at_start = os.getloadavg()[0]   # other work on the machine skews every figure
        workloads = self.workloads()
        threads = torch.get_num_threads()
        before = self.measure_ceilings("before the runs")
        if self.args.kind == "serve":
            measured, peer_results, peer_info = self.serve(workloads), {}, {}
        else:
            peer_results, peer_info = self.run_peers(workloads)
            measured = self.run_nanovllm(workloads)
        torch.set_num_threads(threads)   # the fused CPU forward (model/llama_numba.py) leaves torch one thread
        after = self.measure_ceilings("after the runs")
        self.ceiling_measurements = {"before": before.as_dict(), "after": after.as_dict()}
        # Tensor parallel on N cards: the bound of the N cards together (ceilings are measured on one).
        # CPU ranks share one machine's memory and cores, so their bound stays the machine's.
        num_cards = self.config.tensor_parallel_size if self.config.device == "cuda" else 1
        self.ceilings = ceilings = before.best(after).over(num_cards)
        # A latency workload runs its requests one at a time: the bound is that of one request alone.
        rooflines = {name: workload_roofline(self.cost, ceilings, w.shape[:1] if name == "latency" else w.shape)
                     for name, w in workloads.items()}
        for name, roofline in rooflines.items():
            print(f"roofline of {name}: {roofline.time:.4g} s over {roofline.num_steps} steps "
                  f"({roofline.memory_bound_steps} memory-bound): {roofline.output_throughput:,.1f} output tok/s, "
                  f"first step {roofline.prefill_time * 1e3:.3g} ms, decode {roofline.decode_throughput:,.1f} tok/s",
                  file=sys.stderr)
        figures = self.figures(workloads, rooflines, measured, peer_results)
        return self.result(workloads, rooflines, measured, peer_results, peer_info, figures)

    def measure_ceilings(self, when: str) -> Ceilings:
        ceilings = measure_ceilings(self.config.device, matmul_dtype(self.config.dtype),
                                    repeats=self.args.ceiling_repeats)
        print(f"ceilings {when}: copy {ceilings.memory_bandwidth / 1e9:.1f} GB/s, {ceilings.dtype} matmul "
              f"{ceilings.peak_flops / 1e12:.3g} TFLOP/s on {ceilings.device_name} "
              f"({ceilings.num_threads} threads)", file=sys.stderr)
        return ceilings

    def workloads(self) -> dict[str, Workload]:
        args, vocab = self.args, self.model_config.vocab_size
        if args.kind == "latency":
            return {"latency": latency_workload(vocab, args.input_len or 128, args.output_len or 256,
                                                args.num_runs)}
        if args.kind == "cpu":
            return {"latency": latency_workload(vocab, num_runs=args.num_runs), "batch": cpu_batch_workload(vocab)}
        dataset = args.dataset or ("random" if args.input_len is not None else "throughput")
        workload = dataset_workload(dataset, args.num_prompts, args.input_len, args.output_len, vocab)
        workload.structured_output_ratio = args.structured_output_ratio
        return {workload.name: workload}

    # ---- runs -----------------------------------------------------------------------------

    def run_peers(self, workloads: dict[str, Workload]) -> tuple[dict[str, dict[str, object]], dict[str, dict]]:
        """Each peer on each workload, before nano-vllm (which then takes the GPU memory it sizes for)."""
        results: dict[str, dict[str, object]] = {}
        info: dict[str, dict] = {}
        settings = PeerSettings(self.config.model, self.config.load_format, self.config.device,
                                self.config.torch_dtype, torch.get_num_threads())
        max_context = max(p + o for w in workloads.values() for p, o in w.shape) + 8
        for peer_name in self.peers:
            results[peer_name] = {}
            try:
                peer = make_peer(peer_name, settings, max_context)
            except PeerUnavailable as error:
                self._skip(peer_name, "all workloads", error)
                info[peer_name] = {"peer": peer_name, "skipped": str(error)}
                continue
            except Exception as error:
                self._skip(peer_name, "all workloads", error)
                info[peer_name] = {"peer": peer_name, "failed": f"{type(error).__name__}: {error}"}
                continue
            info[peer_name] = peer.describe()
            for name, workload in workloads.items():
                try:
                    results[peer_name][name] = (
                        peer.latency(workload, self.progress) if name == "latency"
                        else peer.throughput(workload, self.progress))
                    print(f"{peer_name} {name}: {results[peer_name][name].summary()}; {load_average_text()}",
                          file=sys.stderr)
                except Exception as error:
                    self._skip(peer_name, name, error)
            del peer
            _release_memory()
        return results, info

    def _skip(self, peer: str, what: str, error: Exception) -> None:
        kind = "" if isinstance(error, PeerUnavailable) else f"{type(error).__name__}: "
        note = f"peer {peer} did not run ({what}): {kind}{error}"
        print(note, file=sys.stderr)
        self.notes.append(note)

    def run_nanovllm(self, workloads: dict[str, Workload]) -> dict[str, object]:
        engine = make_engine(self.config)
        block_size = engine.config.block_size
        self.kv_pool = {"dtype": engine.config.kv_cache_dtype_name, "num_blocks": engine.runner.num_blocks,
                        "block_size": block_size, "capacity_tokens": engine.runner.num_blocks * block_size}
        print(f"KV pool: {self.kv_pool['num_blocks']} blocks x {block_size} = {self.kv_pool['capacity_tokens']} "
              f"tokens of {self.kv_pool['dtype']}", file=sys.stderr)
        measured: dict[str, object] = {}
        for name, workload in workloads.items():
            if name == "latency":
                measured[name] = run_latency(engine, workload, self.progress)
            else:
                measured[name] = run_throughput(engine, workload, self.progress)
            print(f"{measured[name].summary()}; {load_average_text()}", file=sys.stderr)
        if self.args.kind == "cpu":
            for batch_size in (1, 16):
                overhead = measure_step_overhead(engine, batch_size)
                print(overhead.summary(), file=sys.stderr)
                self.step_overheads.append(overhead)
                self.notes.append(overhead.summary())
        engine.shutdown()   # tensor-parallel workers leave before the ceilings are measured again
        del engine
        _release_memory()
        return measured

    def serve(self, workloads: dict[str, Workload]) -> dict[str, object]:
        (workload,) = workloads.values()
        rates = parse_rates(self.args.request_rate)
        if self.args.launch:
            if self.args.url:
                raise ValueError("--launch starts its own server; leave out --url")
            serve_args = _serve_args(self.args, self.config) + ["--api-server-count", str(self.args.api_server_count)]
            with LocalServer(serve_args, self.args.port) as server:
                return self._serve_rates(server.url, workload, rates)
        return self._serve_rates((self.args.url or DEFAULT_URL).rstrip("/"), workload, rates)

    def _serve_rates(self, url: str, workload: Workload, rates: list[float]) -> dict[str, object]:
        model = served_model_name(url)
        processes = self.args.client_processes
        if processes < 1:
            raise ValueError(f"--client-processes must be at least 1, got {processes}")
        ceiling = None
        if not self.args.no_client_ceiling:
            ceiling = measure_client_ceiling(workload, processes, use_tqdm=self.progress)
            print(f"client ceiling ({processes} process(es), stub server): {ceiling:.0f} output tok/s",
                  file=sys.stderr)
        measured: dict[str, object] = {}
        for rate in rates:
            result = run_serve_processes(url, model, workload, rate, processes, use_tqdm=self.progress)
            result.client_ceiling = ceiling
            print(result.summary(), file=sys.stderr)
            measured[f"{workload.name}@{rate:g}"] = result
        return measured

    # ---- the result -----------------------------------------------------------------------

    def figures(self, workloads: dict[str, Workload], rooflines: dict[str, Roofline], measured: dict[str, object],
                peer_results: dict[str, dict[str, object]]) -> list[report.Figure]:
        device_name = self.ceilings.device_name
        figures = []
        for key, result in measured.items():
            name = key.split("@")[0]
            roofline = rooflines[name]
            peers = {peer: results.get(name) for peer, results in peer_results.items()}
            label = f"{self.args.kind}/{name}" if self.args.kind == "cpu" else key
            if isinstance(result, LatencyResult):
                figures.append(report.Figure(label, device_name, "decode tok/s", result.decode_tokens_per_second,
                                             roofline.decode_throughput,
                                             peers={p: r and r.decode_tokens_per_second for p, r in peers.items()}))
                figures.append(report.Figure(label, device_name, "TTFT ms", result.ttft * 1e3,
                                             roofline.prefill_time * 1e3, higher_is_better=False, headline=False,
                                             peers={p: r and r.ttft * 1e3 for p, r in peers.items()}))
            elif isinstance(result, ThroughputResult):
                figures.append(report.Figure(label, device_name, "output tok/s", result.output_tokens_per_second,
                                             roofline.output_throughput,
                                             peers={p: r and r.output_tokens_per_second for p, r in peers.items()}))
            else:   # a serve result: its output throughput against the all-at-once bound of its requests
                figures.append(report.Figure(label, device_name, "output tok/s",
                                             result.as_dict()["output_throughput"], roofline.output_throughput))
        for figure in figures:
            if figure.fraction > 1:
                note = (f"{figure.workload} {figure.name} beats its roofline ({figure.fraction:.2f}): a ceiling was "
                        "under-measured (a busy machine?)")
                print("warning: " + note, file=sys.stderr)
                self.notes.append(note)
        return figures

    def result(self, workloads: dict[str, Workload], rooflines: dict[str, Roofline], measured: dict[str, object],
               peer_results: dict[str, dict[str, object]], peer_info: dict[str, dict],
               figures: list[report.Figure]) -> dict:
        config = self.config
        return {
            "schema": report.SCHEMA,
            "kind": self.args.kind,
            "command": ("nano-vllm " + shlex.join(portable_arguments(sys.argv[1:])) if sys.argv[1:2] == ["bench"]
                        else f"nano-vllm bench {self.args.kind} (called from Python)"),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "card": report.card_name(config.device, self.ceilings.device_name, torch.get_num_threads()),
            "git_commit": report.git_commit(),
            "source_digest": report.source_digest(),
            "machine": {**report.machine_info(config.device),
                        "load_average_1min": {"start": self.load_average_at_start, "end": os.getloadavg()[0]}},
            "versions": report.versions(),
            "ceilings": self.ceilings.as_dict(),
            "ceiling_measurements": self.ceiling_measurements,
            "model": {"name": config.model or "SmolLM2-135M-Instruct (embedded)", "load_format": config.load_format,
                      "dtype": config.dtype, "params": self.cost.linear_params + self.cost.norm_params
                      + self.cost.lm_head_params * (1 if self.model_config.tie_word_embeddings else 2),
                      "config": dataclasses.asdict(self.model_config)},
            "engine_config": dataclasses.asdict(config),
            "kv_pool": self.kv_pool,
            "workloads": {name: {**w.describe(), "roofline": rooflines[name].as_dict()}
                          for name, w in workloads.items()},
            "nano_vllm": {name: r.as_dict() for name, r in measured.items()},
            "step_overhead": [overhead.as_dict() for overhead in self.step_overheads],
            "peers": peer_info,
            "peer_results": {peer: {name: r.as_dict() for name, r in results.items()}
                             for peer, results in peer_results.items()},
            "figures": [figure.as_dict() for figure in figures],
            "table": report.format_table(figures),
            "notes": self.notes,
        }


def write_outputs(args: argparse.Namespace, result: dict) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.save or args.save_dir:
        directory = Path(args.save_dir) if args.save_dir else report.repository_root() / report.RESULTS_DIR
        path = report.save_result(result, directory)
        print(f"saved {path}; `nano-vllm bench report` puts it in the tables", file=sys.stderr)


def report_main(check: bool) -> int:
    """`nano-vllm bench report [--check]`."""
    stale = report.write_report(check=check)
    for path in stale:
        print(f"{path.relative_to(report.repository_root())}: {'out of date' if check else 'regenerated'}")
    if check and stale:
        print("run `nano-vllm bench report` to regenerate them", file=sys.stderr)
        return 1
    if not stale:
        print("the tables are current")
    return 0


def _parse_peers(text: str) -> list[str]:
    peers = [part.strip() for part in text.split(",") if part.strip()]
    if peers == ["none"]:
        return []
    unknown = [peer for peer in peers if peer not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer {', '.join(unknown)}; --peer takes {', '.join(PEERS)} "
                         "(comma-separated) or none")
    return peers


def _serve_args(args: argparse.Namespace, config: EngineConfig) -> list[str]:
    """`nano-vllm serve` arguments for the same model and the engine flags that differ from their defaults."""
    serve_args = [config.model] if config.model else []
    for f in dataclasses.fields(EngineConfig):
        value = getattr(args, f.name, None) if f.name != "load_format" else config.load_format
        if f.name == "model" or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.default is True:
            serve_args.append("--no-" + f.name.replace("_", "-"))
        elif f.default is False:
            serve_args.append(flag)
        else:
            serve_args += [flag, str(value)]
    return serve_args


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def portable_arguments(argv: list[str]) -> list[str]:
    """The arguments as typed, with absolute paths made portable (results are committed; a machine's
    paths must not be): relative to the working directory when inside it, else `.../<name>`."""
    def portable(path: str) -> str:
        relative = os.path.relpath(path)
        return relative if not relative.startswith("..") else ".../" + os.path.basename(path.rstrip("/"))

    out = []
    for arg in argv:
        flag, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if os.path.isabs(value):
            arg = flag + equals + portable(value)
        out.append(arg)
    return out

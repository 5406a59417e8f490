"""`nano-vllm bench`: the workloads, the roofline checked by hand, the CLI on a tiny model, the serving client."""
from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from nanovllm.bench import report
from nanovllm.bench.roofline import Ceilings, ModelCost, lockstep_schedule, workload_roofline
from nanovllm.bench.serve import RequestRecord, ServeResult, percentile
from nanovllm.bench.workloads import dataset_workload, throughput_workload
from nanovllm.cli import main as cli_main
from nanovllm.model.config import ModelConfig


def test_throughput_workload_is_bench_py_workload():
    workload = throughput_workload()
    assert len(workload.requests) == 256
    assert workload.output_tokens == 133_966          # the figure docs/benchmarks.md gives for bench.py's set
    assert workload.temperature == 0.6
    assert all(100 <= len(r.prompt_token_ids) <= 1024 and 100 <= r.max_tokens <= 1024 for r in workload.requests)
    assert all(0 <= t <= 10000 for r in workload.requests for t in r.prompt_token_ids)


def test_throughput_fixed_has_the_same_prompts_and_512_token_outputs():
    fixed = dataset_workload("throughput-fixed", None, None, None, vocab_size=150_000)
    assert [r.prompt_token_ids for r in fixed.requests] == [r.prompt_token_ids for r in throughput_workload().requests]
    assert {r.max_tokens for r in fixed.requests} == {512}


def test_small_vocabulary_keeps_workload_lengths():
    workload = throughput_workload(8, vocab_size=320)
    full = throughput_workload(8)
    assert workload.shape == full.shape
    assert max(t for r in workload.requests for t in r.prompt_token_ids) < 320


def test_latency_runs_each_have_a_prompt_of_their_own():
    from nanovllm.bench.workloads import latency_workload

    workload = latency_workload(vocab_size=50_000, num_runs=3)
    assert workload.shape == [(128, 256)] * 4          # a warm-up and three timed runs
    assert len({tuple(r.prompt_token_ids) for r in workload.requests}) == 4


def test_random_dataset_without_lengths_is_a_user_error():
    with pytest.raises(ValueError, match="--input-len and --output-len"):
        dataset_workload("random", 4, None, 8, vocab_size=320)


# ---- the roofline, checked by hand ----------------------------------------------------------

HAND_CONFIG = ModelConfig(architecture="llama", vocab_size=32, hidden_size=8, intermediate_size=16,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                          max_position_embeddings=64, tie_word_embeddings=True)


def test_model_cost_counts_the_parameters_of_the_config_by_hand():
    cost = ModelCost.from_config(HAND_CONFIG, dtype_bytes=2)
    # q: 8x8, k and v: 8x4 each, o: 8x8 -> 192; gate, up, down: 3 x 8x16 = 384
    assert cost.linear_params == 192 + 384
    assert cost.norm_params == 2 * 8 + 8                     # two norms per layer, one final
    assert cost.lm_head_params == 32 * 8
    assert cost.weight_bytes == (576 + 24 + 256) * 2         # 1712
    assert cost.kv_bytes_per_token == 2 * 1 * 1 * 4 * 2      # K and V, 1 layer, 1 kv head, head_dim 4, bf16
    assert cost.attention_flops_per_context_token == 4 * 4 * 2 * 1


def test_packed_int4_weights_count_half_a_byte_plus_a_scale_and_zero_per_32(monkeypatch):
    from nanovllm.bench.roofline import WEIGHT_FORMAT_BYTES, matmul_dtype
    from nanovllm.ops import quant

    cost = ModelCost.from_config(HAND_CONFIG, dtype_bytes=4, matmul_weight_bytes=WEIGHT_FORMAT_BYTES["int4"])
    assert cost.weight_bytes == (576 + 256) * (0.5 + 4 / 32) + 24 * 4   # matmul weights packed, norms float32
    assert cost.kv_bytes_per_token == 2 * 1 * 1 * 4 * 4                  # the KV cache stays float32
    assert matmul_dtype("float32") == torch.float32
    # the packed formats' peak: bfloat16's where the CPU multiplies it itself, else float32's
    monkeypatch.setattr(quant, "onednn_bfloat16_supported", lambda: True)
    assert matmul_dtype("int4") == torch.bfloat16 and matmul_dtype("int8") == torch.bfloat16
    monkeypatch.setattr(quant, "onednn_bfloat16_supported", lambda: False)
    assert matmul_dtype("int4") == torch.float32 and matmul_dtype("float32") == torch.float32


def test_roofline_of_a_tiny_workload_matches_the_hand_computation():
    """Requests A (prompt 3, output 2) and B (prompt 2, output 1) at 1000 B/s and 2000 FLOP/s.

    Step 0 prefills both and samples their first tokens:
      bytes = 1712 weights + 5 tokens x 8 x 2 embedding rows + 5 x 16 KV written = 1872   -> 1.872 s
      flops = 2 x 576 x 5 + 2 x 256 x 2 sampled rows + 32 x (A: 1+2+3, B: 1+2 = 9) = 7072 -> 3.536 s
    Step 1 decodes A's second token (B is done), with 3 tokens cached:
      bytes = 1712 + 16 embedding + (3 read + 1 written) x 16 = 1792                      -> 1.792 s
      flops = 2 x 576 + 2 x 256 + 32 x 4 context = 1792                                   -> 0.896 s
    Bound: 3.536 + 1.792 = 5.328 s for 3 output tokens.
    """
    ceilings = Ceilings(device="cpu", device_name="paper", memory_bandwidth=1000.0, peak_flops=2000.0,
                        dtype="bfloat16", num_threads=1)
    cost = ModelCost.from_config(HAND_CONFIG, dtype_bytes=2)
    roofline = workload_roofline(cost, ceilings, [(3, 2), (2, 1)])
    assert roofline.num_steps == 2
    assert roofline.bytes == 1872 + 1792
    assert roofline.flops == 7072 + 1792
    assert roofline.step_times == pytest.approx([3.536, 1.792])
    assert roofline.prefill_time == pytest.approx(3.536)
    assert roofline.time == pytest.approx(5.328)
    assert roofline.memory_bound_steps == 1
    assert roofline.output_throughput == pytest.approx(3 / 5.328)
    assert roofline.decode_throughput == pytest.approx(1 / 1.792)


def test_best_ceilings_take_the_higher_bandwidth_and_flops_of_two_measurements():
    first = Ceilings("cpu", "x", memory_bandwidth=10.0, peak_flops=50.0, dtype="float32", num_threads=1)
    second = Ceilings("cpu", "x", memory_bandwidth=8.0, peak_flops=70.0, dtype="float32", num_threads=1)
    best = first.best(second)
    assert (best.memory_bandwidth, best.peak_flops) == (10.0, 70.0)


def test_cpu_ceilings_stop_timing_once_their_budget_is_spent(monkeypatch):
    """On the CPU a measurement stops after three timed calls once they have taken CPU_TIMING_SECONDS
    (bfloat16 on a CPU without bfloat16 instructions would take minutes); CUDA takes every repeat."""
    from nanovllm.bench import roofline

    calls = []
    monkeypatch.setattr(roofline, "CPU_TIMING_SECONDS", 0.0)
    roofline._best_time(lambda: calls.append(1), "cpu", repeats=30)
    assert len(calls) == 1 + 3
    calls.clear()
    monkeypatch.setattr(roofline, "CPU_TIMING_SECONDS", 1e9)
    roofline._best_time(lambda: calls.append(1), "cpu", repeats=30)
    assert len(calls) == 1 + 30


def test_cpu_matmul_ceiling_halves_a_product_too_slow_to_time(monkeypatch):
    from nanovllm.bench import roofline

    monkeypatch.setattr(roofline, "CPU_TIMING_SECONDS", 0.0)
    monkeypatch.setattr(roofline, "CPU_MATMUL_SECONDS", 0.0)      # every product too slow: down to 256
    slow = roofline.measure_ceilings("cpu", torch.float32, copy_bytes=1 << 20, matmul_size=1024, repeats=3)
    assert slow.matmul_size == 256 and slow.peak_flops > 0
    monkeypatch.setattr(roofline, "CPU_MATMUL_SECONDS", 1e9)
    fast = roofline.measure_ceilings("cpu", torch.float32, copy_bytes=1 << 20, matmul_size=1024, repeats=3)
    assert fast.matmul_size == 1024


def test_lockstep_schedule_decodes_each_request_until_its_output_is_complete():
    steps = lockstep_schedule([(3, 2), (2, 1), (5, 4)])
    assert len(steps) == 4
    assert [(c.num_computed_tokens, c.num_new_tokens) for c in steps[0]] == [(3 - 3, 3), (0, 2), (0, 5)]
    assert [(c.num_computed_tokens, c.num_new_tokens) for c in steps[1]] == [(3, 1), (5, 1)]
    assert [(c.num_computed_tokens, c.num_new_tokens) for c in steps[3]] == [(7, 1)]


def test_roofline_of_bench_py_workload_lands_near_the_reference_figure():
    """docs/benchmarks.md: about 35,300 output tok/s for Qwen3-0.6B on an H200 (4.23 TB/s, 801 TFLOP/s).
    Our bound runs the LM head only on sampled rows, so it sits a little above."""
    from nanovllm.model.dummy import dummy_config

    ceilings = Ceilings("cuda", "H200", memory_bandwidth=4.23e12, peak_flops=801e12, dtype="bfloat16", num_threads=1)
    roofline = workload_roofline(ModelCost.from_config(dummy_config("qwen3-0.6b"), 2), ceilings,
                                 throughput_workload().shape)
    assert 35_300 <= roofline.output_throughput <= 35_300 * 1.03


@pytest.mark.parametrize("name", ["llama-gqa4", "llama-mha-hd80", "qwen2", "qwen3"])
def test_model_cost_counts_every_parameter_of_the_built_model(tiny_model_factory, name):
    from nanovllm.model.loader import load_model

    model, config = load_model(str(tiny_model_factory(name)))
    cost = ModelCost.from_config(config, dtype_bytes=4)
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    assert cost.linear_params + cost.norm_params + cost.lm_head_params + embedding == \
        sum(p.numel() for p in model.parameters())


# ---- the command line on a tiny model -------------------------------------------------------

def run_bench(capsys, *argv: str) -> tuple[str, dict]:
    assert cli_main(["bench", *argv, "--no-progress", "--ceiling-repeats", "2"]) == 0
    out = capsys.readouterr().out
    return out, json.loads(open(argv[argv.index("--json") + 1]).read())


def test_throughput_cli_prints_the_table_with_a_fraction_of_roofline(tiny_llama, tmp_path, capsys):
    out, result = run_bench(capsys, "throughput", str(tiny_llama), "--num-prompts", "4", "--input-len", "16",
                            "--output-len", "8", "--peer", "hf", "--json", str(tmp_path / "r.json"),
                            "--save-dir", str(tmp_path / "saved"))
    header = out.strip().splitlines()[0]
    for column in ("workload", "device", "figure", "nano-vllm", "roofline", "fraction", "hf", "nano-vllm / hf"):
        assert f" {column} " in header
    (figure,) = result["figures"]
    assert figure["figure"] == "output tok/s" and figure["workload"] == "random"
    assert 0 < figure["fraction_of_roofline"] <= 1
    assert figure["peers"]["hf"] > 0 and figure["ratio_to_peer"]["hf"] > 0
    assert result["nano_vllm"]["random"]["total_output_tokens"] == 4 * 8
    assert result["peer_results"]["hf"]["random"]["total_output_tokens"] == 4 * 8
    assert result["ceilings"]["memory_bandwidth_GBps"] > 0 and result["ceilings"]["peak_TFLOPs"] > 0
    assert result["machine"]["cpu"] in figure["device"]
    assert {"torch", "transformers", "nano_vllm"} <= set(result["versions"])
    assert result["source_digest"] == report.source_digest()
    (saved,) = (tmp_path / "saved").iterdir()
    assert saved.name.endswith("-throughput-" + tiny_llama.name.lower() + ".json")
    assert json.loads(saved.read_text()) == result                  # the same schema-1 result as --json writes
    assert result["schema"] == report.SCHEMA and result["card"].startswith(result["machine"]["cpu"])
    (row,) = report.result_rows(report.load_results(tmp_path / "saved"))
    assert (row.workload, row.figure, row.measured) == ("random 4 x 16/8", "output tok/s", figure["measured"])


def test_a_structured_output_ratio_puts_that_share_under_the_schema_and_names_the_result(tiny_llama, tmp_path, capsys,
                                                                                         monkeypatch):
    from nanovllm.bench import throughput
    runs = []

    def recording_generate(engine, prompts, params, *args, **kwargs):
        outputs = generate(engine, prompts, params, *args, **kwargs)
        runs.append((params, outputs))
        return outputs
    generate = throughput.generate
    monkeypatch.setattr(throughput, "generate", recording_generate)
    _, result = run_bench(capsys, "throughput", str(tiny_llama), "--num-prompts", "4", "--input-len", "16",
                          "--output-len", "24", "--structured-output-ratio", "0.5", "--peer", "none",
                          "--json", str(tmp_path / "r.json"), "--save-dir", str(tmp_path / "saved"))
    params, outputs = runs[-1]                                   # the timed run (the first is the warm-up)
    assert [p.structured_outputs is not None for p in params] == [False, True, False, True]
    for p, output in zip(params, outputs):
        text = output.outputs[0].text
        assert len(output.outputs[0].token_ids) == 24                        # EOS ignored: the workload's count
        assert text.startswith('{"') == (p.structured_outputs is not None), text
    assert result["workloads"]["random"]["structured_output_ratio"] == 0.5
    (saved,) = (tmp_path / "saved").iterdir()
    assert saved.name.endswith("-json-schema-50.json")
    (row,) = report.result_rows(report.load_results(tmp_path / "saved"))
    assert row.model.endswith("50% under a JSON schema")


def test_a_result_label_names_the_quantization_kv_cache_and_all_reduce_its_engine_ran():
    model = {"name": "llama-3.2-1b", "load_format": "dummy", "dtype": "bfloat16"}
    assert report.model_label(model, engine_config={"quantization": "gguf-q4_k", "kv_cache_dtype": "fp8"}) == \
        "llama-3.2-1b, dummy weights, bfloat16, gguf-q4_k weights, fp8 KV cache"
    named = {**model, "dtype": "bfloat16, fp8 weights (quantized at load)"}       # the dtype names it already
    assert report.model_label(named, engine_config={"quantization": "fp8", "kv_cache_dtype": "auto"}) == \
        "llama-3.2-1b, dummy weights, bfloat16, fp8 weights"
    assert report.model_label(model, engine_config={"all_reduce": "peer"}) == \
        "llama-3.2-1b, dummy weights, bfloat16, peer all-reduce"           # a row apart from NCCL's
    assert report.model_label(model, engine_config={"all_reduce": "auto"}) == "llama-3.2-1b, dummy weights, bfloat16"


def test_a_structured_output_ratio_spreads_its_share_evenly_and_is_checked(tiny_llama, capsys):
    workload = dataset_workload("random", 8, 4, 4, vocab_size=320)
    for ratio, expected in ((0.0, 0), (0.25, 2), (0.5, 4), (1.0, 8)):
        workload.structured_output_ratio = ratio
        chosen = [i for i in range(8) if workload.constrained(i)]
        assert len(chosen) == expected and (ratio != 0.5 or chosen == [1, 3, 5, 7])
    assert cli_main(["bench", "latency", str(tiny_llama), "--structured-output-ratio", "0.5"]) == 2
    assert cli_main(["bench", "throughput", str(tiny_llama), "--structured-output-ratio", "1.5"]) == 2
    assert "--structured-output-ratio is a share from 0 to 1" in capsys.readouterr().err


def test_latency_cli_reports_decode_speed_and_ttft_against_the_roofline(tiny_llama, tmp_path, capsys):
    out, result = run_bench(capsys, "latency", str(tiny_llama), "--input-len", "8", "--output-len", "6",
                            "--num-runs", "2", "--json", str(tmp_path / "r.json"))
    figures = {f["figure"]: f for f in result["figures"]}
    assert set(figures) == {"decode tok/s", "TTFT ms"}
    for figure in figures.values():
        assert 0 < figure["fraction_of_roofline"] <= 1
    assert figures["decode tok/s"]["measured"] == pytest.approx(
        result["nano_vllm"]["latency"]["median_decode_tokens_per_second"])
    assert len(result["nano_vllm"]["latency"]["runs"]) == 2
    assert all(run["num_output_tokens"] == 6 for run in result["nano_vllm"]["latency"]["runs"])
    assert "decode tok/s" in out and "TTFT ms" in out


def test_dummy_model_without_tokenizer_runs_with_token_ids_against_hf(tiny_llama, tmp_path, capsys):
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    _, result = run_bench(capsys, "latency", "--dummy", str(tmp_path / "config.json"), "--input-len", "8",
                          "--output-len", "4", "--num-runs", "1", "--peer", "hf", "--json", str(tmp_path / "r.json"))
    assert result["model"]["load_format"] == "dummy"
    assert result["nano_vllm"]["latency"]["runs"][0]["num_output_tokens"] == 4
    assert result["peer_results"]["hf"]["latency"]["runs"][0]["num_output_tokens"] == 4


def test_token_id_tokenizer_decodes_ids_and_refuses_text():
    from nanovllm.bench.harness import TokenIdTokenizer

    tokenizer = TokenIdTokenizer(vocab_size=100, eos_token_ids=[2])
    assert tokenizer.decode([5, 17]) == "<5><17>"
    with pytest.raises(ValueError, match="token ids"):
        tokenizer.encode("hello")


def test_unknown_peer_is_a_user_error(tiny_llama, capsys):
    assert cli_main(["bench", "latency", str(tiny_llama), "--peer", "vllm"]) == 2
    assert "unknown peer vllm" in capsys.readouterr().err


# ---- the serving client ---------------------------------------------------------------------

def test_serve_metrics_follow_vllm_definitions():
    records = [RequestRecord(prompt_len=4, success=True, output_tokens=5, ttft=0.1, latency=0.5,
                             itl=[0.1, 0.1, 0.1, 0.1]),
               RequestRecord(prompt_len=4, success=True, output_tokens=3, ttft=0.3, latency=0.5, itl=[0.1, 0.1]),
               RequestRecord(prompt_len=4, error="HTTP 500")]
    metrics = ServeResult(request_rate=2.0, duration=2.0, records=records).as_dict()
    assert metrics["completed"] == 2 and metrics["failed"] == 1
    assert metrics["output_throughput"] == pytest.approx(8 / 2.0)
    assert metrics["mean_ttft_ms"] == pytest.approx(200)
    assert metrics["mean_tpot_ms"] == pytest.approx(100)      # (0.5-0.1)/4 and (0.5-0.3)/2
    assert metrics["median_itl_ms"] == pytest.approx(100)
    assert metrics["errors"] == ["HTTP 500"]
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)


class FakeCompletionServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/completions that streams one chunk per requested token, >= 10 ms apart."""
    bodies: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._send_json({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeCompletionServer.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(body["max_tokens"]):
            time.sleep(0.01)
            self._event({"choices": [{"index": 0, "text": f"t{i}", "finish_reason": None}]})
        self._event({"choices": [], "usage": {"prompt_tokens": len(body["prompt"]),
                                              "completion_tokens": body["max_tokens"]}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, payload: dict) -> None:
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()

    def _send_json(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_serve_cli_streams_poisson_requests_from_an_openai_server(tiny_llama, tmp_path, capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeCompletionServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeCompletionServer.bodies = []
    try:
        _, result = run_bench(capsys, "serve", str(tiny_llama), "--url", f"http://127.0.0.1:{server.server_port}",
                              "--dataset", "random", "--num-prompts", "4", "--input-len", "8", "--output-len", "5",
                              "--request-rate", "inf,200", "--json", str(tmp_path / "r.json"))
    finally:
        server.shutdown()
    assert len(FakeCompletionServer.bodies) == 8
    body = FakeCompletionServer.bodies[0]
    assert body["stream"] is True and body["ignore_eos"] is True and body["model"] == "tiny"
    assert len(body["prompt"]) == 8 and body["max_tokens"] == 5
    for rate in ("inf", "200"):
        metrics = result["nano_vllm"][f"random@{rate}"]
        assert metrics["completed"] == 4 and metrics["total_output_tokens"] == 20
        assert metrics["request_rate"] == float(rate)
        # A client that falls behind on a busy machine reads two chunks at once, and that gap
        # is ~0; the mean of a request's gaps is its last read minus its first, so it stays.
        assert metrics["mean_ttft_ms"] > 1 and metrics["mean_itl_ms"] > 1 and metrics["p99_tpot_ms"] > 1
        assert metrics["client_ceiling_output_throughput"] > 0   # the same requests against a stub server
    figures = result["figures"]
    assert [f["workload"] for f in figures] == ["random@inf", "random@200"]
    assert all(0 < f["fraction_of_roofline"] <= 1 and not math.isnan(f["measured"]) for f in figures)


def test_source_digest_names_the_package_code_and_changes_with_it(tmp_path):
    """The digest a result records identifies the code that ran, whatever the git metadata says."""
    import shutil
    package = Path(report.__file__).resolve().parents[1]
    copy = tmp_path / "nanovllm"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert report.source_digest(copy) == report.source_digest()
    (copy / "ops" / "linear.py").write_text((copy / "ops" / "linear.py").read_text() + "\n# changed\n")
    assert report.source_digest(copy) != report.source_digest()


def test_git_commit_is_the_named_one_where_a_copy_names_it(monkeypatch):
    """A tree copied to another machine names the commit it came from: that, not the copy's git metadata."""
    monkeypatch.delenv("NANO_VLLM_GIT_COMMIT", raising=False)
    here = report.git_commit()
    monkeypatch.setenv("NANO_VLLM_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    assert report.git_commit() == "0123456789abcdef0123456789abcdef01234567" != here


# ---- the tables generated from benchmarks/results/ -------------------------------------------

def test_the_committed_tables_are_what_bench_report_generates():
    """`nano-vllm bench report` regenerates benchmarks/README.md and the README's table byte for byte."""
    stale = report.write_report(check=True)
    assert not stale, f"out of date: {[str(p) for p in stale]}; run `nano-vllm bench report`"


def a_result(date: str, measured: float, card: str = "NVIDIA H200", workload: str = "serve", **figure) -> dict:
    """A minimal schema-1 result, as a program other than `nano-vllm bench` may write one."""
    return {"schema": 1, "date": date, "card": card, "kind": workload, "model": {"name": "m", "dtype": "int8"},
            "git_commit": "0123456789abcdef", "source_digest": None, "command": "x",
            "figures": [{"workload": workload, "figure": "output tok/s", "measured": measured, "roofline": 200.0,
                         "fraction_of_roofline": measured / 200.0, "higher_is_better": True, "peers": {}, **figure}]}


def write_tree(root: Path, results: list[dict]) -> None:
    (root / "benchmarks").mkdir()
    for result in results:
        report.save_result(result, root / "benchmarks" / "results")
    (root / "README.md").write_text(f"# x\n\n{report.TABLE_BEGIN}\nold\n{report.TABLE_END}\n\nafter\n")


def test_report_shows_a_new_kind_of_result_and_only_the_latest_run_of_each_figure(tmp_path):
    write_tree(tmp_path, [a_result("2026-12-01T10:00:00", 50.5), a_result("2026-12-02T10:00:00", 150.0,
                                                                          peers={"vllm": 100.0}),
                          a_result("2026-12-03", 99.0, card="2 x NVIDIA H200")])
    assert len(report.write_report(tmp_path)) == 2
    readme = (tmp_path / "README.md").read_text()
    table = readme.split(report.TABLE_BEGIN)[1].split(report.TABLE_END)[0]
    assert "150 output tok/s" in table and "75.0%" in table and "vllm 100 (x1.50)" in table
    assert "50.5" not in table and "99 output tok/s" in table and "m, int8" in table
    assert readme.endswith(f"{report.TABLE_END}\n\nafter\n")
    every = (tmp_path / "benchmarks" / "README.md").read_text()
    assert every.index("| 99 |") < every.index("| 150 |") < every.index("| 50.5 |")   # newest first
    assert report.write_report(tmp_path, check=True) == []                                # now current


def test_report_check_finds_a_stale_table_and_changes_nothing(tmp_path, capsys):
    write_tree(tmp_path, [a_result("2026-12-01", 50.0)])
    report.write_report(tmp_path)
    report.save_result(a_result("2026-12-02", 60.0), tmp_path / "benchmarks" / "results")
    before = (tmp_path / "README.md").read_text()
    assert report.write_report(tmp_path, check=True) == [tmp_path / "benchmarks" / "README.md", tmp_path / "README.md"]
    assert (tmp_path / "README.md").read_text() == before


def test_a_figure_marked_not_headline_stays_out_of_the_readme_table(tmp_path):
    write_tree(tmp_path, [a_result("2026-12-01", 50.5, headline=False)])
    report.write_report(tmp_path)
    assert "50.5" not in (tmp_path / "README.md").read_text()
    assert "| 50.5 |" in (tmp_path / "benchmarks" / "README.md").read_text()


def test_a_result_without_a_required_field_is_refused_with_its_name(tmp_path):
    result = a_result("2026-12-01", 50.0)
    del result["figures"][0]["roofline"]
    write_tree(tmp_path, [result])
    with pytest.raises(ValueError, match=r"figures\[0\]\.roofline.*docs/benchmarks.md"):
        report.write_report(tmp_path)


def test_a_second_run_of_the_same_day_gets_its_own_file(tmp_path):
    first = report.save_result(a_result("2026-12-01", 50.0), tmp_path)
    second = report.save_result(a_result("2026-12-01", 60.0), tmp_path)
    assert first != second and second.name.endswith("-run2.json") and len(list(tmp_path.iterdir())) == 2


def test_bench_report_check_passes_on_the_repository():
    assert cli_main(["bench", "report", "--check"]) == 0


def test_step_overhead_splits_a_decode_step_into_model_and_host_time(tiny_llama):
    from nanovllm.bench.harness import make_engine
    from nanovllm.bench.step_overhead import measure_step_overhead
    from nanovllm.config import EngineConfig

    engine = make_engine(EngineConfig(model=str(tiny_llama), device="cpu", max_model_len=64))
    overhead = measure_step_overhead(engine, batch_size=3, steps=4, prompt_len=8)
    assert 0 < overhead.model_ms < overhead.step_ms
    assert 0 < overhead.host_fraction < 1
    assert "load average" in overhead.summary() and len(overhead.load_average) == 3
    assert not engine.has_unfinished_requests()
    assert "forward" not in vars(engine.runner.model), "the model's own forward again"
    assert overhead.compiled_ms is None and "compiled" not in overhead.summary()   # float32: llama.py's forward


def test_step_overhead_shows_the_time_outside_the_fused_forwards_compiled_call():
    from nanovllm.bench.step_overhead import StepOverhead

    overhead = StepOverhead(1, step_ms=10.0, model_ms=9.0, load_average=(1.0, 1.0, 1.0), compiled_ms=8.5)
    assert overhead.outside_compiled_ms == 1.5 and overhead.as_dict()["outside_compiled_ms"] == 1.5
    assert "outside the compiled calls 1.50 ms (15.0%)" in overhead.summary()


def test_a_client_spread_over_two_processes_sends_every_request_once():
    from nanovllm.bench.serve import StubServer, run_serve_processes
    from nanovllm.bench.workloads import Request, Workload

    workload = Workload("tiny", [Request([1, 2, 3], 5 + i) for i in range(6)], temperature=0.0)
    with StubServer() as stub:
        result = run_serve_processes(stub.url, StubServer.MODEL, workload, float("inf"), num_processes=2,
                                     use_tqdm=False)
    metrics = result.as_dict()
    assert metrics["completed"] == 6 and metrics["total_output_tokens"] == sum(5 + i for i in range(6))
    assert sorted(len(r.itl) + 1 for r in result.records) == [5 + i for i in range(6)]


def test_a_saved_command_carries_no_machine_paths(tmp_path, monkeypatch):
    from nanovllm.bench.cli import portable_arguments
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "latency", f"{tmp_path}/models/tiny", "--json", "/elsewhere/out/run.json",
            f"--save-dir={tmp_path}/results", "--dummy", "llama-3.2-1b"]
    assert portable_arguments(argv) == ["bench", "latency", "models/tiny", "--json", ".../run.json",
                                        "--save-dir=results", "--dummy", "llama-3.2-1b"]


def test_report_rows_name_a_short_throughput_run_and_read_older_quantization_labels():
    def result(num_requests: int, dtype: str, quantization: str | None) -> dict:
        return {"workloads": {"throughput": {"num_requests": num_requests}},
                "model": {"name": "llama-3.1-8b", "load_format": "dummy", "dtype": dtype},
                "engine_config": {"quantization": quantization}}
    assert report.workload_label("throughput", result(256, "bfloat16", None)) == "throughput"
    assert report.workload_label("throughput", result(64, "bfloat16", None)) == "throughput, 64 requests"
    older = result(256, "bfloat16, fp8 weights (quantized at load)", "fp8")
    newer = result(256, "bfloat16", "fp8")
    labels = {report.model_label(r["model"], engine_config=r["engine_config"]) for r in (older, newer)}
    assert labels == {"llama-3.1-8b, dummy weights, bfloat16, fp8 weights"}


def test_an_ab_baseline_run_is_listed_but_never_the_latest_of_its_workload():
    """A baseline measured after the product (the order of an A/B in one call) must not replace it."""
    def row(date: str, measured: float, baseline: bool) -> report.Row:
        return report.Row(date=date, workload="latency", model="llama-3.1-8b, dummy weights, bfloat16, fp8 weights",
                          card="NVIDIA H200", figure="decode tok/s", measured=measured, roofline=500.0, fraction=0.6,
                          peers="", commit="abc1234", file=f"{date}.json", headline=True, baseline=baseline)

    rows = [row("2026-12-03T12:00", 339.0, False), row("2026-12-03T12:01", 322.0, True)]
    assert [r.measured for r in report.latest_rows(rows)] == [339.0]
    assert [r.measured for r in report.latest_rows(rows + [row("2026-12-03T12:02", 341.0, False)])] == [341.0]


def test_bench_with_sets_module_switches_and_records_them_in_the_result(tmp_path, monkeypatch):
    """tools/bench_with.py sets each MODULE.NAME=VALUE before the command runs, refuses a name the
    module lacks, and writes the settings and its own command line (no machine's paths) into the
    result, where the bench would have recorded "called from Python"."""
    import importlib.util

    import nanovllm.cli
    from nanovllm.ops import activation

    spec = importlib.util.spec_from_file_location("bench_with", Path(__file__).parents[1] / "tools" / "bench_with.py")
    bench_with = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_with)
    seen = []

    def fake_cli(argv):      # the switch as the command sees it; a result as the bench writes one
        seen.append(activation.PARTIALS_INTO_SILU)
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps({"command": "nano-vllm bench latency (called "
                                                                               "from Python)", "figures": []}))
        return 0

    monkeypatch.setattr(nanovllm.cli, "main", fake_cli)
    monkeypatch.setattr(activation, "PARTIALS_INTO_SILU", True)
    out = tmp_path / "off.json"
    assert bench_with.main(["nanovllm.ops.activation.PARTIALS_INTO_SILU=False", "--", "bench", "latency",
                            "--json", str(out)]) == 0
    assert seen == [False]
    result = json.loads(out.read_text())
    assert result["settings"] == {"nanovllm.ops.activation.PARTIALS_INTO_SILU": False}
    assert result["command"].startswith("python tools/bench_with.py nanovllm.ops.activation.PARTIALS_INTO_SILU"
                                        "=False -- bench latency --json ")
    assert str(tmp_path) not in result["command"]
    with pytest.raises(SystemExit, match="nanovllm.ops.quant_linear has no NO_SUCH_SWITCH"):
        bench_with.main(["nanovllm.ops.quant_linear.NO_SUCH_SWITCH=1", "--", "bench"])

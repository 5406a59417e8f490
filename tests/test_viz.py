"""The visualizer on tiny random models, in process: recomputed attention against transformers,
the panels' numbers against the block manager, the demo scenario, the report's pictures, and
that nothing is hooked when the visualizer is off."""
from __future__ import annotations

import base64
import io
import re

import pytest
import torch

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import KVCacheUsage
from nanovllm.engine.engine import LLMEngine
from nanovllm.sampling_params import SamplingParams
from nanovllm.viz.attention import AttentionCapture
from nanovllm.viz.panels import (BAR_WIDTH, SHADES, attention_panel, kv_panel, proportional_bar, scheduler_panel,
                                 shade, timeline_grid, token_label)
from nanovllm.viz.plain import PlainView
from nanovllm.viz.recorder import RequestView, StepRecord, VizState
from nanovllm.viz.run_command import StreamPrinter
from nanovllm.viz.workload import Arrival, Visualizer, run_workload
from conftest import engine_over

GREEDY = dict(temperature=0.0)


@pytest.fixture
def make_engine(tiny_llama_loaded):
    def make(**engine_args) -> LLMEngine:
        engine_args.setdefault("max_model_len", 256)
        engine_args.setdefault("num_kv_blocks", 64)
        engine_args.setdefault("block_size", 8)
        return engine_over(tiny_llama_loaded, **engine_args)

    return make


def arrivals(*prompts: str, max_tokens: int = 6, steps: tuple[int, ...] | None = None) -> list[Arrival]:
    steps = steps or (0,) * len(prompts)
    return [Arrival(step, f"Req{i}", prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), prompt)
            for i, (step, prompt) in enumerate(zip(steps, prompts))]


def attention_hooks(engine: LLMEngine) -> int:
    return sum(len(layer.self_attn._forward_hooks) for layer in engine.runner.model.layers)


# ---- attention -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama-gqa4", "qwen3"])
def test_captured_attention_is_the_softmax_transformers_computes(tiny_model_factory, name):
    from transformers import AutoModelForCausalLM

    path = str(tiny_model_factory(name))
    engine = LLMEngine(EngineConfig(model=path, block_size=8, max_num_batched_tokens=12, num_kv_blocks=64,
                                    max_model_len=128, enable_prefix_caching=False))
    params = SamplingParams(max_tokens=5, **GREEDY)
    other = list(range(40, 49))
    watched = list(range(3, 26))   # 23 tokens: two chunks of prefill, and it sits in batch row 1
    engine.add_request("other", other, params)
    engine.add_request("watched", watched, params)
    seq = engine.requests["watched"][0]
    num_layers = engine.model_config.num_hidden_layers
    capture = AttentionCapture(engine.runner.model, list(range(num_layers)), str)
    capture.watch(seq)
    capture.attach()
    while engine.has_unfinished_requests():
        engine.step()
    capture.detach()

    computed = seq.token_ids[:-1]   # the last sampled token never went through the model
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        reference = hf(torch.tensor([computed]), output_attentions=True).attentions   # per layer [1, H, L, L]
    for layer in range(num_layers):
        view = capture.view(layer)
        assert view.query_positions == list(range(len(computed) - 10, len(computed)))
        for position, row in zip(view.query_positions, view.rows):
            torch.testing.assert_close(row, reference[layer][0, :, position, :position + 1].float(),
                                       atol=2e-5, rtol=1e-4)


def test_attention_matrix_rows_sum_to_one_and_hide_the_future(make_engine):
    engine = make_engine(max_num_batched_tokens=16)
    visualizer = Visualizer(engine, None, layer=1)
    result = run_workload(engine, arrivals("hello there, attention", max_tokens=4), lambda o: None, visualizer)
    view = result.attention[1]
    key_positions, weights = view.matrix()                      # [H, Q, 1 + K]
    assert key_positions == view.query_positions
    assert weights.shape == (engine.model_config.num_attention_heads, 10, 11)
    for i in range(10):
        assert torch.isnan(weights[:, i, 2 + i:]).all()         # keys after the query are masked
        assert not torch.isnan(weights[:, i, :2 + i]).any()
        torch.testing.assert_close(weights[:, i, :2 + i].sum(-1), torch.ones(weights.shape[0]))
    assert view.tokens[view.query_positions[-1]] == engine.tokenizer.decode([result.outputs["Req0"].outputs[0]
                                                                            .token_ids[-2]])


def test_heat_map_shades_follow_the_thresholds():
    assert shade(float("nan"))[0] == " "
    assert [shade(w)[0] for w in (0.0, 0.05, 0.2, 0.4, 0.6, 0.99)] == [".", "-", "+", "*", "#", "@"]
    assert [char for _, char, _ in SHADES] == list(".-+*#@")
    assert token_label("\n") == "'\\n'"
    assert token_label(" caf\u00e9") == "' caf\\xe9'"
    assert len(token_label("a very long token indeed", 10)) == 10


# ---- the panels' numbers -----------------------------------------------------------------------

def usage(used: int, fragmentation: int, free_blocks: int, cached: int, num_blocks: int = 10) -> KVCacheUsage:
    return KVCacheUsage(num_blocks=num_blocks, block_size=16, used_slots=used, fragmentation_slots=fragmentation,
                        free_slots=free_blocks * 16, free_blocks=free_blocks, cached_free_blocks=cached,
                        prefix_cache_queries=40, prefix_cache_hits=16)


def test_the_pool_bar_is_proportional_and_shows_every_nonzero_part():
    bar = proportional_bar({"#": 33, "~": 1, "c": 0, ".": 126})
    assert len(bar) == BAR_WIDTH
    assert bar.count("~") == 1 and "c" not in bar
    assert bar == "#" * bar.count("#") + "~" + "." * bar.count(".")
    assert abs(bar.count("#") - 33 / 160 * BAR_WIDTH) <= 1


def test_kv_panel_counts_add_up_and_name_the_naive_waste():
    requests = [RequestView("Req0", "decode", 0, num_blocks=2), RequestView("Req1", "prefill", 0, num_blocks=1,
                                                                         num_shared_blocks=1)]
    state = VizState(step=3, kv_policy="paged", max_num_batched_tokens=32, num_prefill_tokens=20,
                     num_decode_tokens=1, kv_usage=usage(33, 15, 7, 2), requests=requests)
    text = kv_panel(state).plain
    assert "pool: 10 blocks x 16 slots = 160 slots" in text
    assert re.search(r"# used\s+33 slots\s+20.6%", text)
    assert re.search(r"~ fragmentation\s+15 slots\s+9.4%", text)
    assert re.search(r"\. free\s+112 slots\s+70.0%\s+incl. 32 cached-free slots", text)
    assert "[Req0: 2 blks] [Req1: 1 blks, 1 shared]" in text
    assert "16/40 looked-up tokens found (40.0%)" in text
    naive = kv_panel(VizState(**{**state.__dict__, "kv_policy": "naive"})).plain
    assert "max_model_len slots reserved per sequence" in naive
    fp8 = kv_panel(VizState(**{**state.__dict__, "kv_cache_dtype": "float8_e4m3fn"})).plain
    assert "= 160 slots, float8_e4m3fn KV, policy paged" in fp8


def test_scheduler_panel_splits_the_budget_and_shows_each_state():
    requests = [RequestView("Req0", "decode", 0, 9, 10, 9, 3, 8, text="Paris"),
                RequestView("Req1", "prefill", 0, 40, 16, 40),
                RequestView("Req2", "done", 0, 5, 5, 5, 8, 8, finish_reason="length"),
                RequestView("Req3", "upcoming", 12)]
    state = VizState(step=4, kv_policy="paged", max_num_batched_tokens=32, num_prefill_tokens=16,
                     num_decode_tokens=1, kv_usage=usage(0, 0, 10, 0), requests=requests)
    text = scheduler_panel(state).plain
    assert "token budget 32 = prefill 16 + decode 1 + unused 15 (53% used)" in text
    assert "[" + "P" * 16 + "D" + "." * 15 + "]" in text
    assert re.search(r"Req0\s+decode\s+\[#+\.*\]\s+3/8 tokens generated\s+'Paris'", text)
    assert re.search(r"Req1\s+prefill\s+\[#####\.{7}\]\s+16/40 tokens computed", text)
    assert re.search(r"Req2\s+done\s+8 tokens \(length\)", text)
    assert "Req3   upcoming  arrives at step 12" in text


def test_timeline_grid_has_a_column_per_step_and_merges_columns_when_long():
    history = [StepRecord(i, usage(0, 0, 10, 0), 0, 0, states) for i, states in enumerate(
        [{"Req0": "P"}, {"Req0": "D", "Req1": "."}, {"Req0": "F", "Req1": "P"}, {"Req1": "D"}, {"Req1": "F"}])]
    rows = {line.split()[0]: line.rstrip() for line in timeline_grid(history, ["Req0", "Req1"]).plain.splitlines()
            if line.startswith("Req")}
    assert rows["Req0"][5:] == "PDF"
    assert rows["Req1"][5:] == " .PDF"
    merged = timeline_grid(history, ["Req0", "Req1"], max_columns=3).plain
    assert "one column = 2 steps" in merged
    rows = {line.split()[0]: line.rstrip() for line in merged.splitlines() if line.startswith("Req")}
    assert rows["Req0"][5:] == "PF" and rows["Req1"][5:] == ".PF"


def parse_frames(text: str) -> list[dict]:
    """Every plain frame's step and numbers."""
    frames = []
    for chunk in text.split("=== step ")[1:]:
        frame = {"step": int(chunk.split(" ", 1)[0])}
        pool = re.search(r"pool: (\d+) blocks x (\d+) slots = (\d+) slots", chunk)
        frame["blocks"], frame["block_size"], frame["slots"] = map(int, pool.groups())
        for name in ("used", "fragmentation", "free"):
            frame[name] = int(re.search(rf"[#~.] {name}\s+(\d+) slots", chunk).group(1))
        frame["request_blocks"] = [int(n) for n in re.findall(r"\[Req\d+: (\d+) blks", chunk)]
        budget = re.search(r"token budget (\d+) = prefill (\d+) \+ decode (\d+) \+ unused (-?\d+)", chunk)
        frame["budget"], frame["prefill"], frame["decode"], frame["unused"] = map(int, budget.groups())
        frame["panels"] = [title for title in ("1. attention", "2. KV cache", "3. scheduler") if title in chunk]
        frames.append(frame)
    return frames


def test_plain_frames_every_n_steps_agree_with_the_block_manager(make_engine):
    engine = make_engine(max_num_batched_tokens=16)
    out = io.StringIO()
    visualizer = Visualizer(engine, PlainView(2, file=out), layer=0)
    block_manager = engine.scheduler.block_manager
    seen = []
    visualizer.recorder.on_step.append(lambda recorder: seen.append(block_manager.usage()))
    result = run_workload(engine, arrivals("the first prompt", "and a second, longer one", max_tokens=5),
                          lambda o: None, visualizer)
    frames = parse_frames(out.getvalue())
    assert [f["step"] for f in frames] == list(range(2, result.num_steps + 1, 2)) + (
        [result.num_steps] if result.num_steps % 2 else [])
    for frame in frames:
        assert frame["panels"] == ["1. attention", "2. KV cache", "3. scheduler"]
        assert frame["used"] + frame["fragmentation"] + frame["free"] == frame["slots"] == 64 * 8
        usage_then = seen[frame["step"] - 1]
        assert (frame["used"], frame["fragmentation"]) == (usage_then.used_slots, usage_then.fragmentation_slots)
        assert sum(frame["request_blocks"]) * 8 == frame["used"] + frame["fragmentation"]   # nothing shared here
        assert frame["prefill"] + frame["decode"] + frame["unused"] == frame["budget"] == 16
    assert any(frame["prefill"] and frame["decode"] for frame in frames) or result.num_steps < 4


def test_a_live_frame_fits_the_terminal_height_by_showing_fewer_heat_map_rows(make_engine):
    from nanovllm.viz.panels import frame
    from nanovllm.viz.plain import render_plain

    engine = make_engine()
    visualizer = Visualizer(engine, None, layer=0)
    run_workload(engine, arrivals("a", "bb", "ccc", max_tokens=12), lambda o: None, visualizer)
    state = visualizer.snapshot()
    assert len(render_plain(frame(state)).splitlines()) == 19 + 10 + 3
    for height in (24, 30):
        lines = render_plain(frame(state, height=height)).splitlines()
        assert len(lines) == height - 1                            # a line left for the cursor
        assert "3. scheduler" in "".join(lines) and lines[-1].startswith("╰")


def test_the_visualizer_off_registers_nothing_and_detaches_after_a_run(make_engine):
    engine = make_engine()
    run_workload(engine, arrivals("quiet run"), lambda o: None)
    assert engine.step_observers == [] and attention_hooks(engine) == 0
    visualizer = Visualizer(engine, None, layer=0, capture_all_layers=True)
    hooks_during = []
    visualizer.recorder.on_step.append(lambda recorder: hooks_during.append(attention_hooks(engine)))
    run_workload(engine, arrivals("watched run"), lambda o: None, visualizer)
    assert hooks_during and set(hooks_during) == {engine.model_config.num_hidden_layers}
    assert engine.step_observers == [] and attention_hooks(engine) == 0


def test_stream_printer_writes_each_new_piece_as_its_step_ends(make_engine):
    out = io.StringIO()
    printer = StreamPrinter(out, arrivals("abc"), show_prompt=True)
    seen = []

    def on_output(output):
        printer(output)
        seen.append((out.getvalue(), output.outputs[0].text))

    result = run_workload(make_engine(), arrivals("abc", max_tokens=6), on_output)
    printer.close()
    assert len(seen) == 6                                          # one output per step, each printed at once
    assert all(printed == "abc" + text for printed, text in seen)
    assert out.getvalue() == "abc" + result.outputs["Req0"].outputs[0].text + "\n"


def test_several_requests_stream_interleaved_under_their_tags(make_engine):
    out = io.StringIO()
    printer = StreamPrinter(out, arrivals("hello", "world"), show_prompt=True)
    result = run_workload(make_engine(), arrivals("hello", "world", max_tokens=6), printer)
    printer.close()
    parts = re.split(r"\n?\[(Req\d)\] ", out.getvalue().removesuffix("\n"))
    assert parts[0] == ""                                         # no prompt echo when several run
    tags, bodies = parts[1::2], parts[2::2]
    assert len(tags) > 2 and all(a != b for a, b in zip(tags, tags[1:]))   # a new tag each time the source changes
    pieces: dict[str, str] = {}
    for request_id, body in zip(tags, bodies):
        pieces[request_id] = pieces.get(request_id, "") + body
    assert pieces == {r: o.outputs[0].text for r, o in result.outputs.items()}


# ---- the demo and the report -------------------------------------------------------------------

def test_demo_prefills_the_long_prompt_in_chunks_beside_decodes_with_staggered_arrivals(tiny_model_factory):
    from nanovllm.viz.demo import DEMO_ENGINE_ARGS, DEMO_REQUESTS, demo_arrivals

    path = str(tiny_model_factory("llama-gqa4", num_layers=1, max_position_embeddings=2048))
    engine_args = {**DEMO_ENGINE_ARGS, "max_model_len": 2048, "num_kv_blocks": 256}   # byte tokens: 4x longer
    engine = LLMEngine(EngineConfig(model=path, **engine_args))
    demo = demo_arrivals(engine.tokenizer, SamplingParams(**GREEDY))
    visualizer = Visualizer(engine, None, layer=0)
    watched = []   # (request whose attention is shown, request watched) after each step
    visualizer.recorder.on_step.append(
        lambda recorder: watched.append((visualizer.snapshot().attention.request_id, visualizer.capture.seq.request_id)))
    result = run_workload(engine, demo, lambda o: None, visualizer)
    history = visualizer.recorder.history
    assert set(result.outputs) == {f"Req{i}" for i in range(len(DEMO_REQUESTS))}
    for (arrival_step, _, _), request_id in zip(DEMO_REQUESTS, result.outputs):
        first = next(i for i, record in enumerate(history) if request_id in record.states)
        assert first == arrival_step                               # it arrives when the scenario says
    long_steps = [r for r in history if r.states.get("Req2") == "P"]
    assert len(long_steps) > 3                                     # the long prompt takes several chunks
    assert any(set(r.states.values()) >= {"P", "D"} and r.states["Req2"] == "P" for r in long_steps)
    assert all(r.num_prefill_tokens + r.num_decode_tokens <= 32 for r in history)
    assert result.prefix_cache_hit_rate > 0                       # the shared system prompt
    # The panel follows a running request when the watched one ends, and is never blank meanwhile.
    assert watched[0] == ("Req0", "Req0") and len({w for _, w in watched}) > 1
    assert any(shown != now for shown, now in watched)


def test_report_page_embeds_a_png_for_every_picture_side_by_side(make_engine, tmp_path):
    from PIL import Image

    from nanovllm.viz.report import write_report

    results = []
    for policy in ("paged", "naive"):
        engine = make_engine(kv_policy=policy, max_model_len=64, max_num_batched_tokens=16)
        visualizer = Visualizer(engine, None, layer=1, capture_all_layers=True)
        results.append(run_workload(engine, arrivals("one", "two more", max_tokens=4), lambda o: None, visualizer))
    path = tmp_path / "report.html"
    write_report(path, results, title="test <run>")
    page = path.read_text()
    assert "<title>test &lt;run&gt;</title>" in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]+)"', page)
    alts = [alt for _, alt in images]
    assert alts == ["attention of every layer and head", "layer 1 attention per head",
                    "KV-cache slots over steps (paged)", "KV-cache slots over steps (naive)",
                    "batch composition (paged)", "batch composition (naive)", "timeline (paged)", "timeline (naive)"]
    for data, alt in images:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "PNG" and image.width > 200 and image.height > 100, alt
    for result in results:
        assert result.summary_line() in page.replace("&#x27;", "'")
    assert page.count("<h3>paged</h3>") == page.count("<h3>naive</h3>") == 4


def test_the_attention_panel_labels_rows_with_token_text(make_engine):
    engine = make_engine()
    visualizer = Visualizer(engine, None, layer=0)
    run_workload(engine, arrivals("hi\nyou", max_tokens=6), lambda o: None, visualizer)
    text = attention_panel(visualizer.capture.view(0)).plain
    assert "Req0, layer 0, heads 0-3 of 4" in text
    assert "'\\n'" in text and "'y'" in text
    rows = [line for line in text.splitlines() if re.match(r"\s+\d+ '", line)]
    assert len(rows) == 10
    for i, row in enumerate(rows):
        cells = row.split()[-4:]                                   # one per head: earlier keys, then the window
        assert [len(cell) for cell in cells] == [2 + i] * 4
        assert set("".join(cells)) <= set(".-+*#@")

"""`--report FILE.html`: one self-contained page about a run, pictures included.

Every picture is a matplotlib PNG embedded as `<img src="data:image/png;base64,...">`,
so the file can be mailed or opened offline. Sections:

1. the summary line of each run;
2. attention at the last step: a mosaic of every layer x head (the last
   queries of the watched sequence x the same positions as keys, plus one
   column for all earlier keys), then the chosen layer's heads over the last
   32 keys, labelled with their tokens;
3. KV-cache slots over steps: used, fragmentation (or the naive policy's
   reservation), cached-but-free, free;
4. batch composition over steps: prefill vs decode tokens against the budget;
5. the per-request timeline (waiting / prefill / decode / finished);
6. the generated texts.

With `--kv both` the runs sit side by side, paged on the left, so the
naive policy's waste and its longer queue can be compared on one workload.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from nanovllm.viz.panels import CACHED, FRAGMENTATION, FREE, USED, kv_counts, token_label
from nanovllm.viz.recorder import DECODE, FINISHED, PREEMPTED, PREFILL, WAITING
from nanovllm.viz.workload import RunResult

DETAIL_KEYS = 32
TIMELINE_CODES = {" ": 0, WAITING: 1, PREEMPTED: 2, PREFILL: 3, DECODE: 4, FINISHED: 5}
TIMELINE_NAMES = ["absent", "waiting", "preempted", "prefill", "decode", "finished"]
TIMELINE_COLOURS = ["#ffffff", "#d0d0d0", "#c05fc0", "#f0b030", "#40a040", "#3050c0"]
KV_COLOURS = {"used": "#40a040", "fragmentation": "#f0b030", "cached-free": "#50b0d0", "free": "#e0e0e0"}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table.runs { width: 100%; border-collapse: collapse; } table.runs td { vertical-align: top; padding: 0 1em 0 0; }
img { max-width: 100%; } pre { background: #f6f6f6; padding: 0.6em; white-space: pre-wrap; }
code { background: #f6f6f6; } p.note { color: #555; }
"""


def write_report(path: str | Path, results: list[RunResult], title: str) -> None:
    sections = [f"<h1>{html.escape(title)}</h1>",
                "<h2>Summary</h2>" + "".join(f"<p><b>{html.escape(r.kv_policy)}</b>: "
                                             f"<code>{html.escape(r.summary_line())}</code></p>" for r in results)]
    sections.append(_attention_section(results[0]))
    top = _kv_axis_top(results)
    sections.append("<h2>KV-cache slots over steps</h2>" + _side_by_side(results, lambda r: _kv_figure(r, top)))
    sections.append("<h2>Batch composition over steps</h2>" + _side_by_side(results, _batch_figure))
    sections.append("<h2>Per-request timeline</h2>" + _side_by_side(results, _timeline_figure))
    sections.append("<h2>Generated text</h2>" + _side_by_side(results, _texts))
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")
    Path(path).write_text(page, encoding="utf-8")


def _side_by_side(results: list[RunResult], section) -> str:
    cells = "".join(f"<td><h3>{html.escape(r.kv_policy)}</h3>{section(r)}</td>" if len(results) > 1
                    else f"<td>{section(r)}</td>" for r in results)
    return f"<table class=\"runs\"><tr>{cells}</tr></table>"


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img src=\"data:image/png;base64,{data}\" alt=\"{html.escape(figure.get_label())}\">"


def _figure(width: float, height: float, label: str):
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height))
    figure.set_label(label)
    return figure


# ---- attention -------------------------------------------------------------------------------

def _attention_section(result: RunResult) -> str:
    out = ["<h2>Attention at the last step</h2>"]
    if not result.attention:
        out.append("<p class=\"note\">No attention was captured (no request ran).</p>")
        return "".join(out)
    any_view = next(iter(result.attention.values()))
    out.append(f"<p class=\"note\">Request {html.escape(any_view.request_id)}: softmax(q&middot;k/&radic;d) of its "
               f"last {len(any_view.query_positions)} queries (rows), recomputed for display from the KV cache. "
               "Columns: all earlier keys summed, then the keys at the query positions (future keys blank).</p>")
    out.append(_png(_attention_mosaic(result)))
    if result.viz_layer in result.attention:
        out.append(f"<h3>Layer {result.viz_layer}, every head, last {DETAIL_KEYS} keys</h3>")
        out.append(_png(_attention_detail(result)))
    return "".join(out)


def _attention_mosaic(result: RunResult):
    layers = sorted(result.attention)
    first = result.attention[layers[0]]
    num_heads, rows, cols = first.num_heads, len(first.query_positions), len(first.query_positions) + 1
    mosaic = np.full((len(layers) * (rows + 1), num_heads * (cols + 1)), np.nan)
    for li, layer in enumerate(layers):
        _, weights = result.attention[layer].matrix()                  # [H, Q, 1 + Q]
        top = li * (rows + 1)
        for h in range(num_heads):
            left = h * (cols + 1)
            mosaic[top:top + weights.shape[1], left:left + weights.shape[2]] = weights[h].numpy()
    figure = _figure(max(6.0, num_heads * 1.1), max(4.0, len(layers) * 0.45), "attention of every layer and head")
    axes = figure.add_subplot()
    image = axes.imshow(mosaic, cmap=_cmap(), vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    axes.set_yticks([li * (rows + 1) + rows / 2 for li in range(len(layers))], [f"layer {l}" for l in layers],
                    fontsize=7)
    axes.set_xticks([h * (cols + 1) + cols / 2 for h in range(num_heads)], [f"head {h}" for h in range(num_heads)],
                    fontsize=8)
    axes.xaxis.tick_top()
    figure.colorbar(image, ax=axes, fraction=0.03, label="weight")
    return figure


def _attention_detail(result: RunResult):
    view = result.attention[result.viz_layer]
    key_positions, weights = view.matrix(DETAIL_KEYS)                   # [H, Q, 1 + K]
    num_heads = view.num_heads
    columns = min(num_heads, 3)
    grid_rows = -(-num_heads // columns)
    figure = _figure(columns * 5.5, grid_rows * 3.6, f"layer {view.layer} attention per head")
    x_labels = ["(earlier)"] + [token_label(view.tokens[p], 10) for p in key_positions]
    y_labels = [f"{p} {token_label(view.tokens[p], 10)}" for p in view.query_positions]
    for h in range(num_heads):
        axes = figure.add_subplot(grid_rows, columns, h + 1)
        axes.imshow(weights[h].numpy(), cmap=_cmap(), vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        axes.set_title(f"head {h}", fontsize=9)
        axes.set_xticks(range(len(x_labels)), x_labels, rotation=90, fontsize=7)
        axes.set_yticks(range(len(y_labels)), y_labels, fontsize=7)
    figure.tight_layout()
    return figure


def _cmap():
    import matplotlib
    return matplotlib.colormaps["magma_r"].with_extremes(bad="#ffffff")


# ---- time series -----------------------------------------------------------------------------

def _kv_axis_top(results: list[RunResult]) -> int:
    """One y-axis for every run: a little above the most slots any run had out of the plain free list
    (a big pool would otherwise squash the interesting part into a line at the bottom)."""
    busiest, total = 0, 1
    for result in results:
        for record in result.recorder.history if result.recorder else []:
            counts = kv_counts(record.kv_usage)
            busiest = max(busiest, counts[USED] + counts[FRAGMENTATION] + counts[CACHED])
            total = record.kv_usage.total_slots
    return min(total, max(int(busiest * 1.3), 64))


def _kv_figure(result: RunResult, top: int) -> str:
    history = result.recorder.history if result.recorder else []
    if not history:
        return "<p class=\"note\">no steps</p>"
    steps = np.arange(len(history))
    series = {name: np.array([kv_counts(r.kv_usage)[char] for r in history])
              for name, char in (("used", USED), ("fragmentation", FRAGMENTATION), ("cached-free", CACHED),
                                ("free", FREE))}
    labels = dict(series)
    if result.kv_policy == "naive":
        labels = {("reserved, unused" if k == "fragmentation" else k): v for k, v in series.items()}
    figure = _figure(6.5, 3.2, f"KV-cache slots over steps ({result.kv_policy})")
    axes = figure.add_subplot()
    axes.stackplot(steps, *labels.values(), labels=list(labels), colors=list(KV_COLOURS.values()), step="post")
    axes.set_xlabel("step")
    axes.set_ylabel("slots")
    usage = history[0].kv_usage
    axes.set_ylim(0, top)
    axes.set_xlim(0, max(len(history) - 1, 1))
    axes.legend(loc="upper right", fontsize=7)
    cut = f", axis cut at {top}" if top < usage.total_slots else ""
    axes.set_title(f"pool: {usage.num_blocks} blocks x {usage.block_size} = {usage.total_slots} slots{cut}",
                   fontsize=9)
    return _png(figure)


def _batch_figure(result: RunResult) -> str:
    history = result.recorder.history if result.recorder else []
    if not history:
        return "<p class=\"note\">no steps</p>"
    steps = np.arange(len(history))
    prefill = np.array([r.num_prefill_tokens for r in history])
    decode = np.array([r.num_decode_tokens for r in history])
    budget = result.recorder.max_num_batched_tokens
    figure = _figure(6.5, 3.2, f"batch composition ({result.kv_policy})")
    axes = figure.add_subplot()
    axes.bar(steps, prefill, width=0.9, color="#f0b030", label="prefill tokens")
    axes.bar(steps, decode, width=0.9, bottom=prefill, color="#40a040", label="decode tokens")
    axes.axhline(budget, color="#888888", linestyle="--", linewidth=1, label=f"budget ({budget})")
    axes.set_ylim(0, budget * 1.15)
    axes.set_xlabel("step")
    axes.set_ylabel("tokens in the step")
    axes.legend(loc="upper right", fontsize=7)
    return _png(figure)


def _timeline_figure(result: RunResult) -> str:
    recorder = result.recorder
    if recorder is None or not recorder.history:
        return "<p class=\"note\">no steps</p>"
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    request_ids = recorder.request_ids
    grid = np.array([[TIMELINE_CODES[r.states.get(request_id, " ")] for r in recorder.history]
                     for request_id in request_ids])
    figure = _figure(6.5, 0.9 + 0.3 * len(request_ids), f"timeline ({result.kv_policy})")
    axes = figure.add_subplot()
    axes.imshow(grid, cmap=ListedColormap(TIMELINE_COLOURS), vmin=0, vmax=len(TIMELINE_COLOURS) - 1,
                aspect="auto", interpolation="nearest")
    axes.set_yticks(range(len(request_ids)), request_ids, fontsize=8)
    axes.set_xlabel("step")
    axes.legend(handles=[Patch(color=c, label=n) for c, n in zip(TIMELINE_COLOURS[1:], TIMELINE_NAMES[1:])],
                loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=5, fontsize=7, frameon=False)
    return _png(figure)


def _texts(result: RunResult) -> str:
    parts = []
    for request_id, output in result.outputs.items():
        completion = output.outputs[0]
        parts.append(f"<p><b>{html.escape(request_id)}</b> ({html.escape(str(completion.finish_reason))}, "
                     f"{len(completion.token_ids)} tokens): <i>{html.escape(result.prompts[request_id][:200])}</i>"
                     f"</p><pre>{html.escape(completion.text)}</pre>")
    return "".join(parts)

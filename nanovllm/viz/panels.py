"""The panels: pure functions from a `VizState` (or the step history) to rich `Text`.

1. Attention: the last ~10 query positions of one sequence x the keys at the
   same positions (plus one column summing every earlier key), for the first
   heads of one layer, as shades `. - + * # @` of the softmax weight.
2. KV cache: the block pool as one bar (used slots / empty slots of live
   blocks / cached-but-free / free), the counts with percentages, and each
   request's blocks. Under the naive policy the empty slots of live blocks
   are mostly the reservation: max_model_len slots per sequence, used or not.
3. Scheduler: each request's state (prefill progress, tokens decoded, ...)
   and how the step's token budget was split between prefill and decode.
4. Timeline (at the end): one row per request, one column per step.

Live mode shows the Text with its colours; plain mode prints `Text.plain`,
which is ASCII. `frame` puts the three panels in boxes.
"""
from __future__ import annotations

import math

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from nanovllm.engine.block_manager import KVCacheUsage
from nanovllm.viz.attention import AttentionView
from nanovllm.viz.recorder import DECODE, FINISHED, PREEMPTED, PREFILL, WAITING, RequestView, StepRecord, VizState

# (upper bound of the weight, shade, colour): a weight below the bound gets the shade.
SHADES = [(0.05, ".", "grey42"), (0.15, "-", "grey70"), (0.30, "+", "yellow"), (0.50, "*", "orange1"),
          (0.75, "#", "red"), (math.inf, "@", "bold bright_red")]
MASKED = " "
EARLIER = "<"
BAR_WIDTH = 64
TEXT_TAIL = 36

USED, FRAGMENTATION, CACHED, FREE = "#", "~", "c", "."
KV_STYLES = {USED: "green", FRAGMENTATION: "yellow", CACHED: "cyan", FREE: "grey42"}
STATE_STYLES = {"upcoming": "grey42", "waiting": "grey70", "preempted": "magenta", "prefill": "yellow",
                "decode": "green", "done": "blue"}
TIMELINE_STYLES = {WAITING: "grey42", PREEMPTED: "magenta", PREFILL: "yellow", DECODE: "green",
                   FINISHED: "bold blue"}


def shade(weight: float) -> tuple[str, str]:
    """-> (character, colour) for one attention weight; NaN (a masked key) is blank."""
    if math.isnan(weight):
        return MASKED, ""
    for bound, char, style in SHADES:
        if weight < bound:
            return char, style
    raise AssertionError("unreachable: the last bound is infinite")


def token_label(text: str, width: int = 12) -> str:
    """A token's text, quoted, escaped to ASCII (control characters too: a raw \\r or \\x1b would break
    the frame) and cut to `width` characters."""
    unprintable_escaped = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)
    escaped = unprintable_escaped.encode("ascii", "backslashreplace").decode()
    label = "'" + escaped + "'"
    return label if len(label) <= width else label[:width - 3] + "..'"


# ---- 1. attention ----------------------------------------------------------------------------

def attention_panel(view: AttentionView | None, num_heads: int = 4, max_rows: int | None = None) -> Text:
    """The heat map of the first `num_heads` heads, rows labelled with their tokens' text
    (only the last `max_rows` queries if given, to fit a short terminal)."""
    if view is None:
        return Text("(no attention yet: the watched request has not run)", style="grey42")
    key_positions, weights = view.matrix()        # weights: [H, Q, 1 + K]
    heads = range(min(num_heads, view.num_heads))
    width = max(1 + len(key_positions), len(f"head {heads[-1]}"))   # one head's block of cells
    out = Text(no_wrap=True, overflow="crop")
    out.append(f"{view.request_id}, layer {view.layer}, heads {heads[0]}-{heads[-1]} of {view.num_heads}: "
               f"queries (rows) x keys (columns), weight = softmax(q.k / sqrt(d))\n")
    out.append(" " * 19 + "   ".join(f"head {h}".ljust(width) for h in heads).rstrip() + "\n")
    header = (EARLIER + "".join(str(i % 10) for i in range(len(key_positions)))).ljust(width)
    out.append("  pos token      i " + "   ".join(header for _ in heads).rstrip() + "\n")
    first_row = 0 if max_rows is None else max(0, len(view.query_positions) - max_rows)
    for i, position in enumerate(view.query_positions[first_row:], start=first_row):
        out.append(f"{position:5d} {token_label(view.tokens[position], 10):<10} {i % 10} ")
        for n, h in enumerate(heads):
            if n:
                out.append(" " * (width - weights.shape[2] + 3))
            for weight in weights[h, i].tolist():
                char, style = shade(weight)
                out.append(char, style=style)
        out.append("\n")
    out.append(" ".join(f"{char} <{bound:.0%}" for bound, char, _ in SHADES[:-1])
               + f" @ >={SHADES[-2][0]:.0%}   {EARLIER}: all earlier keys   blank: future (masked)", style="grey50")
    return out


# ---- 2. KV cache -----------------------------------------------------------------------------

def kv_counts(usage: KVCacheUsage) -> dict[str, int]:
    """Slots per bar segment: used, fragmentation, cached-free, free (not cached)."""
    cached = usage.cached_free_blocks * usage.block_size
    return {USED: usage.used_slots, FRAGMENTATION: usage.fragmentation_slots, CACHED: cached,
            FREE: usage.free_slots - cached}


def proportional_bar(counts: dict[str, int], width: int = BAR_WIDTH) -> str:
    """`width` characters split in proportion to counts (largest remainders); a non-zero count
    always gets at least one character."""
    total = sum(counts.values())
    if total == 0:
        return " " * width
    nonzero = [char for char, count in counts.items() if count]
    spare = width - len(nonzero)
    shares = {char: counts[char] / total * spare for char in nonzero}
    lengths = {char: 1 + int(share) for char, share in shares.items()}
    for char in sorted(nonzero, key=lambda c: shares[c] - int(shares[c]), reverse=True)[:width - sum(lengths.values())]:
        lengths[char] += 1
    return "".join(char * lengths.get(char, 0) for char in counts)


def kv_panel(state: VizState) -> Text:
    usage = state.kv_usage
    total = usage.total_slots
    counts = kv_counts(usage)
    naive = state.kv_policy == "naive"
    out = Text(no_wrap=True, overflow="crop")
    stored = f"{state.kv_cache_dtype} KV, " if state.kv_cache_dtype else ""
    out.append(f"pool: {usage.num_blocks} blocks x {usage.block_size} slots = {total} slots, "
               f"{stored}policy {state.kv_policy}\n")
    out.append("[")
    for char in proportional_bar(counts):
        out.append(char, style=KV_STYLES[char])
    out.append("]\n")
    waste = ("naive: max_model_len slots reserved per sequence" if naive
             else "empty slots at the end of live blocks")
    rows = [(USED, "used", usage.used_slots, "slots holding a computed token"),
            (FRAGMENTATION, "fragmentation", usage.fragmentation_slots, waste),
            (FREE, "free", usage.free_slots,
             f"incl. {counts[CACHED]} cached-free slots ({CACHED}): findable by prefix hash")]
    for char, name, slots, note in rows:
        out.append(char, style=KV_STYLES[char])
        out.append(f" {name:<13} {slots:7d} slots {slots / total:6.1%}   {note}\n")
    out.append("requests:")
    holders = [r for r in state.requests if r.num_blocks]
    for request in holders:
        shared = f", {request.num_shared_blocks} shared" if request.num_shared_blocks else ""
        out.append(f" [{request.request_id}: {request.num_blocks} blks{shared}]")
    if not holders:
        out.append(" none holds blocks")
    out.append(f"\nprefix cache: {usage.prefix_cache_hits}/{usage.prefix_cache_queries} looked-up tokens found "
               f"({usage.prefix_cache_hit_rate:.1%})")
    return out


# ---- 3. scheduler ----------------------------------------------------------------------------

def progress_bar(done: int, total: int, width: int = 12) -> str:
    filled = 0 if total <= 0 else min(width, round(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def scheduler_panel(state: VizState) -> Text:
    budget = state.max_num_batched_tokens
    prefill, decode = state.num_prefill_tokens, state.num_decode_tokens
    out = Text(no_wrap=True, overflow="crop")
    out.append(f"step {state.step}: token budget {budget} = prefill {prefill} + decode {decode} "
               f"+ unused {budget - prefill - decode} ({(prefill + decode) / budget:.0%} used)\n")
    scale = max(1, -(-budget // BAR_WIDTH))   # tokens per character
    out.append("[")
    out.append(PREFILL * -(-prefill // scale), style=TIMELINE_STYLES[PREFILL])
    out.append(DECODE * -(-decode // scale), style=TIMELINE_STYLES[DECODE])
    out.append("." * max(0, -(-budget // scale) - -(-prefill // scale) - -(-decode // scale)), style="grey42")
    out.append(f"]  1 char = {scale} token{'s' if scale > 1 else ''}\n")
    for request in state.requests:
        out.append(f"{request.request_id:<6} ")
        out.append(f"{request.state:<9}", style=STATE_STYLES[request.state])
        out.append(f" {_request_detail(request)}\n")
    out.rstrip()
    return out


def _request_detail(request: RequestView) -> str:
    tail = token_label(request.text[-TEXT_TAIL:], TEXT_TAIL + 2) if request.text else ""
    if request.state == "upcoming":
        return f"arrives at step {request.arrival_step}"
    if request.state in ("waiting", "preempted"):
        return f"{request.num_prompt_tokens} prompt tokens, {request.num_output_tokens} generated"
    if request.state == "prefill":
        return (f"{progress_bar(request.num_computed_tokens, request.prefill_target)} "
                f"{request.num_computed_tokens:4d}/{request.prefill_target} tokens computed")
    if request.state == "decode":
        return (f"{progress_bar(request.num_output_tokens, request.max_tokens)} "
                f"{request.num_output_tokens:4d}/{request.max_tokens} tokens generated  {tail}")
    return f"{request.num_output_tokens} tokens ({request.finish_reason})  {tail}"


# ---- 4. timeline -----------------------------------------------------------------------------

# When several steps share a column, the column shows the most telling of their states.
_PRECEDENCE = {FINISHED: 5, PREFILL: 4, DECODE: 3, PREEMPTED: 2, WAITING: 1, " ": 0}


def timeline_grid(history: list[StepRecord], request_ids: list[str], max_columns: int = 96) -> Text:
    """One row per request, one column per step (or per group of steps if there are many)."""
    steps_per_column = max(1, -(-len(history) // max_columns))
    columns = [history[i:i + steps_per_column] for i in range(0, len(history), steps_per_column)]
    out = Text(no_wrap=True, overflow="crop")
    unit = "1 step" if steps_per_column == 1 else f"{steps_per_column} steps"
    out.append(f"one column = {unit}:  {WAITING} waiting  {PREEMPTED} preempted  {PREFILL} prefill  "
               f"{DECODE} decode  {FINISHED} finished (its last step)\n")
    label_width = max([len(r) for r in request_ids] + [4]) + 1
    ruler = "".join("|" if i % 10 == 0 else " " for i in range(len(columns)))
    scale = "".join(str(i * steps_per_column).ljust(10) for i in range(0, len(columns), 10))
    out.append("step".ljust(label_width) + scale.rstrip() + "\n")
    out.append(" " * label_width + ruler + "\n")
    for request_id in request_ids:
        out.append(request_id.ljust(label_width))
        for column in columns:
            char = max((record.states.get(request_id, " ") for record in column), key=_PRECEDENCE.__getitem__)
            out.append(char, style=TIMELINE_STYLES.get(char, ""))
        out.append("\n")
    out.rstrip()
    return out


# ---- the frame -------------------------------------------------------------------------------

# Lines of the frame besides the heat map's rows: the attention panel's borders, title, headers and legend,
# the KV panel (borders + 7 lines), the scheduler panel's borders and its two budget lines.
_FRAME_LINES = 6 + 9 + 4


def frame(state: VizState, ascii_only: bool = False, height: int | None = None) -> Group:
    """The three panels, boxed (ASCII boxes for plain mode); fewer heat-map rows if `height` is short."""
    style = box.ASCII if ascii_only else box.ROUNDED
    max_rows = None if height is None else max(1, height - _FRAME_LINES - len(state.requests) - 1)
    attention_title = "1. attention" + (f" (layer {state.attention.layer} of {state.num_layers})"
                                        if state.attention is not None else "")
    return Group(
        Panel(attention_panel(state.attention, max_rows=max_rows), title=attention_title, title_align="left",
              box=style),
        Panel(kv_panel(state), title="2. KV cache", title_align="left", box=style),
        Panel(scheduler_panel(state), title=f"3. scheduler (step {state.step})", title_align="left", box=style),
    )

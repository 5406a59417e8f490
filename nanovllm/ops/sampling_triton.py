"""Triton version of ops/sampling.py's fused sampling pass: the vocabulary is streamed
once, each token's uniform number hashed in registers (the same 32-bit mixer as the
torch reference, in uint32 arithmetic that wraps mod 2**32), and the running winner
of logits / temperature - log(-log u) kept (or of the logits alone, for greedy rows).

On the way it finds the row's log-normalizer (an online logsumexp: a running max and
a sum of exponentials rescaled whenever the max grows) and the winner's raw logit, so
that the sampled token's log-probability costs nothing extra. The logits are read in
the model's dtype: at batch 256 a float32 copy of them alone took longer than this
whole pass. The torch path reads and writes the [B, V] logits five or six times for
the same results. Rows are split into chunks, each chunk's winner and (max, sum)
found by its own program, and a second small kernel combines a row's chunks.
The top-k / top-p path's race over masked scores is the same pass without a
temperature."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.ops.sampling_hash import _MIX_C1, _MIX_C2, _SALT_TOKEN

_MIX_C1_T = tl.constexpr(_MIX_C1)
_MIX_C2_T = tl.constexpr(_MIX_C2)
_SALT_TOKEN_T = tl.constexpr(_SALT_TOKEN)
BLOCK = 1024             # vocabulary entries a program loads at once (8 bf16 per thread: one 16-byte load)


@triton.jit
def _mix32(x):
    """x: uint32 -> uint32; the bijection of ops/sampling.py's _mix32."""
    x = x ^ (x >> 16)
    x = x * _MIX_C1_T
    x = x ^ (x >> 15)
    x = x * _MIX_C2_T
    x = x ^ (x >> 15)
    return x


@triton.jit
def _log_exponential(key, tokens):
    """log E for each token of a block, E = -log u the row's Exponential(1) draw (ops/sampling.py)."""
    bits = _mix32(key ^ _mix32(tokens.to(tl.uint32) ^ _SALT_TOKEN_T))
    uniform = tl.minimum(((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0), 1.0 - 1.0 / 16777216.0)
    return tl.log(-tl.log(uniform))


# Rows are split into chunks so that a small batch still fills the GPU (one program per row would leave
# a batch-1 step's 128k-token row to a single SM: ~180 us on an H200), and so that a large one has
# enough warps per SM to hide its instructions' latency: the pass hashes and takes two logarithms per
# token, and at batch 256 2 chunks a row (512 programs) took 174 us, 16 chunks 139 us.
TARGET_PROGRAMS = 4096   # batch 256: 16 chunks a row (tools/sampling_probe.py)
BATCH_INVARIANT_SPLITS = 16   # --batch-invariant: chunks a row whatever the batch (a row's log-normalizer
                              # adds its chunks up, so their number must not follow the batch size)
MAX_SPLITS = 128         # chunks per row at most (the combine kernel loads them in one block): a
                         # 128k vocabulary at batch 1 is then 126 programs of one block each


@triton.jit(do_not_specialize=["chunk_size", "num_splits"])
def _sample_from_logits_kernel(logits_ptr, keys_ptr, temperature_ptr,
                               score_ptr, token_ptr, logit_ptr, max_ptr, sum_ptr,
                               vocab_size, row_stride, chunk_size, num_splits,
                               GREEDY: tl.constexpr, SCALED: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, split): over one chunk of one row, the race's winner (its race value, token and
    logit) and the chunk's (max, sum of exponentials).

    Each of the BLOCK lanes keeps its own running values over the tokens it visits (start + lane,
    start + BLOCK + lane, ...): its best race value, that token and its logit, and an online
    logsumexp (max m, sum s of exp(x - m)). The lanes are reduced once, at the end: reducing the
    block at every step (four cross-warp reductions per 2,048 tokens) made the pass ~10x slower
    than reading the logits."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if not GREEDY:
        key = tl.load(keys_ptr + row).to(tl.uint32)
        inv_temperature = 1.0     # race = x * inv_temperature - noise * log E: noise 0 makes a greedy row
        noise = 1.0
        if SCALED:
            temperature = tl.load(temperature_ptr + row)
            inv_temperature = tl.where(temperature > 0.0, tl.math.div_rn(1.0, temperature), 1.0)
            noise = tl.where(temperature > 0.0, 1.0, 0.0)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_token = tl.zeros([BLOCK], tl.int32)
    best_logit = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK], tl.float32)
    chunk_start = split * chunk_size                      # chunk_size is a multiple of BLOCK
    chunk_end = tl.minimum(chunk_start + chunk_size, vocab_size)
    row_ptr = logits_ptr + row * row_stride
    for start in range(chunk_start, chunk_end, BLOCK):
        tokens = start + lanes
        in_vocab = tokens < vocab_size
        x = tl.load(row_ptr + tokens, mask=in_vocab, other=float("-inf")).to(tl.float32)
        # Online logsumexp with one exponential per token: of exp(m - x) and exp(x - m) one is 1.
        new_max = tl.maximum(lane_max, x)
        e = tl.exp(tl.minimum(lane_max, x) - new_max)
        e = tl.where(new_max == float("-inf"), 0.0, e)     # nothing finite seen yet (masked tokens)
        lane_sum = tl.where(x > lane_max, lane_sum * e + 1.0, lane_sum + e)
        lane_max = new_max
        if GREEDY:
            race = x
        elif SCALED:   # rounded as torch rounds (x * 1/t, then the subtraction: no fused multiply-add)
            race = tl.where(in_vocab, x * inv_temperature - noise * _log_exponential(key, tokens), float("-inf"))
        else:
            race = tl.where(in_vocab, x - _log_exponential(key, tokens), float("-inf"))
        better = race > best                               # strict: a lane's earlier token keeps a tie
        best = tl.where(better, race, best)
        best_token = tl.where(better, tokens, best_token)
        best_logit = tl.where(better, x, best_logit)
    # The winner over lanes: the best value, and of the lanes holding it the lowest token (as argmax).
    chunk_best = tl.max(best, axis=0)
    token = tl.min(tl.where(best == chunk_best, best_token, 2147483647), axis=0)
    logit = tl.max(tl.where(best_token == token, best_logit, float("-inf")), axis=0)
    chunk_max = tl.max(lane_max, axis=0)
    chunk_sum = tl.sum(tl.where(lane_max == float("-inf"), 0.0, lane_sum * tl.exp(lane_max - chunk_max)), axis=0)
    slot = row * num_splits + split
    tl.store(score_ptr + slot, chunk_best)
    tl.store(token_ptr + slot, token.to(tl.int64))
    tl.store(logit_ptr + slot, logit)
    tl.store(max_ptr + slot, chunk_max)
    tl.store(sum_ptr + slot, chunk_sum)


@triton.jit(do_not_specialize=["num_splits"])
def _combine_splits_kernel(score_ptr, token_ptr, logit_ptr, max_ptr, sum_ptr, out_ptr, logprob_ptr, lse_ptr,
                           num_splits, MAX_SPLITS: tl.constexpr):
    """Program row: the row's winner over its chunks (the first chunk wins a tie, so the lowest token
    does, as in argmax), its log-normalizer from the chunks' (max, sum of exponentials), and the
    winner's log-probability under the raw logits."""
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, MAX_SPLITS)
    valid = splits < num_splits
    slots = row * num_splits + splits
    # Every load at once, none behind the argmax: at batch 1 this kernel is a few round trips to memory.
    scores = tl.load(score_ptr + slots, mask=valid, other=float("-inf"))
    tokens = tl.load(token_ptr + slots, mask=valid, other=0)
    logits = tl.load(logit_ptr + slots, mask=valid, other=0.0)
    maxes = tl.load(max_ptr + slots, mask=valid, other=float("-inf"))
    sums = tl.load(sum_ptr + slots, mask=valid, other=0.0)
    winner = splits == tl.argmax(scores, axis=0)
    row_max = tl.max(maxes, axis=0)
    total = tl.sum(tl.where(maxes == float("-inf"), 0.0, sums * tl.exp(maxes - row_max)), axis=0)
    lse = row_max + tl.log(total)
    tl.store(out_ptr + row, tl.sum(tl.where(winner, tokens, 0), axis=0))
    tl.store(lse_ptr + row, lse)
    tl.store(logprob_ptr + row, tl.sum(tl.where(winner, logits, 0.0), axis=0) - lse)


def sample_from_logits_triton(logits: torch.Tensor, keys: torch.Tensor | None, temperature: torch.Tensor | None,
                              num_splits: int | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype, read as they are; rows may be strided), keys [B] int64 and
    temperature [B] float32 (or None: no scaling; 0 on a row: its argmax), or both None for the argmax
    -> (token ids [B] int64, their log-probabilities [B] float32, the log-normalizer [B] float32);
    see ops/sampling.py. num_splits: chunks per row (default: enough for about TARGET_PROGRAMS programs);
    out: contiguous [B] int64 and float32 tensors for the token ids and log-probabilities."""
    num_rows, vocab_size = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_blocks = triton.cdiv(vocab_size, BLOCK)
    if num_splits is None:
        num_splits = triton.cdiv(TARGET_PROGRAMS, num_rows)
    num_splits = max(1, min(num_splits, MAX_SPLITS, num_blocks))
    chunk_size = triton.cdiv(num_blocks, num_splits) * BLOCK
    num_splits = triton.cdiv(vocab_size, chunk_size)      # no empty chunk
    device = logits.device
    score, logit, part_max, part_sum = (torch.empty(num_rows, num_splits, dtype=torch.float32, device=device)
                                        for _ in range(4))                                   # [B, S] each
    token = torch.empty(num_rows, num_splits, dtype=torch.int64, device=device)
    greedy, scaled = keys is None, temperature is not None
    _sample_from_logits_kernel[(num_rows, num_splits)](
        logits, token if greedy else keys, temperature if scaled else score, score, token, logit, part_max, part_sum,
        vocab_size, logits.stride(0), chunk_size, num_splits, GREEDY=greedy, SCALED=scaled, BLOCK=BLOCK,
        num_warps=4, enable_fp_fusion=False)   # the race's rounding must be torch's, or near-ties could differ
    if out is None:
        out = (torch.empty(num_rows, dtype=torch.int64, device=device),
               torch.empty(num_rows, dtype=torch.float32, device=device))
    out, logprob = out
    lse = torch.empty(num_rows, dtype=torch.float32, device=device)
    _combine_splits_kernel[(num_rows,)](score, token, logit, part_max, part_sum, out, logprob, lse, num_splits,
                                        MAX_SPLITS=MAX_SPLITS)
    return out, logprob, lse


def exponential_race_triton(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """scores [B, V] float32 (-inf = excluded), keys [B] int64 -> token ids [B] int64 (see ops/sampling.py):
    the fused pass without a temperature."""
    return sample_from_logits_triton(scores, keys, None)[0]

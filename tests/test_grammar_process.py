"""The grammar process: its masks are those of an in-process xgrammar matcher (the oracle), row
for row, whatever the order in which sequences come, go and bring their tokens; what it reports
back (a finished grammar, a rejected token) reaches the engine's states; and its death fails the
constrained requests with an error, never a hang, while the others go on."""
from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
import torch

from nanovllm.bench.workloads import BENCH_JSON_SCHEMA
from nanovllm.sampling_params import SamplingParams
from nanovllm.structured import StructuredOutputsParams

xgr = pytest.importorskip("xgrammar")

from nanovllm.structured import grammar_process   # noqa: E402  (after the skip: it needs xgrammar)
from nanovllm.structured.grammar import PENDING, GrammarCompiler   # noqa: E402
from nanovllm.structured.grammar_process import GrammarBitmask, GrammarProcessError   # noqa: E402

SCHEMA = StructuredOutputsParams(json=BENCH_JSON_SCHEMA)
# Short outputs with choices on the way: a random walk under it ends (a stop token) in a few dozen steps.
WALK_SCHEMA = StructuredOutputsParams(json={
    "type": "object",
    "properties": {"r": {"enum": ["admin", "user"]},
                   "t": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
                   "z": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["r", "t", "z"]})
DIGITS = StructuredOutputsParams(regex="[0-9]{1,3}")


@pytest.fixture(scope="module")
def compiler(tiny_llama_loaded) -> GrammarCompiler:
    _, _, tokenizer = tiny_llama_loaded
    return GrammarCompiler(tokenizer, tokenizer.vocab_size, tokenizer.eos_token_ids)


@pytest.fixture(scope="module")
def masks(compiler) -> GrammarBitmask:
    masks = GrammarBitmask(8, compiler, "cpu", threads=2)
    yield masks
    masks.close()


def oracle_row(compiler: GrammarCompiler, matcher, terminated: bool, failed: bool) -> torch.Tensor:
    """The row an in-process xgrammar matcher fills: the stop tokens alone once it is done, and no bit
    past the vocabulary."""
    width = -(-compiler.vocab_size // 32)
    row = torch.zeros(width, dtype=torch.int32)
    if terminated or failed:
        for token_id in compiler.stop_token_ids:
            row[token_id // 32] |= torch.tensor(1, dtype=torch.int64).bitwise_left_shift(token_id % 32).to(torch.int32)
        return row
    bitmask = xgr.allocate_token_bitmask(1, compiler.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    row.copy_(bitmask[0])
    words = [1 if index < compiler.vocab_size - 32 * (width - 1) else 0 for index in range(32)]
    row[-1] &= torch.tensor(sum(bit << index for index, bit in enumerate(words))).to(torch.int32)
    return row


def allowed(row: torch.Tensor, vocab_size: int) -> list[int]:
    return [token for token in range(vocab_size) if (int(row[token // 32]) >> (token % 32)) & 1]


def test_every_mask_row_equals_an_in_process_matchers_over_random_json_schema_walks(compiler, masks):
    """Rows come and go (a new sequence, a finished one forgotten, rows reordered), some bring a
    placeholder whose id comes late (async scheduling), one a backlog longer than a request carries,
    some draw a token the grammar rejects: every step, every row is the oracle's."""
    rng = random.Random(0)
    compiled = compiler.compile(WALK_SCHEMA.key)
    walkers = []   # [state, output token ids, oracle matcher, oracle failed]

    def new_walker(tokens: list[int]) -> list:
        """A sequence whose output starts with the longest prefix of tokens its grammar takes."""
        oracle, prefix = xgr.GrammarMatcher(compiled), []
        for token_id in tokens:
            if oracle.is_terminated() or not oracle.accept_token(token_id):
                break
            prefix.append(token_id)
        return [compiler.new_state(WALK_SCHEMA), prefix, oracle, False]

    first = new_walker([])
    walkers.append(first)
    saw = {"pending": 0, "reject": 0, "backlog": 0, "terminated": 0}
    for step in range(60):
        if step % 5 == 3 and len(walkers) < 8:   # a new sequence, sometimes behind a long backlog
            walkers.append(new_walker(first[1][:6]))
            saw["backlog"] += len(walkers[-1][1]) > grammar_process.MAX_TOKENS_PER_ROW
        if step % 11 == 10 and len(walkers) > 2:
            walkers.pop(1)                        # a finished sequence: its state is collected
        rng.shuffle(walkers)
        outputs, newest = [], []
        for walker in walkers:
            ids = list(walker[1])
            late = ids and rng.random() < 0.3 and walker[0].num_accepted < len(ids)
            newest.append(ids[-1] if late else PENDING)
            if late:
                ids[-1] = PENDING
                saw["pending"] += 1
            outputs.append(ids)
        bitmask, rows = masks.build([walker[0] for walker in walkers], outputs, list(range(len(walkers))), newest)
        for row, walker in enumerate(walkers):
            state, ids, oracle, failed = walker
            assert state.failed == failed and state.terminated == oracle.is_terminated()
            expected = oracle_row(compiler, oracle, oracle.is_terminated(), failed)
            assert torch.equal(bitmask[row], expected), (step, row)
            choices = allowed(expected, compiler.vocab_size)
            if rng.random() < 0.05 and not state.is_done:   # a token the grammar rejects
                token_id = next(token for token in range(compiler.vocab_size) if token not in choices)
                walker[3] = True
                saw["reject"] += 1
            else:
                token_id = rng.choice(choices)
                if not state.is_done:
                    assert oracle.accept_token(token_id)
                    saw["terminated"] += oracle.is_terminated()
            ids.append(token_id)
    assert all(saw.values()), saw


def test_a_finished_grammar_allows_only_the_stop_tokens_and_says_so(compiler, masks):
    digit = compiler.tokenizer_info.decoded_vocab.index(b"7")
    stop = min(compiler.stop_token_ids)
    states = [compiler.new_state(DIGITS) for _ in range(2)]
    masks.build(states, [[digit], [digit]], [0, 1])
    bitmask, _ = masks.build(states, [[digit, stop], [digit, digit]], [0, 1])
    assert states[0].terminated and not states[0].failed and not states[1].is_done
    assert allowed(bitmask[0], compiler.vocab_size) == sorted(compiler.stop_token_ids)
    assert digit in allowed(bitmask[1], compiler.vocab_size)


def test_a_rejected_token_ends_its_row_alone(compiler, masks):
    digit = compiler.tokenizer_info.decoded_vocab.index(b"7")
    letter = compiler.tokenizer_info.decoded_vocab.index(b"q")
    states = [compiler.new_state(DIGITS) for _ in range(3)]
    bitmask, _ = masks.build(states, [[digit], [letter], [digit]], [0, 1, 2])
    assert [state.failed for state in states] == [False, True, False]
    assert allowed(bitmask[1], compiler.vocab_size) == sorted(compiler.stop_token_ids)
    assert digit in allowed(bitmask[0], compiler.vocab_size) and torch.equal(bitmask[0], bitmask[2])


def test_each_row_takes_its_tokens_in_order_within_and_across_requests(compiler, masks):
    """A letter, a digit, a letter: the two tokens of the first request in any other order would be
    refused, and after the third only a stop token may follow."""
    letter_a, one, letter_b = (compiler.tokenizer_info.decoded_vocab.index(text) for text in (b"a", b"1", b"b"))
    state = compiler.new_state(StructuredOutputsParams(regex="[a-z][0-9][a-z]"))
    masks.build([state], [[letter_a, one]], [0])
    bitmask, _ = masks.build([state], [[letter_a, one, letter_b]], [0])
    assert state.num_accepted == 3 and not state.failed
    assert allowed(bitmask[0], compiler.vocab_size) == sorted(compiler.stop_token_ids)


def test_a_dead_grammar_process_raises_a_clear_error_at_once_not_a_hang(compiler):
    masks = GrammarBitmask(4, compiler, "cpu", threads=1)
    state = compiler.new_state(DIGITS)
    masks.build([state], [[]], [0])
    started = masks.start([state], [[compiler.tokenizer_info.decoded_vocab.index(b"1")]])
    os.kill(masks.process.pid, signal.SIGKILL)
    begin = time.monotonic()
    with pytest.raises(GrammarProcessError, match=r"grammar process exited \(exit code -9\)"):
        masks.finish(started, [0])   # whether or not it answered before it died, the next step finds it dead
        masks.build([state], [[1]], [0])
    assert time.monotonic() - begin < 5.0
    with pytest.raises(GrammarProcessError, match="exit code -9"):
        masks.build([state], [[1]], [0])
    masks.close()


def test_the_grammar_process_ends_with_its_masks(compiler):
    masks = GrammarBitmask(4, compiler, "cpu", threads=1)
    masks.build([compiler.new_state(DIGITS)], [[]], [0])
    process = masks.process
    masks.close()
    assert not process.is_alive() and process.exitcode == 0


def test_a_dead_grammar_process_ends_the_constrained_requests_with_an_error_and_no_other(make_engine):
    engine = make_engine(max_num_seqs=4)
    free = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    constrained = SamplingParams(temperature=1.0, seed=1, max_tokens=6, structured_outputs={"regex": "[a-z]+"})
    engine.add_request("warm", [5, 6, 7], constrained)   # the grammar process starts and serves a request
    while engine.has_unfinished_requests():
        engine.step()
    os.kill(engine.runner.grammar_masks.process.pid, signal.SIGKILL)
    engine.runner.grammar_masks.process.join(5.0)
    engine.add_request("free", [5, 6, 7], free)
    engine.add_request("constrained", [5, 6, 7], constrained)
    engine.add_request("constrained too", [8, 9], constrained)
    finals, ended_at = {}, {}
    begin = time.monotonic()
    for step in range(100):
        if not engine.has_unfinished_requests() or time.monotonic() - begin > 60:
            break
        for output in engine.step():
            if output.finished:
                finals[output.request_id], ended_at[output.request_id] = output, step
    for request_id in ("constrained", "constrained too"):
        assert finals[request_id].outputs[0].finish_reason == "error"
        assert "grammar process exited" in finals[request_id].error
        assert not finals[request_id].error_in_request   # the engine's fault (HTTP 500), not the request's
    assert ended_at["constrained"] == ended_at["constrained too"]   # the step that found the process dead
    assert finals["free"].outputs[0].finish_reason == "length" and len(finals["free"].outputs[0].token_ids) == 6
    engine.shutdown()


def test_the_compiler_made_from_its_spec_compiles_the_same_grammar(compiler):
    again = GrammarCompiler.from_spec(json.loads(json.dumps(compiler.spec())))
    assert again.vocab_size == compiler.vocab_size and again.stop_token_ids == compiler.stop_token_ids
    assert again.compile(SCHEMA.key).serialize_json() == compiler.compile(SCHEMA.key).serialize_json()


def test_a_request_the_process_fails_raises_its_error_and_the_next_request_is_served(compiler, masks):
    stray = compiler.new_state(DIGITS)
    masks.build([stray], [[]], [0])
    stray.slot += 10**6                       # a matcher the process never made
    with pytest.raises(GrammarProcessError, match="failed on request .*KeyError"):
        masks.build([stray], [[]], [0])
    state = compiler.new_state(DIGITS)
    bitmask, _ = masks.build([state], [[]], [0])
    assert compiler.tokenizer_info.decoded_vocab.index(b"7") in allowed(bitmask[0], compiler.vocab_size)


@pytest.mark.gpu
def test_on_a_gpu_the_masks_reach_the_device_from_the_pinned_shared_rows(compiler):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    masks = GrammarBitmask(4, compiler, "cuda", threads=2)
    letter = compiler.tokenizer_info.decoded_vocab.index(b"q")
    states = [compiler.new_state(DIGITS) for _ in range(2)]
    bitmask, rows = masks.build(states, [[], [letter]], [3, 1])
    host = masks.host[:2].clone()
    torch.cuda.synchronize()
    assert bitmask.is_cuda and rows.tolist() == [3, 1] and torch.equal(bitmask.cpu(), host)
    assert allowed(host[1], compiler.vocab_size) == sorted(compiler.stop_token_ids) != allowed(host[0], compiler.vocab_size)
    masks.close()

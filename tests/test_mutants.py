"""Sixteen planted bugs that the fast tests must keep catching (tests/MUTANTS.md has the full mutmut runs).

Each row is a one-line bug of a kind mutmut made and a test once missed: the source line as it is, the
line with the bug, and the tests that must now fail. The test copies the package into a temporary
folder, plants the bug there, and runs those tests against the copy in a fresh interpreter. A row whose
original line no longer exists fails too: the table follows the code, or it would test nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    path: str                 # under nanovllm/
    original: str             # the source as it is: must occur exactly once in the file
    mutated: str              # the planted bug
    killed_by: tuple[str, ...]  # test ids (from the repository root) of which at least one must fail

    @property
    def name(self) -> str:
        return f"{self.path}: {self.mutated.strip()}"


MUTANTS = [
    Mutant("engine/block_manager.py", "seq.num_hashed_blocks = 0", "seq.num_hashed_blocks = 1",
           ("tests/test_block_manager.py::test_a_preempted_sequence_rehashes_its_blocks_when_it_runs_again",)),
    Mutant("engine/scheduler.py", "victim = self.running[-1]", "victim = self.running[1]",
           ("tests/test_scheduler.py::test_the_newest_of_three_running_sequences_is_the_one_preempted",)),
    Mutant("engine/scheduler.py", "return num_new_tokens == 1 and seq.num_computed_tokens",
           "return num_new_tokens == 1 or seq.num_computed_tokens",
           ("tests/test_scheduler.py::test_decodes_and_prompt_chunks_are_counted_apart_even_a_one_token_chunk",)),
    Mutant("engine/scheduler.py", "search_from = max(len(text) - num_new_chars - len(stop) + 1, 0)",
           "search_from = max(len(text) - num_new_chars - len(stop) - 1, 0)",
           ("tests/test_scheduler.py::test_a_stop_string_counts_only_where_it_ends_in_the_new_text",)),
    Mutant("engine/sequence.py", "del self.token_ids[-self.num_pending:]", "del self.token_ids[self.num_pending:]",
           ("tests/test_scheduler.py::test_tokens_arrive_into_placeholders_and_a_finished_sequence_drops_the_pending_ones",)),
    Mutant("engine/sequence.py", "self.cumulative_logprob += logprob", "self.cumulative_logprob = logprob",
           ("tests/test_scheduler.py::test_log_probabilities_add_up_and_each_entry_holds_the_top_ones_and_the_sampled_token",)),
    Mutant("runner/sampler.py", "padded = np.full((len(rows), max((len(r) for r in rows), default=0)), -1,",
           "padded = np.full((len(rows), max((len(r) for r in rows), default=0)), 1,",
           ("tests/test_sampler.py::test_penalties_change_exactly_the_logits_of_seen_tokens",)),
    Mutant("runner/sampler.py", "temperature = torch.where(batch.is_greedy, 0.0, temperature)",
           "temperature = torch.where(batch.is_greedy, 1.0, temperature)",
           ("tests/test_sampler.py::test_greedy_rows_of_a_plain_mixed_batch_take_the_argmax_whatever_the_seed",)),
    Mutant("runner/sampler.py", "mass_before >= batch.top_p[:, None]", "mass_before > batch.top_p[:, None]",
           ("tests/test_sampler.py::test_top_p_drops_the_token_whose_preceding_mass_equals_it_exactly",)),
    Mutant("runner/sampler.py", "logits.index_put_((rows, token_ids), biases, accumulate=True)",
           "logits.index_put_((rows, token_ids), biases, accumulate=False)",
           ("tests/test_sampler.py::test_logit_bias_is_added_to_its_own_rows_logits_only",)),
    Mutant("ops/sampling.py", "x = x ^ (x >> 16)", "x = x ^ (x >> 15)",
           ("tests/test_sampler.py::test_random_stream_is_the_hash_computed_with_python_integers",)),
    Mutant("ops/attention_metadata.py", "mask = (keys[None, :] < seq_lens[:, None])", "mask = (keys[None, :] <= seq_lens[:, None])",
           ("tests/test_cpu_ops.py::test_decode_context_is_derived_once_per_step_and_again_for_a_new_step",)),
    Mutant("ops/rotary.py", "x.mul_(cos_cos).add_(rolled)", "x.mul_(cos_cos).sub_(rolled)",
           ("tests/test_cpu_ops.py::test_rotary_is_the_rotate_half_formula_bit_for_bit[True-6-4-2-32-dtype0]",)),
    Mutant("engine/engine.py", "if request_id in ended and all(sample.is_finished for sample in seqs):",
           "if request_id in ended and any(sample.is_finished for sample in seqs):",
           ("tests/test_engine_outputs.py::test_samples_that_end_apart_give_one_output_a_step_and_the_last_ones_times",)),
    Mutant("ops/quant_linear.py", "weight = dequantize_w4(qweight, scales, zeros).to(x.dtype)",
           "weight = dequantize_w4(qweight, scales, zeros)",
           ("tests/test_quant_references.py::test_w4a16_reference_rounds_the_weight_to_xs_dtype_and_adds_up_in_float32"
            "[False-dtype1]",)),
    Mutant("ops/quant.py", "candidates = top_k_indices(logits, min(self.top_k, logits.shape[-1]))",
           "candidates = top_k_indices(logits, min(self.top_k, logits.shape[-2]))",
           ("tests/test_cpu_formats.py::test_the_refined_lm_head_recomputes_each_rows_top_k_logits_in_float32",)),
]


def _run_against_mutant(mutant: Mutant, folder: Path, model_cache: Path) -> subprocess.CompletedProcess:
    package = folder / "nanovllm"
    shutil.copytree(REPO / "nanovllm", package, ignore=shutil.ignore_patterns("__pycache__"))
    source_file = package / mutant.path
    source = source_file.read_text()
    assert source.count(mutant.original) == 1, f"{mutant.path} no longer holds exactly one {mutant.original!r}"
    source_file.write_text(source.replace(mutant.original, mutant.mutated))
    # -P keeps the working directory (the repository, whose nanovllm is unmutated) off sys.path.
    # The engine's tests write their tiny model once for every row (conftest.TINY_MODEL_CACHE).
    env = dict(os.environ, PYTHONPATH=str(folder), OMP_NUM_THREADS="1", NANOVLLM_TINY_MODEL_CACHE=str(model_cache))
    return subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           *mutant.killed_by], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def mutant_runs(request, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Each selected row's run, two at a time (a run is one interpreter on one thread, mostly starting
    up, so two share the two cores of a small machine): row name -> its pytest run."""
    from concurrent.futures import ThreadPoolExecutor

    selected = [item.callspec.params["mutant"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    model_cache = tmp_path_factory.mktemp("tiny-models")
    folders = [tmp_path_factory.mktemp("mutant") for _ in selected]
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = pool.map(lambda mutant, folder: _run_against_mutant(mutant, folder, model_cache), selected, folders)
        return {mutant.name: run for mutant, run in zip(selected, runs)}


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_the_named_tests_kill_the_planted_bug(mutant: Mutant, mutant_runs: dict[str, subprocess.CompletedProcess]):
    result = mutant_runs[mutant.name]
    summary = result.stdout.strip().splitlines()[-1:] or ["no output"]
    assert result.returncode == 1, (f"{mutant.name}: pytest exited {result.returncode} ({summary[0]}); "
                                    "1 means the bug was caught, 0 that it survived\n" + result.stdout[-2000:])
    assert "failed" in summary[0], summary[0]

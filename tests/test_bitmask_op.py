"""The grammar bitmask op: the Triton kernel writes exactly what the torch reference writes (checked
on the CPU under Triton's interpreter, in a fresh Python with TRITON_INTERPRET=1, as in
test_ops_triton.py), and the reference itself agrees with a bit-by-bit reading of the mask."""
from __future__ import annotations


import pytest
import torch

from nanovllm.ops.bitmask import apply_token_bitmask, apply_token_bitmask_torch
from conftest import IN_INTERPRETER, run_in_interpreter



def _case(num_rows: int, vocab_size: int, masked_rows: list[int], seed: int, mask_vocab_size: int | None = None):
    """mask_vocab_size: the tokens the mask covers (fewer than the logits' V when the LM head is padded)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab_size, generator=generator)                            # [B, V]
    words = -(-(mask_vocab_size or vocab_size) // 32)
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(masked_rows), words), dtype=torch.int32,
                            generator=generator)                                              # [R, W]
    return logits, bitmask, torch.tensor(masked_rows, dtype=torch.int64)


def test_the_reference_masks_each_token_whose_bit_is_zero_and_nothing_else():
    logits, bitmask, rows = _case(4, 77, [3, 1], seed=0)
    masked = logits.clone()
    apply_token_bitmask_torch(masked, bitmask, rows)
    for masked_row, row in enumerate(rows.tolist()):
        for token in range(77):
            allowed = (int(bitmask[masked_row, token // 32]) >> (token % 32)) & 1
            assert masked[row, token].item() == (logits[row, token].item() if allowed else float("-inf"))
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])


def test_a_bitmask_narrower_than_the_logits_disallows_every_token_past_its_last_word():
    logits, bitmask, rows = _case(3, 200, [2, 0], seed=1, mask_vocab_size=70)   # 3 words: tokens 0..95
    masked = logits.clone()
    apply_token_bitmask(masked, bitmask, rows)
    assert torch.isinf(masked[[2, 0], 96:]).all() and torch.equal(masked[1], logits[1])
    allowed = (bitmask[:, :, None] >> torch.arange(32)) & 1                                # [R, 3, 32]
    assert torch.equal(torch.isfinite(masked[[2, 0], :96]), allowed.flatten(1) == 1)


def test_a_bitmask_wider_than_the_vocabulary_or_of_other_rows_is_refused():
    logits, bitmask, rows = _case(2, 65, [0], seed=1)
    with pytest.raises(ValueError, match="ceil"):
        apply_token_bitmask(logits, torch.cat([bitmask, bitmask], dim=1), rows)
    with pytest.raises(ValueError, match="ceil"):
        apply_token_bitmask(logits, bitmask, torch.tensor([0, 1]))


@pytest.mark.interpreter_run("-k", "kernel_case")
@pytest.mark.skipif(IN_INTERPRETER, reason="the subprocess itself")
def test_the_triton_kernel_matches_the_reference_in_the_interpreter():
    run_in_interpreter(__file__, "-k", "kernel_case")


@pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the TRITON_INTERPRET=1 subprocess")
@pytest.mark.parametrize("num_rows, vocab_size, masked_rows, mask_vocab_size",
                         [(1, 1, [0], None), (3, 31, [2], None), (5, 33, [4, 0, 2], None), (2, 4097, [1], None),
                          (4, 5003, [0, 1, 2, 3], None), (3, 5003, [2, 1], 4100), (2, 9000, [0], 1)])
def test_kernel_case(num_rows, vocab_size, masked_rows, mask_vocab_size):
    from nanovllm.ops.bitmask_triton import apply_token_bitmask_triton
    logits, bitmask, rows = _case(num_rows, vocab_size, masked_rows, seed=vocab_size, mask_vocab_size=mask_vocab_size)
    expected, got = logits.clone(), logits.clone()
    apply_token_bitmask_torch(expected, bitmask, rows)
    apply_token_bitmask_triton(got, bitmask, rows)
    assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows, vocab_size, masked_rows, mask_vocab_size",
                         [(3, 33, [2, 0], None), (256, 128256, list(range(0, 256, 2)), None), (1, 151936, [0], None),
                          (256, 128256, list(range(1, 256, 2)), 49152)])
def test_the_kernel_on_a_gpu_matches_the_reference(num_rows, vocab_size, masked_rows, mask_vocab_size, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    logits, bitmask, rows = _case(num_rows, vocab_size, masked_rows, seed=3, mask_vocab_size=mask_vocab_size)
    logits = logits.to(dtype)
    expected = logits.clone()
    apply_token_bitmask_torch(expected, bitmask, rows)
    got = logits.cuda()
    apply_token_bitmask(got, bitmask.cuda(), rows.cuda())
    assert torch.equal(got.cpu(), expected)

"""advise_huge_pages asks for 2 MB pages over exactly the whole 2 MB pages inside a tensor's storage."""
from __future__ import annotations

import torch

from nanovllm.ops import huge_pages


def _recording(monkeypatch, result: int = 0) -> list[tuple[int, int, int]]:
    calls: list[tuple[int, int, int]] = []

    def madvise(address, length, advice):
        calls.append((address, length, advice))
        return result

    monkeypatch.setattr(huge_pages, "_madvise", lambda: madvise)
    return calls


def test_the_advice_covers_the_whole_huge_pages_inside_the_storage(monkeypatch):
    calls = _recording(monkeypatch)
    tensor = torch.empty(5 * huge_pages.HUGE_PAGE // 4 + 123, dtype=torch.float32)     # ~5 MB, alignment unknown
    start = tensor.untyped_storage().data_ptr()
    end = start + tensor.untyped_storage().nbytes()
    assert huge_pages.advise_huge_pages(tensor[7:], collapse=True)         # a view: its storage is advised
    (first, length, advice), (first_again, length_again, collapse) = calls
    assert (advice, collapse) == (huge_pages.MADV_HUGEPAGE, huge_pages.MADV_COLLAPSE)
    assert (first, length) == (first_again, length_again)
    assert first % huge_pages.HUGE_PAGE == 0 and length % huge_pages.HUGE_PAGE == 0 and length > 0
    assert start <= first < start + huge_pages.HUGE_PAGE and end - huge_pages.HUGE_PAGE < first + length <= end


def test_no_advice_where_no_whole_huge_page_fits_or_the_kernel_refuses(monkeypatch):
    calls = _recording(monkeypatch, result=-1)
    assert not huge_pages.advise_huge_pages(torch.empty(1000))
    assert calls == []
    assert not huge_pages.advise_huge_pages(torch.empty(4 * huge_pages.HUGE_PAGE, dtype=torch.uint8), collapse=True)
    assert [advice for _, _, advice in calls] == [huge_pages.MADV_HUGEPAGE]        # refused: no collapse asked

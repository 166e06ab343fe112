"""lpt_core/runtime.py: torch_threads sets the threads inside its block and gives the process its own back."""
from __future__ import annotations

import pytest
import torch

from lpt_core.runtime import torch_threads


@pytest.mark.parametrize("threads, inside", [(1, 1), (3, 3), (None, 2)])
def test_torch_threads_inside_the_block_and_restored_after(threads: int | None, inside: int) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch_threads(threads):
            assert torch.get_num_threads() == inside
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), torch_threads(threads):
            raise RuntimeError("a failed pretraining")
        assert torch.get_num_threads() == 2  # restored on the way out of an error too
    finally:
        torch.set_num_threads(before)

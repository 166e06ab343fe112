"""FLOPs of one training step as executed: every matmul, convolution and attention of the forward and backward.

torch's FlopCounterMode counts the CUDA attention kernels but not the CPU flash-attention kernel that
`F.scaled_dot_product_attention` dispatches to on CPU, so those two are added here with torch's own formulas.
What is counted is what runs: the no-grad query pass, the prompt key/value projections, the prompted blocks, and
the backward (input gradients only for the frozen weights; the attention backward's score recomputation too).
Elementwise work (norms, GELU, softmax, the loss) is not counted, as is usual for model FLOP utilisation.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils import flop_counter



def _attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


_CPU_ATTENTION = {  # FlopCounterMode hands these the tensors' shapes
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward,
}


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs (multiply and add counted separately) of one call of `fn`."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    with counter:
        fn()
    return counter.get_total_flops()

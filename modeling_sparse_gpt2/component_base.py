"""What every UltraEfficientSparseFFN component shares.

A *GEMM component* reads the FFN input through its rows of the FFN's down-projection ``c_fc``, does
elementwise (or per-channel, or causal) work on the result, and writes back through its columns of
the up-projection ``c_proj``:

    y_c = W_out_c · act_c(W_in_c · x + b_in_c)      (W_in_c: rows of c_fc, W_out_c: columns of c_proj)

The weights of all GEMM components are stored side by side in those two ``nn.Linear`` modules (named
as in GPT-2's MLP), so the FFN runs as two GEMMs with the middle stage in between, no weight is
concatenated at run time, and tools written for GPT-2 (peft's LoRA, quantisers) reach them. A
component object holds only its own small parameters (Chebyshev coefficients, the feedback taps) and
its width ``rows``; ``UltraEfficientSparseFFN.w_in(name)`` / ``b_in(name)`` / ``w_out(name)`` give
the views of its slices.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class FFNContext:
    """Per-call information a component may need besides ``x``.

    ``cache`` is the model's ``Cache`` (decode-time state of the token feedback lives on it) and
    ``token_mask`` is the ``(batch, seq)`` 0/1 mask of real tokens (0 marks padding).
    """

    cache: Any = None
    token_mask: torch.Tensor | None = None
    layer_idx: int = 0


class GemmComponent(nn.Module):
    """Base of the components whose projections are slices of the FFN's ``c_fc`` and ``c_proj``."""

    def __init__(self, d: int, rows: int):
        super().__init__()
        self.d = d
        self.rows = rows

    def activate(self, h: torch.Tensor, ctx: FFNContext) -> torch.Tensor:
        """Elementwise / per-channel work on this component's slice of the down-projection."""
        return h

    def matmul_flops_per_token(self) -> int:
        """Multiply-adds x 2 of its rows of c_fc and columns of c_proj, per token."""
        return 2 * 2 * self.d * self.rows

    def elementwise_flops_per_token(self) -> int:
        return 0

"""What every UltraEfficientSparseFFN component shares.

A *GEMM component* reads the FFN input through a down-projection, does elementwise (or per-channel)
work on the result, and writes back through an up-projection:

    y_c = W_up · act_c(W_down · x + b_down)

Because every GEMM component reads the same ``x`` and writes the same ``y``, the FFN's fast path
concatenates all their ``W_down`` into one GEMM and all their ``W_up`` into another (DESIGN.md §2);
the per-component ``forward`` below is the reference path the fast path is tested against.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
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
    """Base of the components that ride inside the fused down- and up-projection GEMMs."""

    name: str = ""

    def down(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W_down, b_down)``: rows of the shared down-projection GEMM (shape ``rows x d``)."""
        raise NotImplementedError

    def up(self) -> torch.Tensor:
        """``W_up`` (shape ``d x rows``): columns of the shared up-projection GEMM."""
        return self.w_out

    def activate(self, h: torch.Tensor, ctx: FFNContext) -> torch.Tensor:
        """Elementwise / per-channel work on this component's slice of the down-projection."""
        return h

    @property
    def rows(self) -> int:
        return self.w_out.shape[1]

    def forward(self, x: torch.Tensor, ctx: FFNContext | None = None) -> torch.Tensor:
        w, b = self.down()
        return F.linear(self.activate(F.linear(x, w, b), ctx or FFNContext()), self.up())

    def matmul_flops_per_token(self) -> int:
        """Multiply-adds x 2 of the down and up projections, per token."""
        d = self.w_out.shape[0]
        return 2 * 2 * d * self.rows

    def elementwise_flops_per_token(self) -> int:
        return 0

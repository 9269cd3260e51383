"""Residual gates: how much of each component reaches the FFN output.

    y = b + sum_c g_c * tau_c(x) * y_c         then dropout(resid_pdrop)

``g_c`` is a learned per-channel vector (d) for every component. With ``gate_kind="token"`` each
component is also scaled per token by ``tau_c(x) = 2 sigmoid(w_c . x + beta_c)`` (1 at init); its
``C`` rows ``w_c`` ride in the fused down-projection GEMM. In the fused path the channel gates are
folded into the up-projection's columns, and ``tau`` multiplies the component's activations.

FLOPs per token: matmul 2·d·C for token gates (C active components); elementwise ~2·d·C.
"""

import torch
from torch import nn


class ResidualGates(nn.Module):
    def __init__(self, components: tuple, d: int, token: bool):
        super().__init__()
        self.names = tuple(components)
        self.token = token
        self.channel = nn.Parameter(torch.empty(len(components), d))
        if token:
            self.token_weight = nn.Parameter(torch.empty(len(components), d))
            self.token_bias = nn.Parameter(torch.empty(len(components)))

    def token_factors(self, h_tok: torch.Tensor) -> torch.Tensor:
        """tau = 2 sigmoid(w . x + beta), from the token-gate slice of the down-projection."""
        return 2 * torch.sigmoid(h_tok)

    def mean_values(self) -> dict:
        """Mean channel gate per component (what the FLOPs callback logs)."""
        return {n: self.channel[i].detach().float().mean().item() for i, n in enumerate(self.names)}

    def matmul_flops_per_token(self) -> int:
        return 2 * self.channel.shape[1] * len(self.names) if self.token else 0

    def elementwise_flops_per_token(self) -> int:
        return 2 * self.channel.shape[1] * len(self.names)

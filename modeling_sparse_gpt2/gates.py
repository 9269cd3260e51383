"""Residual gates: how much of each component reaches the FFN output.

    y = b + sum_c g_c * tau_c(x) * y_c         then dropout(resid_pdrop)

``g_c`` is one learned scalar per component (1 at init). With ``gate_kind="token"`` each component
is also scaled per token by ``tau_c(x) = 2 sigmoid(w_c . x + beta_c)`` (1 at init); its ``C`` rows
``w_c`` are the last rows of the FFN's ``c_fc``. For the components inside the GEMMs both factors
multiply the component's activations before ``c_proj``, so gating costs no weight work and no
extra kernel. (Checkpoints of version 0.1 had a gate per output channel, ``gate_kind="channel"``;
they load with those gates folded into ``c_proj``'s columns, an exact rewrite.)

FLOPs per token: matmul 2·d·C for token gates (C components); elementwise one multiply per
activation (two with token gates) and 2·d per component outside the GEMMs.
"""

import torch
from torch import nn


class ResidualGates(nn.Module):
    def __init__(self, components: tuple, token: bool):
        super().__init__()
        self.names = tuple(components)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.token = token
        self.weight = nn.Parameter(torch.empty(len(self.names)))

    @staticmethod
    def token_factors(h_gate: torch.Tensor) -> torch.Tensor:
        """tau = 2 sigmoid(w . x + beta), from the token-gate rows of the down-projection."""
        return 2 * torch.sigmoid(h_gate)

    def factor(self, name: str, tau: torch.Tensor | None):
        """g_c (a scalar), times tau_c (per token, shape (..., 1)) with token gates."""
        i = self.index[name]
        g = self.weight[i]
        return g if tau is None else g * tau[..., i : i + 1]

    def mean_values(self) -> dict:
        """The gate of each component (what the FLOPs callback logs)."""
        return {n: self.weight[i].detach().float().item() for i, n in enumerate(self.names)}

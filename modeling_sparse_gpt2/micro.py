"""Micro-step refine component: a few cheap block-diagonal steps on the most important channels.

    z_0 = x[G]                                   (G: the kept channel groups, each of width b)
    z_{s+1} = z_s + gelu(B_s z_s)   for s < S    (B_s block-diagonal: one b x b block per group)
    y[G] = z_S - z_0, y elsewhere 0              (the refinement is the output)

Only ``micro_keep_ratio`` of the d / b groups are updated. ``B = 0`` gives ``y = 0``: an
unfitted micro component leaves a converted block at its dense output until healing trains it.

FLOPs per token: matmul S·2·g·b²  (g kept groups); elementwise S·g·b·9.
"""

import torch
import torch.nn.functional as F
from torch import nn


class MicroComponent(nn.Module):
    name = "micro"

    def __init__(self, spec):
        super().__init__()
        b, g, steps = spec.micro_group_size, spec.micro_groups, spec.micro_steps
        self.group_size, self.groups, self.steps = b, g, steps
        self.register_buffer("channel_index", torch.arange(g * b, dtype=torch.long))
        self.blocks = nn.Parameter(torch.empty(steps, g, b, b))  # [step, group, out, in]

    def set_groups(self, group_ids: torch.Tensor):
        b = self.group_size
        idx = (group_ids.to(torch.long)[:, None] * b + torch.arange(b)).flatten()
        with torch.no_grad():
            self.channel_index.copy_(idx.to(self.channel_index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        z0 = x.index_select(-1, self.channel_index).reshape(-1, self.groups, self.group_size)
        z = z0
        for s in range(self.steps):
            z = z + F.gelu(torch.einsum("ngi,goi->ngo", z, self.blocks[s]), approximate="tanh")
        delta = (z - z0).reshape(*lead, self.groups * self.group_size)
        return x.new_zeros(x.shape).index_copy(-1, self.channel_index, delta)

    def matmul_flops_per_token(self) -> int:
        return self.steps * 2 * self.groups * self.group_size**2

    def elementwise_flops_per_token(self) -> int:
        return self.steps * self.groups * self.group_size * 9

"""Micro-step refine component: a few cheap block-diagonal steps on the most important channels.

    z_0 = x[G]                                   (G: the kept channel groups, each of width b)
    z_{s+1} = z_s + gelu(B_s z_s)   for s < S    (B_s block-diagonal: one b x b block per group)
    y[G] = z_S - z_0, y elsewhere 0              (the refinement is the output)

Only ``micro_keep_ratio`` of the d / b groups are updated. ``B = 0`` gives ``y = 0``: an
unfitted micro component leaves a converted block at its dense output until healing trains it.

FLOPs per token: matmul S·2·g·b²  (g kept groups); elementwise S·g·b·9.

Layout: the steps run on the tokens-last view [group, channel, token], so each step is one
batched GEMM (B_s[g] @ z[g]) with no transposing copy; only the gather of the kept groups and the
scatter of the result touch the full width.
"""

import torch
import torch.nn.functional as F
from torch import nn


class MicroComponent(nn.Module):

    def __init__(self, spec):
        super().__init__()
        b, g, steps = spec.micro_group_size, spec.micro_groups, spec.micro_steps
        self.group_size, self.groups, self.steps = b, g, steps
        self.register_buffer("channel_index", torch.arange(g * b, dtype=torch.long))
        self.blocks = nn.Parameter(torch.empty(steps, g, b, b))  # [step, group, out, in]

    def set_groups(self, group_ids: torch.Tensor):
        """Refine the channel groups ``group_ids`` (channels ``id * b ... id * b + b - 1`` each)."""
        b = self.group_size
        idx = (group_ids.to(torch.long)[:, None] * b + torch.arange(b)).flatten()
        with torch.no_grad():
            self.channel_index.copy_(idx.to(self.channel_index))

    def group_ids(self) -> torch.Tensor:
        return self.channel_index.view(self.groups, self.group_size)[:, 0] // self.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d = self.group_size, x.shape[-1]
        groups = self.group_ids()
        xt = x.reshape(-1, d // b, b).permute(1, 2, 0)  # [all groups, b, n]: a view
        z0 = xt.index_select(0, groups)  # [g, b, n]
        z = z0
        for s in range(self.steps):
            z = z + F.gelu(torch.matmul(self.blocks[s], z), approximate="tanh")  # [g, out, in] @ [g, in, n]
        delta = (z - z0).permute(2, 0, 1)  # [n, g, b]
        return x.new_zeros(delta.shape[0], d // b, b).index_copy(1, groups, delta).reshape(x.shape)

    def matmul_flops_per_token(self) -> int:
        return self.steps * 2 * self.groups * self.group_size**2

    def elementwise_flops_per_token(self) -> int:
        return self.steps * self.groups * self.group_size * 9

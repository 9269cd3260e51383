"""Token-feedback component: a causal, low-rank message from the previous tokens.

    u_t = U x_t                                  (rank r; U rides in the fused down GEMM)
    u_t = 0 where token t is padding
    s_t = gelu(sum_{j<w} K[:, j] * u_{t-w+1+j})  (depthwise causal convolution, window w)
    y_t = V s_t                                  (V rides in the fused up GEMM; zero at conversion,
                                                  so a converted block starts at the dense output)

At decode time the last ``w - 1`` values of ``u`` are the state; they live on the model's
``Cache`` (``cache.sparse_ffn_feedback[layer]``), are reordered with it in beam search, and make
generation with a cache equal generation without one.

FLOPs per token: matmul 4·d·r + conv 2·r·w.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .component_base import FFNContext, GemmComponent

STATE_ATTR = "sparse_ffn_feedback"


def feedback_states(cache) -> dict:
    """The dict ``layer_idx -> (batch, w-1, r)`` state kept on a ``Cache`` object."""
    states = getattr(cache, STATE_ATTR, None)
    if states is None:
        states = {}
        setattr(cache, STATE_ATTR, states)
    return states


def reorder_feedback_states(cache, beam_idx: torch.Tensor):
    """Follow a beam-search reordering of the cache (``Cache.reorder_cache``)."""
    for layer, state in feedback_states(cache).items():
        feedback_states(cache)[layer] = state.index_select(0, beam_idx.to(state.device))


class FeedbackComponent(GemmComponent):
    name = "feedback"

    def __init__(self, spec):
        super().__init__()
        d, r, w = spec.d, spec.feedback_rank, spec.feedback_window
        self.window = w
        self.w_in = nn.Parameter(torch.empty(r, d))
        self.kernel = nn.Parameter(torch.empty(r, w))
        self.w_out = nn.Parameter(torch.empty(d, r))

    def down(self):
        return self.w_in, None

    def activate(self, u, ctx: FFNContext):
        squeeze = u.dim() == 2
        if squeeze:  # (tokens, r) without a batch dimension: one sequence
            u = u[None]
        if ctx.token_mask is not None:
            u = u * ctx.token_mask[:, -u.shape[1] :, None].to(u.dtype)
        w = self.window
        state = None
        if ctx.cache is not None and w > 1:
            state = feedback_states(ctx.cache).get(ctx.layer_idx)
        if state is None:
            state = u.new_zeros(u.shape[0], w - 1, u.shape[2])
        full = torch.cat([state.to(u.dtype), u], dim=1)  # (batch, w-1+T, r)
        if ctx.cache is not None and w > 1:
            feedback_states(ctx.cache)[ctx.layer_idx] = full[:, -(w - 1) :].detach()
        s = F.conv1d(full.transpose(1, 2), self.kernel[:, None, :].to(u.dtype), groups=u.shape[2])
        s = F.gelu(s.transpose(1, 2), approximate="tanh")
        return s[0] if squeeze else s

    def matmul_flops_per_token(self) -> int:
        return super().matmul_flops_per_token() + 2 * self.rows * self.window

    def elementwise_flops_per_token(self) -> int:
        return 8 * self.rows  # mask + gelu

"""Token-feedback component: a causal, low-rank message from the previous tokens.

    u_t = U x_t                                  (rank r; U: this component's rows of c_fc)
    u_t = 0 where token t is padding
    s_t = gelu(sum_{j<w} K[:, j] * u_{t-w+1+j})  (depthwise causal convolution, window w, written as
                                                  w shifted multiply-adds that compile fuses into one
                                                  kernel; cuDNN's grouped conv1d is slow at rank r)
    y_t = V s_t                                  (V: its columns of c_proj; zero at conversion,
                                                  so a converted block starts at the dense output)

At decode time the last ``w - 1`` values of ``u`` are the state; they live on the model's
``Cache`` (``cache.sparse_ffn_feedback[layer]``), are reordered with it in beam search, and make
generation with a cache equal generation without one.

FLOPs per token: matmul 4·d·r; elementwise 2·r·w (the convolution) + ~8·r (mask, gelu).
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
    """Follow a beam-search reordering of the cache (``Cache.reorder_cache``), in place."""
    for state in feedback_states(cache).values():
        state.copy_(state.index_select(0, beam_idx.to(state.device)))


def state_buffer(cache, layer_idx: int, shape: tuple, dtype: torch.dtype, device: torch.device):
    """The layer's persistent ``shape`` = (batch, w-1, r) state buffer; zeros when new (before the first token).

    It is allocated once and then only updated in place, so CUDA graphs (static cache + compile)
    can replay over a fixed address.
    """
    states = feedback_states(cache)
    buf = states.get(layer_idx)
    if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
        buf = torch.zeros(shape, dtype=dtype, device=device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(buf)
        states[layer_idx] = buf
    return buf


def causal_feedback(u, kernel, state=None, token_mask=None):
    """s_t = gelu(sum_{j<w} K[:, j] * full[t + j]) with full = [state or zeros (w-1 rows) ; u * mask].

    ``u`` (batch, T, r), ``kernel`` (r, w), ``state`` (batch, w-1, r) the last w-1 masked values
    before this call, advanced in place (no gradient), ``token_mask`` (batch, T' >= T) whose last T
    columns belong to ``u``.
    """
    w = kernel.shape[1]
    if token_mask is not None:
        u = u * token_mask[:, -u.shape[1] :, None].to(u.dtype)
    before = state.to(u.dtype) if state is not None else u.new_zeros(u.shape[0], w - 1, u.shape[2])
    full = torch.cat([before, u], dim=1)  # (batch, w-1+T, r)
    if state is not None and w > 1:
        with torch.no_grad():
            state.copy_(full[:, -(w - 1) :])
    kernel, t = kernel.to(u.dtype), u.shape[1]
    s = full[:, w - 1 :] * kernel[:, w - 1]
    for j in range(w - 1):
        s = s + full[:, j : j + t] * kernel[:, j]
    return F.gelu(s, approximate="tanh")


class FeedbackComponent(GemmComponent):
    def __init__(self, spec):
        super().__init__(spec.d, spec.feedback_rank)
        self.window = spec.feedback_window
        self.kernel = nn.Parameter(torch.empty(spec.feedback_rank, spec.feedback_window))

    def state(self, ctx: FFNContext, u: torch.Tensor):
        """The decode state buffer of this layer on ``ctx.cache`` (None without a cache)."""
        if ctx.cache is None or self.window == 1:
            return None
        return state_buffer(ctx.cache, ctx.layer_idx, (u.shape[0], self.window - 1, u.shape[2]), u.dtype, u.device)

    def activate(self, u, ctx: FFNContext):
        squeeze = u.dim() == 2
        if squeeze:  # (tokens, r) without a batch dimension: one sequence
            u = u[None]
        s = causal_feedback(u, self.kernel, self.state(ctx, u), ctx.token_mask)
        return s[0] if squeeze else s

    def elementwise_flops_per_token(self) -> int:
        return 2 * self.rows * self.window + 8 * self.rows  # convolution, mask, gelu

"""UltraEfficientSparseFFN: the drop-in replacement of GPT-2's MLP.

    y = dropout( b + sum_c g_c * tau_c(x) * y_c(x) ),   c in the layer's sparse_components

with y_c from ``polynomial.py`` (kept neurons, Chebyshev activation), ``spectral.py`` (DCT
frequencies), ``feedback.py`` (causal low-rank token feedback), ``tensor.py`` (Monarch factors) and
``micro.py`` (block-diagonal refinement steps), and the gates of ``gates.py``.

Two paths compute the same function:

* ``reference_forward``: every component on its own, as written in its file;
* ``fused_forward`` (default): one GEMM for every down-projection that reads ``x`` (the kept
  ``c_fc`` rows, the DCT analysis rows, the feedback ``U``, the token gates), the elementwise work
  per segment (fused by ``torch.compile``), and one GEMM for every up-projection, with the channel
  gates folded into its columns. On an H200 this is what turns the FLOPs ratio into time
  (DESIGN.md §2); the Monarch and micro factors are small batched matmuls beside it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .component_base import FFNContext, GemmComponent
from .feedback import FeedbackComponent
from .gates import ResidualGates
from .micro import MicroComponent
from .polynomial import PolynomialComponent
from .spectral import SpectralComponent
from .tensor import TensorComponent

COMPONENT_CLASSES = {
    "polynomial": PolynomialComponent,
    "spectral": SpectralComponent,
    "feedback": FeedbackComponent,
    "tensor": TensorComponent,
    "micro": MicroComponent,
}


class UltraEfficientSparseFFN(nn.Module):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.spec = spec = config.layer_spec(layer_idx)
        self.layer_idx = layer_idx
        self.components = nn.ModuleDict({name: COMPONENT_CLASSES[name](spec) for name in spec.components})
        self.bias = nn.Parameter(torch.empty(spec.d))
        self.gates = ResidualGates(spec.components, spec.d, token=spec.gate_kind == "token")
        self.dropout = nn.Dropout(config.resid_pdrop)
        self.use_fused = True
        self.context: FFNContext | None = None  # set by SparseGPT2Block for the duration of a call
        self._fused_cache = None
        self._frozen = None  # fused weights fixed by freeze_fused_weights() for inference

    def train(self, mode: bool = True):
        if mode:
            self._frozen = None
        return super().train(mode)

    @torch.no_grad()
    def freeze_fused_weights(self):
        self._frozen = None
        self._frozen = tuple(t.detach().clone() if torch.is_tensor(t) else t for t in self.fused_weights())

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ctx: FFNContext | None = None) -> torch.Tensor:
        ctx = ctx or self.context or FFNContext(layer_idx=self.layer_idx)
        y = self.fused_forward(x, ctx) if self.use_fused else self.reference_forward(x, ctx)
        return self.dropout(y)

    def reference_forward(self, x: torch.Tensor, ctx: FFNContext) -> torch.Tensor:
        tau = None
        if self.gates.token:
            tau = self.gates.token_factors(F.linear(x, self.gates.token_weight, self.gates.token_bias))
        y = self.bias
        for i, comp in enumerate(self.components.values()):
            y = self._add_gated(y, i, comp(x, ctx) if isinstance(comp, GemmComponent) else comp(x), tau)
        return y

    def _add_gated(self, y, i: int, y_c, tau):
        """y + g_i * tau_i * y_i (tau: token gates or None)."""
        if tau is not None:
            y_c = y_c * tau[..., i : i + 1]
        return y + self.gates.channel[i] * y_c

    def _gemm_items(self):
        return [(i, c) for i, c in enumerate(self.components.values()) if isinstance(c, GemmComponent)]

    def fused_weights(self):
        """(W_down, b_down, segment sizes, W_up): the two GEMMs' weights, gates folded into W_up.

        Cached while the model is used without gradients and the weights are unchanged.
        """
        if self._frozen is not None and not self.training:
            return self._frozen
        params = list(self.parameters()) + list(self.buffers())
        cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params) if cacheable else None
        if key is not None and self._fused_cache is not None and self._fused_cache[0] == key:
            return self._fused_cache[1]
        items = self._gemm_items()
        downs = [c.down() for _, c in items]
        w_down = [w for w, _ in downs]
        b_down = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in downs]
        sizes = [w.shape[0] for w in w_down]
        if self.gates.token:
            w_down.append(self.gates.token_weight)
            b_down.append(self.gates.token_bias)
        # token gates tau = 2 sigmoid(.): the activations are scaled by sigmoid(.) and the 2 is folded
        # into W_up, so a large activation is not doubled (to inf in fp16) before the GEMM
        scale = 2.0 if self.gates.token else 1.0
        w_up = torch.cat([scale * self.gates.channel[i][:, None] * c.up() for i, c in items], dim=1)
        fused = (torch.cat(w_down), torch.cat(b_down), sizes, w_up)
        self._fused_cache = (key, fused) if key is not None else None
        return fused

    def fused_forward(self, x: torch.Tensor, ctx: FFNContext) -> torch.Tensor:
        w_down, b_down, sizes, w_up = self.fused_weights()
        h = F.linear(x, w_down.to(x.dtype), b_down.to(x.dtype))
        width = sum(sizes)
        half_tau = torch.sigmoid(h[..., width:]) if self.gates.token else None
        acts = []
        for (i, comp), seg in zip(self._gemm_items(), torch.split(h[..., :width], sizes, dim=-1)):
            a = comp.activate(seg, ctx)
            acts.append(a * half_tau[..., i : i + 1] if half_tau is not None else a)
        y = F.linear(torch.cat(acts, dim=-1), w_up.to(x.dtype), self.bias.to(x.dtype))
        others = [(i, c) for i, c in enumerate(self.components.values()) if not isinstance(c, GemmComponent)]
        tau = 2 * half_tau if half_tau is not None and others else None
        for i, comp in others:
            y = self._add_gated(y, i, comp(x), tau)
        return y

    # ------------------------------------------------------------------ FLOPs
    def flops_per_token(self) -> dict:
        """Analytic FLOPs per token of what executes: {component: (matmul, elementwise)}.

        Matmul FLOPs count a multiply-add as 2 (as ``FlopCounterMode`` does); elementwise FLOPs
        (activation, gates) are reported apart, as GPT-2's GELU is not counted in its MLP FLOPs.
        """
        out = {name: (c.matmul_flops_per_token(), c.elementwise_flops_per_token()) for name, c in self.components.items()}
        out["gates"] = (self.gates.matmul_flops_per_token(), self.gates.elementwise_flops_per_token())
        return out

    def dense_flops_per_token(self) -> int:
        return 2 * 2 * self.spec.d * self.spec.f

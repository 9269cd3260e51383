"""UltraEfficientSparseFFN: the drop-in replacement of GPT-2's MLP.

    y = dropout( b + sum_c g_c * tau_c(x) * y_c(x) ),   c in the layer's sparse_components

with y_c from ``polynomial.py`` (kept neurons, Chebyshev activation), ``spectral.py`` (DCT
frequencies), ``feedback.py`` (causal low-rank token feedback), ``tensor.py`` (Monarch factors) and
``micro.py`` (block-diagonal refinement steps), and the gates of ``gates.py``.

Parameter layout: like GPT-2's MLP, one down-projection ``c_fc`` and one up-projection ``c_proj``
(``nn.Linear``). Their rows / columns are the GEMM components' slices, side by side:

    c_fc rows:     [ polynomial m | spectral k | feedback r | token gates C ]
    c_proj cols:   [ polynomial m | spectral k | feedback r ]          (c_proj.bias = b)

so the fast path is GPT-2's MLP with another activation in the middle:

    h = c_fc(x);   a = middle(h) (every segment's elementwise work times its gates);   y = c_proj(a)

``middle`` is one Triton kernel forward and one backward on CUDA (``ffn_kernels.py``; the feedback's
decode state is read and written inside it), plain torch elsewhere. Nothing is concatenated or
rescaled per step; the tensor and micro components (small batched
matmuls on x) are added beside it. ``reference_forward`` computes each component on its own from
its slices, as written in its file; a test keeps the two paths equal.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .component_base import FFNContext, GemmComponent
from .configuration_sparse_gpt2 import FUSED_COMPONENTS
from .feedback import FeedbackComponent, state_buffer
from .ffn_kernels import sparse_ffn_activation  # in this form, so save_pretrained copies ffn_kernels.py too
from .gates import ResidualGates
from .micro import MicroComponent
from .polynomial import PolynomialComponent
from .spectral import SpectralComponent, dct_rows
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
        self.segments = {}  # name -> its slice of c_fc's rows and of c_proj's columns
        width = 0
        for name, comp in self.components.items():
            if isinstance(comp, GemmComponent):
                self.segments[name] = slice(width, width + comp.rows)
                width += comp.rows
        self.act_width = width
        # the op's segment widths (poly m, spectral k, feedback r), fixed by the config: derived once
        # here rather than on every call of the hot path
        self.segment_widths = tuple(
            self.segments[n].stop - self.segments[n].start if n in self.segments else 0
            for n in FUSED_COMPONENTS
        )
        self.gates = ResidualGates(spec.components, token=spec.gate_kind == "token")
        gate_rows = len(spec.components) if self.gates.token else 0
        self.c_fc = nn.Linear(spec.d, width + gate_rows)
        self.c_proj = nn.Linear(width, spec.d)
        self.dropout = nn.Dropout(config.resid_pdrop)
        self.use_fused = True
        # What the hot path asks on every call, fixed by the spec and read here once as plain
        # attributes (a submodule or parameter is an nn.Module.__getattr__ call each time, and eager
        # decode is bound by such host work):
        self.outside_gemm = tuple(n for n in self.components if n not in self.segments)  # tensor, micro
        self.reads_context = "feedback" in self.segments  # the one reader of the cache and the padding mask
        self.topk_spectral = "spectral" in self.segments and spec.spectral_selection == "topk"
        self.n_gates = len(self.segments) if self.gates.token else 0  # the op's token-gate columns of h
        self.op_rows = width + self.n_gates  # columns of h the op reads (tensor / micro token gates follow)
        self.state_rows = spec.feedback_window - 1 if "feedback" in self.segments else 0  # decode state: w - 1 tokens
        # the modules whose tensors the op takes (gates, polynomial, feedback), in a plain tuple: a call
        # reaches them without four nn.Module.__getattr__ lookups (~1 us each; their tensors are still
        # read on every call, as loading may replace them)
        self._op_owners = (self.gates,) + tuple(self.components[n] if n in self.segments else None
                                                for n in ("polynomial", "feedback"))
        self.context: FFNContext | None = None  # set by SparseGPT2Block for the duration of a call
        self.no_context = FFNContext(layer_idx=layer_idx)  # without a block's context (never mutated)

    # ------------------------------------------------------------------ the components' slices
    def w_in(self, name: str) -> torch.Tensor:
        """Rows of ``c_fc.weight`` that belong to GEMM component ``name`` (a view)."""
        return self.c_fc.weight[self.segments[name]]

    def b_in(self, name: str) -> torch.Tensor:
        return self.c_fc.bias[self.segments[name]]

    def w_out(self, name: str) -> torch.Tensor:
        """Columns of ``c_proj.weight`` that belong to GEMM component ``name`` (a view)."""
        return self.c_proj.weight[:, self.segments[name]]

    @property
    def gate_rows(self) -> slice:
        """The token-gate rows of ``c_fc`` (empty without token gates)."""
        return slice(self.act_width, self.c_fc.out_features)

    @torch.no_grad()
    def set_spectral_frequencies(self, freqs: torch.Tensor):
        """Choose the kept frequency set K: its indices and the DCT analysis rows in ``c_fc``."""
        spectral = self.components["spectral"]
        spectral.freq_index.copy_(freqs.to(spectral.freq_index))
        self.w_in("spectral").copy_(dct_rows(spectral.freq_index.cpu(), self.spec.d).to(self.c_fc.weight))
        self.b_in("spectral").zero_()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ctx: FFNContext | None = None) -> torch.Tensor:
        ctx = ctx or self.context or self.no_context
        y = self.fused_forward(x, ctx) if self.use_fused else self.reference_forward(x, ctx)
        return self.dropout(y) if self.training else y  # dropout is the identity in eval: skip its module call

    def middle(self, h: torch.Tensor, ctx: FFNContext) -> torch.Tensor:
        """The stage between the GEMMs: each segment's activation times g_c (and tau_c).

        One kernel (``ffn_kernels``: Triton on CUDA, its torch reference elsewhere); the per-token
        top-k spectral selection is not in the kernel and runs on the components' own code.
        """
        if not self.segments:  # only tensor / micro: nothing between the (empty) GEMMs
            return h[..., :0]
        if not self.topk_spectral:
            return self._middle_op(h, ctx)
        tau = self.gates.token_factors(h[..., self.gate_rows]) if self.gates.token else None
        parts = [
            self.components[name].activate(h[..., seg], ctx) * self.gates.factor(name, tau)
            for name, seg in self.segments.items()
        ]
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def _middle_op(self, h: torch.Tensor, ctx: FFNContext) -> torch.Tensor:
        """The op on the parameters as they are (no cast, no ``coeffs * coeff_mask``: the kernels apply the
        mask and read fp32), so a call makes no tensors from the weights and autograd has no nodes for them."""
        m, k, r = self.segment_widths
        gates, poly, feedback = self._op_owners
        if poly is not None:
            coeffs, mask, domain, degree = poly.coeffs, poly.coeff_mask, poly.domain, poly.degree
        else:  # no polynomial segment: a series of one zero term, never read
            coeffs = mask = torch.zeros(1, dtype=h.dtype, device=h.device)
            domain, degree = 1.0, 0
        g = gates.weight
        if g.shape[0] != len(self.segments):  # tensor / micro gates follow the op's
            g = g[: len(self.segments)]
        state = None
        if self.state_rows and ctx.cache is not None:
            batch = h.shape[0] if h.dim() == 3 else 1
            state = state_buffer(ctx.cache, ctx.layer_idx, (batch, self.state_rows, r), h.dtype, h.device)
        if self.op_rows < h.shape[-1]:  # token gates of tensor / micro follow: the op takes its own
            h = h[..., : self.op_rows].contiguous()
        return sparse_ffn_activation(
            h, coeffs, mask, g, feedback.kernel if feedback is not None else None, state, ctx.token_mask,
            m=m, k=k, r=r, n_gates=self.n_gates, domain=domain, degree=degree, checked=False,
        )  # fmt: skip

    def fused_forward(self, x: torch.Tensor, ctx: FFNContext) -> torch.Tensor:
        h = self.c_fc(x)
        y = self.c_proj(self.middle(h, ctx))
        if self.outside_gemm:
            tau = self.gates.token_factors(h[..., self.gate_rows]) if self.gates.token else None
            for name in self.outside_gemm:
                y = y + self.gates.factor(name, tau) * self.components[name](x)
        return y

    def reference_forward(self, x: torch.Tensor, ctx: FFNContext) -> torch.Tensor:
        """y = b + sum_c g_c tau_c y_c(x), every component computed on its own."""
        tau = None
        if self.gates.token:
            rows = self.gate_rows
            tau = self.gates.token_factors(F.linear(x, self.c_fc.weight[rows], self.c_fc.bias[rows]))
        y = self.c_proj.bias
        for name, comp in self.components.items():
            if name in self.segments:
                y_c = F.linear(comp.activate(F.linear(x, self.w_in(name), self.b_in(name)), ctx), self.w_out(name))
            else:
                y_c = comp(x)
            y = y + self.gates.factor(name, tau) * y_c
        return y

    # ------------------------------------------------------------------ FLOPs
    def flops_per_token(self) -> dict:
        """Analytic FLOPs per token of what executes: {component: (matmul, elementwise)}.

        Matmul FLOPs count a multiply-add as 2 (as ``FlopCounterMode`` does); elementwise FLOPs
        (activation, gates) are reported apart, as GPT-2's GELU is not counted in its MLP FLOPs.
        """
        out = {name: (c.matmul_flops_per_token(), c.elementwise_flops_per_token()) for name, c in self.components.items()}
        d, n_comp, n_out = self.spec.d, len(self.components), len(self.components) - len(self.segments)
        gate_mm = 2 * d * n_comp if self.gates.token else 0
        gate_ew = self.act_width * (2 if self.gates.token else 1) + 2 * d * n_out + (4 * n_comp if self.gates.token else 0)
        out["gates"] = (gate_mm, gate_ew)
        return out

    def dense_flops_per_token(self) -> int:
        return 2 * 2 * self.spec.d * self.spec.f

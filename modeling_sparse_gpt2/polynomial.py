"""Polynomial component: the kept hidden neurons of the dense MLP, with a Chebyshev activation.

    h = W_in x + b_in                       (W_in = W1[S], the m kept rows of the dense c_fc)
    t = clamp(h / s, -1, 1)                 (bounded domain: the polynomial never sees |t| > 1)
    a = sum_{i in A} c_i T_i(t) + relu(h - s)   (T_0 = 1, T_1 = t, T_{i+1} = 2 t T_i - T_{i-1})
    y = W_out a                             (W_out = W2[:, S], refitted by least squares)

``A`` is the set of non-zero ("sparse") coefficients (``poly_num_terms`` of them, the largest of
the fit: GELU is T_1 plus even terms, so the odd ones above T_1 vanish). With
``poly_coefficients="per_neuron"`` every kept neuron has its own series ``c_{j,i}`` (initialised to
the shared fit, then trained while healing): a learned activation per neuron, which GELU cannot
give. The elementwise kernel still runs the whole recurrence to ``deg``, and the count below says
so. Beyond ``+s`` the activation continues linearly (as GELU does) instead of growing as a
polynomial, so no dtype overflows for large inputs.

FLOPs per token: matmul 4·d·m; elementwise m·(3·(deg-1) + 2·(deg+1) + 6).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .component_base import FFNContext, GemmComponent


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's activation (tanh approximation of GELU)."""
    return F.gelu(x, approximate="tanh")


def chebyshev_fit(fn, degree: int, domain: float, samples: torch.Tensor | None = None, active=None) -> torch.Tensor:
    """Coefficients c_0..c_degree so that ``chebyshev_activation`` approximates ``fn``.

    Without ``samples``: least squares at Chebyshev nodes of [-s, s] (near-minimax). With observed
    pre-activations ``samples``: least squares on them, the linear tail beyond ``+s`` included, so
    the fit is best where the data is. ``active`` restricts the fit to those coefficient indices.
    """
    if samples is None:
        n = max(4 * (degree + 1), 64)
        k = torch.arange(n, dtype=torch.float64)
        h = torch.cos(math.pi * (k + 0.5) / n) * domain
    else:
        h = samples.double().flatten()
    basis = chebyshev_basis((h / domain).clamp(-1, 1), degree)  # (n, degree+1)
    target = fn(h) - F.relu(h - domain)
    cols = torch.arange(degree + 1) if active is None else torch.as_tensor(active)
    b = basis[:, cols]
    gram = b.T @ b + 1e-9 * b.shape[0] * torch.eye(len(cols), dtype=torch.float64)
    c = torch.zeros(degree + 1, dtype=torch.float64)
    c[cols] = torch.linalg.solve(gram, b.T @ target)
    return c


def chebyshev_basis(t: torch.Tensor, degree: int) -> torch.Tensor:
    """Stack T_0(t)..T_degree(t) on a new last dimension."""
    terms = [torch.ones_like(t), t]
    for _ in range(2, degree + 1):
        terms.append(2 * t * terms[-1] - terms[-2])
    return torch.stack(terms[: degree + 1], dim=-1)


def chebyshev_activation(h, coeffs, mask, domain: float, degree: int):
    """a = sum_i (c_i * mask_i) T_i(clamp(h / s)) + relu(h - s); the polynomial sees only [-1, 1].

    ``coeffs`` is ``(degree + 1,)`` (one series) or ``(m, degree + 1)`` (one per neuron, the last
    dimension of ``h``).
    """
    c = (coeffs * mask).to(h.dtype)
    t = (h / domain).clamp(-1.0, 1.0)
    t_prev, t_cur = torch.ones_like(t), t
    out = c[..., 0] + c[..., 1] * t if degree >= 1 else c[..., 0] * t_prev
    two_t = 2 * t
    for i in range(2, degree + 1):
        t_prev, t_cur = t_cur, two_t * t_cur - t_prev
        out = out + c[..., i] * t_cur
    return out + F.relu(h - domain)


class PolynomialComponent(GemmComponent):
    def __init__(self, spec):
        super().__init__(spec.d, spec.poly_neurons)
        m, deg = spec.poly_neurons, spec.poly_degree
        self.degree = deg
        self.num_terms = spec.poly_num_terms
        self.domain = spec.poly_domain
        self.per_neuron = spec.poly_coefficients == "per_neuron"
        self.coeffs = nn.Parameter(torch.empty((m, deg + 1) if self.per_neuron else (deg + 1,)))
        # Which coefficients are non-zero, and which dense neurons were kept (provenance, -1 if none).
        self.register_buffer("coeff_mask", torch.ones(deg + 1))
        self.register_buffer("neuron_index", torch.full((m,), -1, dtype=torch.long))

    def activate(self, h, ctx: FFNContext):
        return chebyshev_activation(h, self.coeffs, self.coeff_mask, self.domain, self.degree)

    def fit_activation(self, fn=gelu_new, samples: torch.Tensor | None = None):
        """Fit the coefficients to ``fn`` (on ``samples`` if given), then refit on the
        ``num_terms`` largest of them so the others are exactly zero (every neuron starts from the
        same series when they are per neuron)."""
        c = chebyshev_fit(fn, self.degree, self.domain, samples)
        active = torch.argsort(c.abs(), descending=True)[: self.num_terms].sort().values
        c = chebyshev_fit(fn, self.degree, self.domain, samples, active=active)
        keep = torch.zeros_like(c)
        keep[active] = 1.0
        with torch.no_grad():
            self.coeffs.copy_(c.to(self.coeffs).expand_as(self.coeffs))
            self.coeff_mask.copy_(keep.to(self.coeff_mask))

    def elementwise_flops_per_token(self) -> int:
        m, deg = self.rows, self.degree
        return m * (3 * max(deg - 1, 0) + 2 * (deg + 1) + 6)

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
from torch.autograd.function import once_differentiable

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


def chebyshev_activation(h, coeffs, mask, domain: float, degree: int, reference: bool = False):
    """a = sum_i (c_i * mask_i) T_i(clamp(h / s)) + relu(h - s); the polynomial sees only [-1, 1].

    ``coeffs`` is ``(degree + 1,)`` (one series) or ``(m, degree + 1)`` (one per neuron, the last
    dimension of ``h``; ``(1, degree + 1)`` broadcasts). On CPU tensors this runs
    ``ChebyshevActivation`` (the same math in cache-sized chunks, fp32 inside for half inputs);
    elsewhere, under ``torch.compile``/export/tracing, or with ``reference=True`` it runs
    ``chebyshev_activation_autograd``, the specification.
    """
    if reference or h.device.type != "cpu" or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return chebyshev_activation_autograd(h, coeffs, mask, domain, degree)
    return ChebyshevActivation.apply(h, coeffs * mask, float(domain), int(degree))


def chebyshev_activation_autograd(h, coeffs, mask, domain: float, degree: int):
    """The specification: the forward recurrence in plain torch, differentiated by autograd."""
    c = (coeffs * mask).to(h.dtype)
    t = (h / domain).clamp(-1.0, 1.0)
    t_prev, t_cur = torch.ones_like(t), t
    out = c[..., 0] + c[..., 1] * t if degree >= 1 else c[..., 0] * t_prev
    two_t = 2 * t
    for i in range(2, degree + 1):
        t_prev, t_cur = t_cur, two_t * t_cur - t_prev
        out = out + c[..., i] * t_cur
    return out + F.relu(h - domain)


def gelu_fit_error(h: torch.Tensor, coeffs, mask, domain: float, degree: int) -> float:
    """Relative RMS error ||a - gelu(h)|| / ||gelu(h)|| of the series (``chebyshev_activation_autograd``)
    on the pre-activations ``h``, in their dtype and on their device."""
    target = gelu_new(h)
    a = chebyshev_activation_autograd(h, coeffs.to(h), mask.to(h), domain, degree)
    return float((a - target).norm() / target.norm())


# Elements (rows x columns) per chunk of ``ChebyshevActivation`` (1 MB fp32 buffers, eight to ten of them
# in the backward: in L2/L3). Tuned on the 2-core CPU (1,024 x 1,216 elements, interleaved runs): 256K took 0.85-0.9x
# the time of 128K forward and backward, 64K 1.3x (per-op dispatch, ~10 us there), the whole tensor 2x.
CHUNK_ELEMENTS = 256 * 1024
# Up to this degree ``ChebyshevActivation`` evaluates the series in the power basis (Horner: one pass
# per degree, Clenshaw takes two). The basis change multiplies coefficients by up to 2^(degree-1)
# (T_8 = 128 t^8 - 256 t^6 + ...), and fp32 rounding with them (at degree 8 measured up to 2e-6 of the
# largest value, against 3e-7 by Clenshaw); above it, Clenshaw.
POWER_BASIS_MAX_DEGREE = 8


_TO_POWER = {}  # degree -> _chebyshev_to_power(degree)


def _chebyshev_to_power(degree: int) -> torch.Tensor:
    """``M`` (fp64, CPU) with T_i(t) = sum_p M[i, p] t^p for i, p <= degree: a series c (Chebyshev) is
    e = M^T c in powers. Made once per degree."""
    if degree in _TO_POWER:
        return _TO_POWER[degree]
    m = torch.zeros(degree + 1, degree + 1, dtype=torch.float64)
    m[0, 0] = 1.0
    if degree >= 1:
        m[1, 1] = 1.0
    for i in range(2, degree + 1):  # T_i = 2 t T_{i-1} - T_{i-2}
        m[i, 1:] = 2 * m[i - 1, :-1]
        m[i] -= m[i - 2]
    _TO_POWER[degree] = m
    return m


def _power_series(cols: torch.Tensor, degree: int) -> tuple:
    """``(e, even)``: the series ``cols`` (degree+1, P) in the power basis, in cols' dtype, and whether
    it is T_1 plus even terms (its odd powers above t exactly zero, as for the default GELU fit)."""
    # by broadcasting, not a matmul: FLOP counters (and the FLOPs tests) count only the model's GEMMs
    e = (_chebyshev_to_power(degree).to(cols.device).T[:, :, None] * cols.double()[None]).sum(1).to(cols.dtype)
    return e, degree >= 2 and not bool(e[3::2].any())


def _horner(a, x, out):
    """sum_k a[k] x^k into ``out`` (a: (K, P), P broadcasting over the columns): K - 1 passes."""
    n = a.shape[0] - 1
    if n == 0:
        return out.copy_(a[0].expand_as(out))
    torch.addcmul(a[n - 1], x, a[n], out=out)
    for k in range(n - 2, -1, -1):
        torch.addcmul(a[k], out, x, out=out)
    return out


def _power_value(e, even, t, u, out):
    """f(t) = sum_p e_p t^p; when ``even``, e_1 t + sum_j e_2j u^j with u = t^2 (half the passes)."""
    if not even:
        return _horner(e, t, out)
    _horner(e[0::2], u, out)
    return out.addcmul_(t, e[1])


def _power_slope_series(e, domain: float):
    """The coefficients a_q of f'(t) / s = sum_q a_q t^q, a_q = (q + 1) e_{q+1} / s."""
    return e[1:] * (torch.arange(1, e.shape[0], dtype=e.dtype, device=e.device)[:, None] / domain)


def _power_slope(a, even, t, u, out):
    """f'(t) / s from ``_power_slope_series``; when ``even`` (f is e_1 t plus even powers, so f' is a_0
    plus odd powers), a_0 + t sum_j a_{2j+1} u^j with u = t^2."""
    if not even:
        return _horner(a, t, out)
    _horner(a[1::2], u, out)
    return torch.addcmul(a[0], out, t, out=out)


def _clenshaw(a, t, two_t, out, spare):
    """sum_k a[k] P_k(t) into ``out`` by Clenshaw's recurrence b_k = a_k + 2t b_{k+1} - b_{k+2}.

    ``a`` is (K, P) (P broadcasts over the columns); P = T (Chebyshev, first kind) gives
    a_0 + t b_1 - b_2, P = U (second kind) gives b_0 = a_0 + 2t b_1 - b_2: pass ``t`` or ``two_t``
    as ``t``. ``spare`` is two buffers of ``out``'s shape. 2 passes per degree.
    """
    n = a.shape[0] - 1
    if n == 0:
        return out.copy_(a[0].expand_as(out))
    b1, b2 = a[n], None  # b_{n+1} = 0: b_n = a_n, a vector that broadcasts
    for k in range(n - 1, 0, -1):
        b0 = next(buf for buf in spare if buf is not b1 and buf is not b2)
        torch.addcmul(a[k], two_t, b1, out=b0)
        if b2 is not None:
            b0.sub_(b2)
        b1, b2 = b0, b1
    torch.addcmul(a[0], t, b1, out=out)
    return out if b2 is None else out.sub_(b2)


class ChebyshevActivation(torch.autograd.Function):
    """``chebyshev_activation`` with a hand-written backward, over chunks of ``CHUNK_ELEMENTS``.

    forward:  t = clamp(h/s, -1, 1);  a = f(t) + relu(h - s),  f = sum_i c_i T_i
    backward: dh = g * (f'(t)/s * [|h/s| <= 1] + [h > s])
              dc_i = sum over tokens of g * T_i(t)   (per neuron, or over everything when shared)
    The same math as ``chebyshev_activation_autograd`` (its clamp passes the gradient at |h/s| = 1,
    its relu none at h = s), but autograd streams ~3 full tensors per degree forward and ~6 backward
    through memory; here each chunk's work stays in cache (preallocated buffers, in-place ops) and
    only h is saved. Up to ``POWER_BASIS_MAX_DEGREE`` f and f' are evaluated in the power basis by
    Horner's rule (one pass per degree; for the default series, T_1 plus even terms, half of that
    in u = t^2), above it by Clenshaw's recurrence on T and U (two passes per degree); the
    coefficient gradients always come from T_i itself (one addcmul and one dot or column sum per
    degree). Computes in promote_types(h, fp32) and returns h's dtype. ``c`` is the masked series,
    (degree+1,) or (P, degree+1) with P in (1, h.shape[-1]). Not twice differentiable.
    Passes per chunk at degree 8, default series: forward 11, backward about 36 (Clenshaw: 22, 48).
    """

    @staticmethod
    def forward(ctx, h, c, domain: float, degree: int):
        cols = _series(c, h, degree)  # (degree+1, P)
        ctx.save_for_backward(h, c)
        ctx.domain, ctx.degree = domain, degree
        x2 = h.detach().reshape(-1, h.shape[-1] if h.dim() else 1)
        out = torch.empty(x2.shape, dtype=h.dtype, device=h.device)
        chunks = _Chunks(x2, cols.dtype)
        power = degree <= POWER_BASIS_MAX_DEGREE
        # the series in powers, made once here for the backward too
        e, even = ctx.power_series = _power_series(cols, degree) if power else (None, False)
        t, two_t = chunks.buffer(), chunks.buffer()
        s0, s1, s2 = (None,) * 3 if power else (chunks.buffer() for _ in range(3))  # Clenshaw's spares
        res = None if out.dtype == cols.dtype else chunks.buffer()
        for r0, r1, x in chunks:
            n = r1 - r0
            t_ = torch.div(x, domain, out=t[:n]).clamp_(-1.0, 1.0)
            y = out[r0:r1] if res is None else res[:n]
            if power:
                _power_value(e, even, t_, torch.mul(t_, t_, out=two_t[:n]) if even else None, y)
            else:
                _clenshaw(cols, t_, torch.mul(t_, 2.0, out=two_t[:n]), y, (s0[:n], s1[:n], s2[:n]))
            y.add_(torch.sub(x, domain, out=t_).clamp_min_(0.0))
            if res is not None:
                out[r0:r1].copy_(y)
        return out.reshape(h.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h, c = ctx.saved_tensors
        domain, degree = ctx.domain, ctx.degree
        need_h, need_c = ctx.needs_input_grad[:2]
        cols = _series(c, h, degree)
        dtype, per_neuron = cols.dtype, cols.shape[1] > 1
        x2 = h.reshape(-1, h.shape[-1] if h.dim() else 1)
        g2 = grad.reshape(x2.shape)
        # f'(t)/s in the power basis (Horner) up to POWER_BASIS_MAX_DEGREE, else sum_k a_k U_k(t) with
        # a_k = (k+1) c_{k+1} / s (Clenshaw on U)
        e, even = ctx.power_series
        power = e is not None
        if power:
            a_p = _power_slope_series(e, domain)
        else:
            a_u = cols[1:] * (torch.arange(1, degree + 1, dtype=dtype, device=h.device)[:, None] / domain)
        gh = torch.empty(x2.shape, dtype=h.dtype, device=h.device) if need_h else None
        gc = torch.zeros(cols.shape, dtype=dtype, device=h.device) if need_c else None
        chunks = _Chunks(x2, dtype)
        # The coefficient gradients sum g T_i, in the Chebyshev basis whatever the degree (moments sum g t^p
        # would lose digits to the basis change), one term at a time in three rotating chunk buffers (in
        # cache), each summed against g as it is made: T_i = sigma_i R_i with sigma_i = (-1)^(i // 2), so
        # R_i = R_{i-2} + (-1)^(i+1) 2 t R_{i-1} is one addcmul (T's own 2 t T_{i-1} - T_{i-2} is two passes)
        sigma = torch.tensor([(-1.0) ** (i // 2) for i in range(degree + 1)], dtype=dtype, device=h.device)[:, None]
        one = torch.ones((), dtype=dtype, device=h.device)
        t, fp, s0, s1, s2 = (chunks.buffer() for _ in range(5))
        two_t = None if power else chunks.buffer()
        # the masks [|h/s| <= 1] and [h > s] as 0/1 in the compute dtype: a comparison into a bool tensor and
        # arithmetic with one run 4-7x slower on the CPU than the same ops on floats
        inside, tail = chunks.buffer(), chunks.buffer()
        gbuf = None if g2.dtype == dtype else chunks.buffer()
        for r0, r1, x in chunks:
            n = r1 - r0
            g = g2[r0:r1] if gbuf is None else gbuf[:n].copy_(g2[r0:r1])
            g_flat = g.reshape(-1)  # (a copy only if grad is not contiguous: once per chunk)
            t_ = torch.div(x, domain, out=t[:n])
            torch.le(torch.abs(t_, out=fp[:n]), 1.0, out=inside[:n])
            torch.gt(x, domain, out=tail[:n])
            t_.clamp_(-1.0, 1.0)
            two_t_ = None if power else torch.mul(t_, 2.0, out=two_t[:n])
            if need_h:
                if degree == 0:
                    d = fp[:n].zero_()
                elif power:
                    d = _power_slope(a_p, even, t_, torch.mul(t_, t_, out=s0[:n]) if even else None, fp[:n])
                else:
                    d = _clenshaw(a_u, two_t_, two_t_, fp[:n], (s0[:n], s1[:n], s2[:n]))
                d.mul_(inside[:n]).add_(tail[:n])
                if gh.dtype == dtype:
                    torch.mul(d, g, out=gh[r0:r1])
                else:
                    gh[r0:r1].copy_(d.mul_(g))
            if need_c:  # (the slope's buffers s0-s2 and fp are free again)
                gc[0] += g.sum(0) if per_neuron else g.sum()
                r_prev, r = one, t_  # R_0, R_1
                for i in range(1, degree + 1):
                    if i >= 2:  # R_i into the buffer R_{i-3} held
                        out = (s0, s1, s2)[i % 3][:n]
                        r_prev, r = r, torch.addcmul(r_prev, t_, r, value=2.0 if i % 2 else -2.0, out=out)
                    if per_neuron:  # gc_i += sum g R_i, over the rows or over everything
                        gc[i] += torch.mul(r, g, out=fp[:n]).sum(0)
                    else:
                        gc[i, 0] += torch.dot(r.reshape(-1), g_flat)
        grad_h = gh.reshape(h.shape) if need_h else None
        grad_c = (gc * sigma).T.reshape(c.shape).to(c.dtype) if need_c else None  # sum g R_i -> sum g T_i
        return grad_h, grad_c, None, None


def _series(c, h, degree):
    """The masked series as (degree+1, P) columns in promote_types(h, fp32), checked against h."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    if c.shape[-1] != degree + 1 or c.dim() > 2:
        raise ValueError(f"chebyshev_activation: coeffs {tuple(c.shape)} must end in degree+1 = {degree + 1}")
    cols = c.detach().to(dtype).reshape(-1, degree + 1).T.contiguous()
    width = h.shape[-1] if h.dim() else 1
    if cols.shape[1] not in (1, width):
        raise ValueError(f"chebyshev_activation: {cols.shape[1]} per-neuron series for {width} columns of h")
    return cols


class _Chunks:
    """Row blocks of a 2-D tensor of about ``CHUNK_ELEMENTS``, in ``dtype`` (copied only if needed),
    with preallocated chunk-shaped buffers (large allocations per chunk would fault in fresh pages)."""

    def __init__(self, x2, dtype):
        self.x2, self.dtype = x2, dtype
        self.rows = max(1, min(x2.shape[0], CHUNK_ELEMENTS // max(x2.shape[1], 1)))
        self.xbuf = None if x2.dtype == dtype else self.buffer()

    def buffer(self, dtype=None):
        return torch.empty(self.rows, self.x2.shape[1], dtype=dtype or self.dtype, device=self.x2.device)

    def stack(self, k):
        return torch.empty(k, self.rows, self.x2.shape[1], dtype=self.dtype, device=self.x2.device)

    def __iter__(self):
        for r0 in range(0, self.x2.shape[0], self.rows):
            r1 = min(r0 + self.rows, self.x2.shape[0])
            x = self.x2[r0:r1]
            yield r0, r1, (x if self.xbuf is None else self.xbuf[: r1 - r0].copy_(x))


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

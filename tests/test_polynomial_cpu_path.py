"""The CPU path of the Chebyshev activation (``ChebyshevActivation``) against its specification
(``chebyshev_activation_autograd``): values and gradients of h and of the coefficients, shared and
per neuron, masked (also as the default GELU series, T_1 plus even terms), beyond +-s, over chunk
boundaries that do not divide the rows, in both of its evaluations (power basis and Clenshaw)."""

import pytest
import torch

import modeling_sparse_gpt2.polynomial as P
from modeling_sparse_gpt2.polynomial import ChebyshevActivation, chebyshev_activation, chebyshev_activation_autograd

DOMAIN = 2.0


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(P, "CHUNK_ELEMENTS", 40)  # 3 rows of 13 columns: 7 rows end in a partial chunk


@pytest.fixture(params=["power", "clenshaw"])
def basis(request, monkeypatch):
    """Both evaluations of the series: Horner in the power basis (the default up to degree 8) and Clenshaw."""
    monkeypatch.setattr(P, "POWER_BASIS_MAX_DEGREE", 8 if request.param == "power" else -1)
    return request.param


MASKS = {
    "every_third_off": lambda i: i % 3 != 2,
    "gelu": lambda i: (i < 2) | (i % 2 == 0),  # the conversion's default: T_0, T_1 and the even terms
}


def _inputs(shape, degree, per_neuron, dtype, seed=0, mask="every_third_off"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 * DOMAIN  # many beyond +-s
    h.view(-1)[:4] = torch.tensor([DOMAIN, -DOMAIN, 3 * DOMAIN, -3 * DOMAIN], dtype=torch.float64)
    m = shape[-1]
    c = torch.randn((m, degree + 1) if per_neuron else (degree + 1,), generator=g, dtype=torch.float64)
    mask = MASKS[mask](torch.arange(degree + 1)).double()  # some coefficients masked off
    return h.to(dtype), c.to(dtype if dtype == torch.float64 else torch.float32), mask


def _grads(fn, h, c, mask, degree, gy):
    h, c = h.detach().requires_grad_(), c.detach().requires_grad_()
    y = fn(h, c, mask, DOMAIN, degree)
    y.backward(gy)
    return y.detach(), h.grad, c.grad


@pytest.mark.parametrize("degree", [0, 1, 2, 5, 8, 12])
@pytest.mark.parametrize("per_neuron", [False, True])
@pytest.mark.parametrize("mask_kind", sorted(MASKS))
def test_gradcheck_float64(small_chunks, basis, degree, per_neuron, mask_kind):
    h, c, mask = _inputs((7, 13), degree, per_neuron, torch.float64, mask=mask_kind)
    h = h + 1e-3 * torch.sign(h) * (h.abs() == DOMAIN)  # no finite difference across the kinks at +-s
    fn = lambda h, c: ChebyshevActivation.apply(h, c * mask, DOMAIN, degree)
    assert torch.autograd.gradcheck(fn, (h.requires_grad_(), c.requires_grad_()))


@pytest.mark.parametrize("shape", [(7, 13), (1, 13), (2, 5, 13), (13,)])
@pytest.mark.parametrize("per_neuron", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", sorted(MASKS))
def test_matches_the_autograd_specification(small_chunks, basis, shape, per_neuron, dtype, mask_kind):
    degree = 8
    h, c, mask = _inputs(shape, degree, per_neuron, dtype, mask=mask_kind)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    y, gh, gc = _grads(chebyshev_activation, h, c, mask, degree, gy)
    # the specification in fp32 for half inputs (the CPU path computes in fp32 inside)
    wide = torch.promote_types(dtype, torch.float32)
    y_ref, gh_ref, gc_ref = _grads(chebyshev_activation_autograd, h.to(wide), c, mask, degree, gy.to(wide))
    assert y.dtype == dtype and gh.dtype == dtype and gc.dtype == c.dtype
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.to(wide), y_ref.to(dtype).to(wide), rtol=tol, atol=tol)
    torch.testing.assert_close(gh.to(wide), gh_ref.to(dtype).to(wide), rtol=tol, atol=tol)
    torch.testing.assert_close(gc, gc_ref, rtol=tol, atol=tol * h.numel())
    assert (gc[..., mask == 0] == 0).all()  # masked coefficients get no gradient


def test_the_kinks_at_plus_minus_s_take_the_specifications_one_sided_gradients(small_chunks):
    h = torch.tensor([[-DOMAIN, DOMAIN, 1.5 * DOMAIN, -1.5 * DOMAIN]], dtype=torch.float64)
    _, c, mask = _inputs((1, 4), 8, False, torch.float64)
    gy = torch.ones_like(h)
    _, gh, gc = _grads(chebyshev_activation, h, c, mask, 8, gy)
    _, gh_ref, gc_ref = _grads(chebyshev_activation_autograd, h, c, mask, 8, gy)
    torch.testing.assert_close(gh, gh_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gc, gc_ref, rtol=0, atol=1e-12)
    assert gh[0, 2] == 1.0 and gh[0, 3] == 0.0  # the linear tail's step beyond +s, flat below -s


def test_broadcast_series_of_the_fused_reference_and_only_h_or_only_c_requiring_grad():
    h, c, mask = _inputs((33, 13), 8, False, torch.float32)
    c1 = c[None]  # (1, degree+1), as ffn_kernels' reference passes it
    y, gh, gc = _grads(chebyshev_activation, h, c1, 1.0, 8, torch.ones_like(h))
    y_ref, gh_ref, gc_ref = _grads(chebyshev_activation_autograd, h, c1, 1.0, 8, torch.ones_like(h))
    assert gc.shape == (1, 9)
    torch.testing.assert_close((y, gh, gc), (y_ref, gh_ref, gc_ref), rtol=1e-4, atol=1e-3)
    _, gh_ref, gc_ref = _grads(chebyshev_activation_autograd, h, c, mask, 8, torch.ones_like(h))
    hh = h.clone().requires_grad_()  # only h requires grad
    chebyshev_activation(hh, c, mask, DOMAIN, 8).sum().backward()
    torch.testing.assert_close(hh.grad, gh_ref, rtol=1e-4, atol=1e-4)
    cc = c.clone().requires_grad_()  # only the coefficients
    chebyshev_activation(h, cc, mask, DOMAIN, 8).sum().backward()
    torch.testing.assert_close(cc.grad, gc_ref, rtol=1e-4, atol=1e-3)


def test_cpu_uses_the_function_and_double_backward_is_refused():
    h, c, mask = _inputs((4, 13), 3, True, torch.float64)
    h.requires_grad_()
    y = chebyshev_activation(h, c, mask, DOMAIN, 3)
    assert type(y.grad_fn).__name__ == "ChebyshevActivationBackward"
    assert chebyshev_activation(h, c, mask, DOMAIN, 3, reference=True).grad_fn is not y.grad_fn
    gy = torch.ones_like(y, requires_grad=True)
    (gh,) = torch.autograd.grad(y, h, gy, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):  # once_differentiable
        gh.sum().backward()


def test_mismatched_series_is_one_line_error():
    with pytest.raises(ValueError, match="per-neuron series"):
        chebyshev_activation(torch.randn(4, 13), torch.randn(5, 9), 1.0, DOMAIN, 8)
    with pytest.raises(ValueError, match="degree\\+1"):
        chebyshev_activation(torch.randn(4, 13), torch.randn(13, 7), 1.0, DOMAIN, 8)


def test_the_default_series_is_evaluated_in_u_and_other_series_in_t():
    """Only a series whose odd powers above t vanish (the GELU fit: T_1 plus even terms) takes the
    half-length evaluation in u = t^2; any odd term above T_1 keeps the full one."""
    gelu = torch.tensor([0.8961, 1.5, 0.7109, 0.0, -0.1369, 0.0, 0.0374, 0.0, -0.0092])[:, None]
    e, even = P._power_series(gelu, 8)
    assert even and (e[3::2] == 0).all()
    torch.testing.assert_close(e.T @ torch.tensor([0.3**p for p in range(9)]), torch.tensor(
        [sum(c * P.chebyshev_basis(torch.tensor(0.3, dtype=torch.float64), 8)[i] for i, c in enumerate(gelu[:, 0].tolist()))],
        dtype=torch.float32))
    odd = gelu.clone()
    odd[5] = 1e-3
    assert not P._power_series(odd, 8)[1] and not P._power_series(gelu[:2], 1)[1]

import copy
import math

import pytest
import torch
from torch import nn

from modeling_sparse_gpt2.component_base import FFNContext
from modeling_sparse_gpt2.polynomial import chebyshev_activation, chebyshev_fit, gelu_new
from modeling_sparse_gpt2.spectral import dct_rows
from modeling_sparse_gpt2.micro import MicroComponent
from modeling_sparse_gpt2.tensor import TensorComponent
from modeling_sparse_gpt2.sparse_ffn import UltraEfficientSparseFFN

from conftest import make_nonzero, tiny_config, tiny_model


def test_dct_rows_are_orthonormal():
    basis = dct_rows(torch.arange(32), 32)
    assert torch.allclose(basis @ basis.T, torch.eye(32, dtype=basis.dtype), atol=1e-10)


def test_chebyshev_fit_approximates_gelu_on_its_domain():
    c = chebyshev_fit(gelu_new, 8, 4.0)
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    approx = chebyshev_activation(x, c, torch.ones_like(c), 4.0, 8)
    assert (approx - gelu_new(x)).abs().max() < 0.03
    # GELU = x/2 + even function: the odd Chebyshev coefficients above T_1 vanish
    assert c[3::2].abs().max() < 1e-9


@pytest.mark.parametrize("reference", [True, False], ids=["specification", "cpu-function"])
@pytest.mark.parametrize("degree", [3, 8, 12])
def test_chebyshev_activation_is_the_cosine_series_with_a_flat_left_and_linear_right_tail(reference, degree):
    """a(h) = sum_i c_i cos(i arccos(t)), t = clamp(h / s, -1, 1), plus relu(h - s): T_i from its
    closed form, independent of the recurrences (the specification's and the CPU Function's power
    basis / Clenshaw), inside the domain and on both sides of it."""
    g = torch.Generator().manual_seed(degree)
    c, s = torch.randn(degree + 1, generator=g, dtype=torch.float64), 3.0
    c[degree // 2] = 0.0  # a masked term
    h = torch.linspace(-2 * s, 2 * s, 401, dtype=torch.float64)
    theta = torch.arccos((h / s).clamp(-1.0, 1.0))
    want = sum(c[i] * torch.cos(i * theta) for i in range(degree + 1)) + torch.relu(h - s)
    got = chebyshev_activation(h, c, torch.ones_like(c), s, degree, reference=reference)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9 * want.abs().max().item())


def test_chebyshev_activation_is_finite_for_huge_inputs_in_every_dtype():
    c = chebyshev_fit(gelu_new, 12, 4.0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.tensor([-1e4, -300.0, 0.0, 300.0, 1e4], dtype=dtype)
        y = chebyshev_activation(x, c, torch.ones_like(c), 4.0, 12)
        assert torch.isfinite(y).all(), dtype
        assert y[-1].float().item() == pytest.approx(1e4, rel=0.01)  # continues linearly, as GELU does


def test_monarch_projection_recovers_a_monarch_matrix_exactly():
    spec = tiny_config(tensor_blocks=4).layer_spec(0)
    a, b = TensorComponent(spec), TensorComponent(spec)
    torch.nn.init.normal_(a.left)
    torch.nn.init.normal_(a.right)
    b.project_dense(a.dense().detach())
    assert torch.allclose(b.dense(), a.dense(), atol=1e-5)
    x = torch.randn(5, 32)
    assert torch.allclose(a(x), x @ a.dense().T, atol=1e-5)


def test_monarch_forward_is_its_dense_matrix_on_any_leading_shape():
    spec = tiny_config(tensor_blocks=4).layer_spec(0)
    monarch = TensorComponent(spec).double()
    torch.nn.init.normal_(monarch.left)
    torch.nn.init.normal_(monarch.right)
    x = torch.randn(2, 5, spec.d, dtype=torch.float64)
    # the block formula, written out: h[p, k] = sum_q L[p, k, q] x[p, q]; y[o * bs + k] = sum_p R[k, o, p] h[p, k]
    xb = x.reshape(2, 5, monarch.nb, monarch.bs)
    h = torch.einsum("btpq,pkq->btpk", xb, monarch.left)
    expected = torch.einsum("btpk,kop->btok", h, monarch.right).reshape(2, 5, spec.d)
    torch.testing.assert_close(monarch(x), expected)
    torch.testing.assert_close(monarch(x), x @ monarch.dense().T)


def test_micro_refines_only_its_groups_by_the_step_formula():
    spec = tiny_config(micro_keep_ratio=0.5, micro_steps=2).layer_spec(0)
    micro = MicroComponent(spec).double()
    b, g = micro.group_size, micro.groups
    groups = torch.randperm(spec.d // b)[:g].sort().values
    micro.set_groups(groups)
    torch.nn.init.normal_(micro.blocks, std=0.5)
    x = torch.randn(3, 4, spec.d, dtype=torch.float64)
    expected = torch.zeros_like(x)
    for j, group in enumerate(groups.tolist()):
        cols = slice(group * b, group * b + b)
        z = x[..., cols]
        for s in range(micro.steps):  # z <- z + gelu(B_s z), block j of step s
            z = z + torch.nn.functional.gelu(z @ micro.blocks[s, j].T, approximate="tanh")
        expected[..., cols] = z - x[..., cols]
    torch.testing.assert_close(micro(x), expected)


@pytest.mark.parametrize("gate_kind", ["scalar", "token"])
@pytest.mark.parametrize("selection", ["static", "topk"])
@pytest.mark.parametrize("training", [False, True])
def test_fused_path_equals_reference_path(gate_kind, selection, training):
    model = tiny_model(gate_kind=gate_kind, spectral_selection=selection)
    if gate_kind == "token":
        with torch.no_grad():
            for ffn in model.modules():
                if isinstance(ffn, UltraEfficientSparseFFN):
                    ffn.c_fc.weight[ffn.gate_rows].normal_(std=0.3)
    model.train(training)  # dropout is 0 in the tiny config, so train mode is deterministic
    ids = torch.randint(0, 97, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    fused = model(ids, attention_mask=mask).logits
    model.set_fused_ffn(False)
    reference = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=0)
    if training:
        fused_ffn_out = model.transformer.h[0].mlp
        x = torch.randn(2, 5, 32, requires_grad=True)
        ffn_ref = fused_ffn_out(x)
        fused_ffn_out.use_fused = True
        ffn_fused = fused_ffn_out(x)
        g_ref = torch.autograd.grad(ffn_ref.sum(), x)[0]
        g_fused = torch.autograd.grad(ffn_fused.sum(), x)[0]
        torch.testing.assert_close(g_fused, g_ref, atol=1e-5, rtol=1e-5)  # fp32: one GEMM vs per-segment GEMMs


def test_every_component_contributes_to_the_output():
    model = tiny_model()
    ffn = model.transformer.h[0].mlp
    x = torch.randn(2, 6, 32)
    base = ffn(x)
    for i, name in enumerate(ffn.components):
        with torch.no_grad():
            saved = ffn.gates.weight[i].clone()
            ffn.gates.weight[i].zero_()
        assert not torch.allclose(ffn(x), base), name
        with torch.no_grad():
            ffn.gates.weight[i].copy_(saved)


def test_no_grad_calls_see_every_change_of_the_weights_the_op_reads():
    """The op reads the coefficients, their mask, the gates and the feedback taps as they are on every
    call: every in-place change or replacement of one is seen without autograd, so the output equals a
    call with autograd on."""
    model = tiny_model(sparse_components=["polynomial", "spectral", "feedback", "tensor"])  # gates beyond the op's
    ffn = model.transformer.h[0].mlp
    poly, feedback = ffn.components["polynomial"], ffn.components["feedback"]
    x = torch.randn(2, 5, 32)
    changes = {
        "coeffs in place": lambda: poly.coeffs.mul_(1.5),
        "coeff_mask in place": lambda: poly.coeff_mask[1].zero_(),
        "gates in place": lambda: ffn.gates.weight[2].mul_(0.5),
        "feedback taps in place": lambda: feedback.kernel.add_(0.5),
        "coeffs replaced": lambda: setattr(poly, "coeffs", nn.Parameter(poly.coeffs * 0.5)),
        "gates loaded": lambda: ffn.gates.load_state_dict({"weight": ffn.gates.weight * 0.5}),
    }
    for what, change in changes.items():
        with torch.no_grad():
            before = ffn(x)
            change()
            after = ffn(x)
        fresh = ffn(x)  # autograd on: nothing is reused
        assert not torch.allclose(after, before), what
        torch.testing.assert_close(after, fresh, atol=0, rtol=0, msg=what)
    twin = copy.deepcopy(ffn)  # as harness.inference_copy serves a model: the copy reads its own weights
    with torch.no_grad():
        before = ffn(x)
        twin.components["polynomial"].coeffs.mul_(2)
        torch.testing.assert_close(ffn(x), before, atol=0, rtol=0)
        assert not torch.allclose(twin(x), before)


def test_a_token_mask_shorter_than_the_tokens_is_an_error():
    """The FFN's op call skips the layout checks, not the check of the mask it is given (the
    kernels would read before its start)."""
    ffn = tiny_model(sparse_components=["polynomial", "feedback"]).transformer.h[0].mlp
    with pytest.raises(ValueError, match="shorter than the 5 tokens"):
        ffn(torch.randn(2, 5, 32), FFNContext(token_mask=torch.ones(2, 4)))


def test_feedback_is_causal():
    model = tiny_model(sparse_components=["polynomial", "feedback"])
    ffn = model.transformer.h[0].mlp
    x = torch.randn(1, 10, 32)
    y = ffn(x)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    y2 = ffn(x2)
    torch.testing.assert_close(y[:, :6], y2[:, :6])
    assert not torch.allclose(y[:, 6:], y2[:, 6:])


def test_components_own_their_slices_of_c_fc_and_c_proj():
    """Writing through a component's slice changes the fused path exactly as the reference path."""
    model = tiny_model()
    ffn = model.transformer.h[0].mlp
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        before = ffn(x)
        ffn.w_out("polynomial").mul_(2)
        after = ffn(x)
    assert not torch.allclose(before, after)
    assert ffn.w_in("feedback").data_ptr() == ffn.c_fc.weight[ffn.segments["feedback"]].data_ptr()
    ffn.use_fused = False
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), after, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "components",
    [["tensor"], ["spectral"], ["micro"], ["feedback", "micro"], ["spectral", "tensor"], ["polynomial"]],
    ids="-".join,
)
def test_any_component_set_builds_trains_and_matches_the_reference(components):
    """Without the polynomial backbone too (a Monarch-only or spectral-only FFN from scratch)."""
    model = tiny_model(sparse_components=components, gate_kind="token").train()
    x = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    model(x, labels=x).loss.backward()
    ffn_params = [p for n, p in model.named_parameters() if ".mlp." in n and p.numel()]
    assert ffn_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in ffn_params)
    with torch.no_grad():
        fused = model(x).logits
        model.set_fused_ffn(False)
        torch.testing.assert_close(model(x).logits, fused, atol=1e-5, rtol=0)

"""The token-feedback component computes the causal-window formula written in ``feedback.py``:

    u_t = U x_t,   u_t = 0 where token t is padding (and u_t = 0 for t < 0)
    s_t = gelu_tanh( sum_{j<w} K[:, j] * u_{t-w+1+j} )
    y_t = V s_t

checked on random inputs against a loop written from that formula (float64, so the comparison is to
rounding), without a cache, in decode (prefill, then one token or a few tokens at a time, the state
carried on a ``Cache``), and inside the whole model while it decodes. A component that drops a tap
(the oldest or any other), ignores the earlier tokens, or keeps a wrong decode state fails here; the
causality test in test_components only checks that later tokens do not leak in.

Component internals used: ``FeedbackComponent.activate(u, ctx)`` and ``kernel``; the FFN's U and V
rows/columns and the feedback's gate are read through ``feedback_weights`` below.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from modeling_sparse_gpt2.component_base import FFNContext
from modeling_sparse_gpt2.feedback import FeedbackComponent

from conftest import tiny_config, tiny_model

EXACT = dict(atol=1e-12, rtol=1e-12)  # float64: the formula and the component differ by rounding only
FAST = settings(max_examples=30, deadline=None, database=None)


def formula(u, kernel, mask=None):
    """s_t = gelu_tanh(sum_j K[:, j] u_{t-w+1+j}) for (batch, T, r) u, written as a loop over t and j."""
    if mask is not None:
        u = u * mask[..., None].to(u.dtype)
    batch, length, rank = u.shape
    w = kernel.shape[1]
    s = torch.zeros_like(u)
    for t in range(length):
        for j in range(w):
            src = t - w + 1 + j
            if src >= 0:
                s[:, t] += kernel[:, j] * u[:, src]
    return F.gelu(s, approximate="tanh")


def component(rank, window, seed):
    spec = tiny_config(feedback_rank=rank, feedback_window=window).layer_spec(0)
    comp = FeedbackComponent(spec).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        comp.kernel.copy_(torch.randn(comp.kernel.shape, generator=g, dtype=torch.float64))
    return comp


cases = st.fixed_dictionaries(dict(
    rank=st.integers(1, 5), window=st.integers(1, 6), batch=st.integers(1, 3), length=st.integers(1, 12),
    seed=st.integers(0, 2**16), padded=st.booleans(),
))  # fmt: skip


def random_inputs(case):
    g = torch.Generator().manual_seed(case["seed"] + 1)
    u = torch.randn(case["batch"], case["length"], case["rank"], generator=g, dtype=torch.float64)
    mask = None
    if case["padded"]:  # left padding of a random width per row
        pads = torch.randint(0, case["length"], (case["batch"],), generator=g)
        mask = (torch.arange(case["length"])[None] >= pads[:, None]).long()
    return u, mask


@FAST
@given(case=cases)
def test_feedback_activation_is_the_causal_window_formula(case):
    comp = component(case["rank"], case["window"], case["seed"])
    u, mask = random_inputs(case)
    got = comp.activate(u, FFNContext(token_mask=mask))
    torch.testing.assert_close(got, formula(u, comp.kernel, mask), **EXACT)


@FAST
@given(case=cases, chunk=st.integers(1, 3), prefill=st.integers(1, 6))
def test_feedback_decode_state_gives_the_formula_of_the_whole_sequence(case, chunk, prefill):
    """Prefill, then chunks of ``chunk`` tokens with the state on a Cache: each step's output is the
    formula's output for those positions of the whole sequence."""
    comp = component(case["rank"], case["window"], case["seed"])
    u, mask = random_inputs(case)
    expected = formula(u, comp.kernel, mask)
    cache = DynamicCache()
    bounds = [0, min(prefill, case["length"])]
    while bounds[-1] < case["length"]:
        bounds.append(min(bounds[-1] + chunk, case["length"]))
    for a, b in zip(bounds, bounds[1:]):
        step_mask = None if mask is None else mask[:, :b]  # generate passes the mask so far
        got = comp.activate(u[:, a:b], FFNContext(cache=cache, token_mask=step_mask, layer_idx=0))
        torch.testing.assert_close(got, expected[:, a:b], **EXACT, msg=f"tokens {a}:{b}")


def test_formula_reference_notices_a_dropped_tap_and_ignored_history():
    """The reference loop itself tells the wrong convolutions apart (so the tests above can fail)."""
    comp = component(3, 4, seed=0)
    u, _ = random_inputs(dict(batch=2, length=9, rank=3, seed=0, padded=False))
    right = formula(u, comp.kernel)
    no_oldest = comp.kernel.clone()
    no_oldest[:, 0] = 0
    only_current = torch.zeros_like(comp.kernel)
    only_current[:, -1] = comp.kernel[:, -1]
    for wrong in (no_oldest, only_current):
        assert (formula(u, wrong) - right).abs().max() > 1e-2


def feedback_weights(ffn):
    """(U, V, K, gate) of the FFN's feedback component: U (r, d) and V (d, r), views of its c_fc rows and
    c_proj columns, K (r, w), and its scalar gate."""
    comp = ffn.components["feedback"]
    i = list(ffn.components).index("feedback")
    return ffn.w_in("feedback"), ffn.w_out("feedback"), comp.kernel, ffn.gates.weight[i]


def test_whole_model_decode_feedback_contribution_is_the_formula():
    """Inside the model, while decoding with a cache one token at a time (after a left-padded prefill),
    each FFN's output minus its output without feedback is g * V s_t, s from the formula over the
    FFN's inputs of every token so far."""
    model = tiny_model(sparse_components=["polynomial", "feedback"], feedback_window=4, gate_kind="scalar").double()
    ffns = [b.mlp for b in model.transformer.h]
    seen = {id(f): [] for f in ffns}
    hooks = [f.register_forward_hook(lambda m, a, out: seen[id(m)].append((a[0].detach(), out.detach()))) for f in ffns]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 is left-padded: those tokens' u must be zero
    prefill = 4
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :prefill], attention_mask=mask[:, :prefill], cache=cache, use_cache=True)
        for t in range(prefill, ids.shape[1]):
            model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
    for h in hooks:
        h.remove()
    assert all(len(v) == 1 + ids.shape[1] - prefill for v in seen.values())
    for layer, ffn in enumerate(ffns):
        x = torch.cat([a for a, _ in seen[id(ffn)]], dim=1)
        y = torch.cat([o for _, o in seen[id(ffn)]], dim=1)
        U, V, K, gate = feedback_weights(ffn)
        with torch.no_grad():
            s = formula(x @ U.T, K, mask)
            contribution = gate * (s @ V.T)
            saved = V.clone()
            V.zero_()
            without = ffn(x)  # every other component is per token: no cache needed
            V.copy_(saved)
        assert contribution.abs().max() > 0.1  # premise: the feedback matters
        torch.testing.assert_close(y, without + contribution, atol=1e-10, rtol=1e-10, msg=f"layer {layer}")

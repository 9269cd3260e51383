"""Dense -> sparse conversion (issue: conversion, healing, main job)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from modeling_sparse_gpt2 import SparseGPT2LMHeadModel
from modeling_sparse_gpt2.tooling.conversion import (
    TOKENS_PER_FEATURE,
    ConversionArguments,
    convert_gpt2_to_sparse,
    largest_fit,
    select_neurons,
    select_neurons_obs,
    sparse_config_for_budget,
    split_calibration,
)
from modeling_sparse_gpt2.tooling.data import load_texts, token_stream, tokenize_blocks
from modeling_sparse_gpt2.tooling.evaluation import perplexity
from modeling_sparse_gpt2.tooling.checkpoints import DEFAULT_CALIBRATION, DEFAULT_MODEL, DEFAULT_VALIDATION, load_tokenizer


def tiny_dense(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def calib(n=16, t=32, vocab=97, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


IN_GEMMS = ["polynomial", "spectral", "feedback"]  # the tests below exercise the fit and budget of all three


@pytest.fixture(scope="module")
def trained():
    """The small dense GPT-2 shipped with the package, with real calibration and held-out text."""
    dense = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    tok = load_tokenizer(DEFAULT_MODEL)
    cal = tokenize_blocks(load_texts(DEFAULT_CALIBRATION), tok, 128, 19)  # 17 fitted x 128 >= 2 x (1,024 neurons + 1)
    val = token_stream(load_texts(DEFAULT_VALIDATION), tok)[:4096]
    return dense, cal, val


@pytest.mark.parametrize("ratio", [0.6, 0.4, 0.2])
@pytest.mark.parametrize("mode", ["uniform", "sensitivity"])
def test_achieved_ffn_flops_ratio_is_at_or_under_the_request(ratio, mode):
    dense = tiny_dense(n_embd=64)
    args = ConversionArguments(ffn_flops_ratio=ratio, budget_mode=mode, sparse_components=IN_GEMMS)  # costs beside the neurons
    sparse, report = convert_gpt2_to_sparse(dense, calib(24), args)
    assert report["ffn_flops_ratio"] <= ratio + 1e-9
    assert report["ffn_flops_ratio"] > ratio - 0.05  # and it spends the budget
    assert sparse.flops_report(1, 32)["FLOPs/ffn_ratio"] == pytest.approx(report["ffn_flops_ratio"])


def test_sensitivity_mode_gives_layers_different_budgets_within_the_total():
    dense = tiny_dense(n_embd=64)
    cfg = sparse_config_for_budget(dense.config, ConversionArguments(ffn_flops_ratio=0.4), layer_weights=[1.0, 3.0])
    keep = cfg.poly_keep_ratio
    assert keep[1] > keep[0]
    uniform = sparse_config_for_budget(dense.config, ConversionArguments(ffn_flops_ratio=0.4))
    assert sum(keep) <= sum(uniform.poly_keep_ratio) + 1e-9


def test_the_default_conversion_builds_polynomial_only_ffns_and_its_config_card_and_help_say_so():
    """Issue 12: on the healing curve spectral + feedback did not pay back their share of the budget at any
    healing length, so the conversion builds the polynomial backbone alone unless asked for more."""
    from modeling_sparse_gpt2.tooling.cli import command_parser
    from modeling_sparse_gpt2.tooling.model_card import make_model_card

    sparse, report = convert_gpt2_to_sparse(tiny_dense(), calib(), ConversionArguments())
    assert sparse.config.sparse_components == ["polynomial"]
    for block in sparse.transformer.h:
        assert list(block.mlp.components) == ["polynomial"]
        assert block.mlp.c_fc.out_features == block.mlp.components["polynomial"].rows  # no other segment in the GEMMs
    assert 0.35 < report["ffn_flops_ratio"] <= 0.4  # the whole budget goes to kept neurons
    card = make_model_card(sparse, base_model="gpt2", perplexities={"converted": 20.0}, seq_len=32).text
    assert "(components: polynomial)" in card
    for other in ("| spectral |", "| feedback |", "| k_freq |", "| feedback_rank |", "| feedback_window |"):
        assert other not in card, other
    flag = next(a for a in command_parser("convert")._actions if a.dest == "sparse_components")
    assert flag.default == ["polynomial"] and "did not pay back" in flag.help and "healing curve" in flag.help


def test_non_mlp_weights_are_bit_identical_to_the_dense_model():
    dense = tiny_dense()
    sparse, _ = convert_gpt2_to_sparse(dense, calib(), ConversionArguments(ffn_flops_ratio=0.5))
    sd = sparse.state_dict()
    compared = 0
    for name, tensor in dense.state_dict().items():
        if ".mlp." in name:
            continue
        assert torch.equal(sd[name], tensor), name
        compared += 1
    assert compared >= 2 + 2 * 8  # wte, wpe, ln_f + per block ln_1/2, attn weights and biases


def test_mlp_is_initialised_from_the_dense_c_fc_rows():
    dense = tiny_dense()
    sparse, _ = convert_gpt2_to_sparse(dense, calib(), ConversionArguments(ffn_flops_ratio=0.5))
    for db, sb in zip(dense.transformer.h, sparse.transformer.h):
        poly = sb.mlp.components["polynomial"]
        idx = poly.neuron_index
        assert (idx >= 0).all() and len(set(idx.tolist())) == len(idx)
        assert torch.equal(sb.mlp.w_in("polynomial"), db.mlp.c_fc.weight[:, idx].T)
        assert torch.equal(sb.mlp.b_in("polynomial"), db.mlp.c_fc.bias[idx])
        assert int(poly.coeff_mask.sum()) == 6  # sparse Chebyshev coefficients
        assert torch.count_nonzero(poly.coeffs) == 6


def test_all_neurons_and_high_degree_reproduce_the_dense_logits():
    """Tolerance from the logits' scale: max |logit difference| < 1e-3 x the dense logits' standard
    deviation (measured: 1.3e-5 on a spread of 0.12, i.e. 1e-4 of it; Chebyshev degree 16 vs GELU,
    ridge 1e-6). A fitted c_proj scaled by 1.1 moves the logits by ~1e-2 of their spread."""
    dense = tiny_dense()
    args = ConversionArguments(poly_keep_ratio=1.0, poly_degree=16, poly_num_terms=None, sparse_components=["polynomial"], ridge=1e-6)
    sparse, report = convert_gpt2_to_sparse(dense, calib(), args)
    x = calib(3, 32, seed=5)
    with torch.no_grad():
        expected = dense(x).logits
        diff = (sparse(x).logits - expected).abs().max().item()
    assert diff < 1e-3 * expected.std().item()
    assert all(layer["rel_error_sparse_ffn"] < 1e-7 for layer in report["layers"])  # measured 1.1e-9


def fitted_output_side(ffn):
    """The parameters the conversion fits by least squares: the kept neurons' and the spectral map's
    c_proj columns and the FFN's output bias (the tensor factor is projected, micro and feedback start
    at zero), as (parameter, mask of its fitted entries)."""
    columns = torch.zeros_like(ffn.c_proj.weight, dtype=torch.bool)
    for name in ("polynomial", "spectral"):
        if name in ffn.components:
            columns[:, ffn.segments[name]] = True
    return [(ffn.c_proj.weight, columns), (ffn.c_proj.bias, torch.ones_like(ffn.c_proj.bias, dtype=torch.bool))]


def test_output_side_is_the_least_squares_optimum_on_the_calibration_activations():
    """With ridge 0 the fitted output side must minimise sum ||ffn(x) - mlp(x)||^2 over the calibration
    tokens, x being each layer's input in the converted model (the layers before it already sparse).
    The loss is quadratic in those parameters, so an exact line search along its gradient g lowers it
    by (g.g)^2 / (4 ||A g||^2), A g = ffn(x; theta + g) - ffn(x; theta): ~0 at the optimum (measured
    6e-13 of the loss in float64), 7e-2 with the kept neurons' c_proj scaled by 1.1. The reported
    per-layer error must be that loss over the centred energy of the dense output."""
    dense, cal = tiny_dense(), calib()
    args = ConversionArguments(ffn_flops_ratio=0.5, ridge=0.0, sparse_components=["polynomial", "spectral", "feedback", "tensor"])
    sparse, report = convert_gpt2_to_sparse(dense, cal, args)
    sparse, dense = sparse.double(), dense.double()
    inputs = {}
    hooks = [b.mlp.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0].detach())) for i, b in enumerate(sparse.transformer.h)]
    fitted, _ = split_calibration(cal)
    with torch.no_grad():
        sparse(fitted)
    for h in hooks:
        h.remove()
    for i, (dense_block, block) in enumerate(zip(dense.transformer.h, sparse.transformer.h)):
        ffn, x = block.mlp, inputs[i]
        with torch.no_grad():
            y = dense_block.mlp(x)
        params, masks = zip(*fitted_output_side(ffn))
        loss = ((ffn(x) - y) ** 2).sum()
        # the forward reads c_proj whole, so differentiate it and keep the fitted entries' gradient
        grads = [g * m for g, m in zip(torch.autograd.grad(loss, params), masks)]
        with torch.no_grad():
            base = ffn(x)
            for p, g in zip(params, grads):
                p.add_(g)
            a_g = ffn(x) - base
            for p, g in zip(params, grads):
                p.sub_(g)
        gg = sum((g * g).sum() for g in grads)
        reduction = gg**2 / (4 * (a_g**2).sum())
        assert reduction / loss < 1e-8, (i, (reduction / loss).item())
        centred = ((y - y.mean(dim=(0, 1))) ** 2).sum()
        assert report["layers"][i]["rel_error_sparse_ffn"] == pytest.approx((loss / centred).item(), rel=1e-4), i


def test_obs_selection_reconstructs_better_than_importance(trained):
    dense, cal, _ = trained
    mlp = dense.transformer.h[1].mlp
    xs, ys = [], []
    h = mlp.register_forward_hook(lambda mod, i, o: (xs.append(i[0].reshape(-1, i[0].shape[-1])), ys.append(o.reshape(-1, o.shape[-1]))) and None)
    with torch.no_grad():
        dense(cal[:8])
    h.remove()
    x, y = torch.cat(xs), torch.cat(ys)

    def refit_error(neurons):
        a = mlp.act(x @ mlp.c_fc.weight[:, neurons] + mlp.c_fc.bias[neurons]).double()
        a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        w = torch.linalg.lstsq(a, y.double()).solution
        return ((a @ w - y.double()) ** 2).sum().item()

    m = 300
    obs = select_neurons_obs(mlp, [x], [y], m, ridge=1e-3)
    imp = select_neurons(mlp, [x], m)
    assert len(obs) == m
    assert refit_error(obs) < refit_error(imp)


def test_perplexity_rises_monotonically_as_the_budget_shrinks(trained):
    dense, cal, val = trained
    ppl = [perplexity(dense, val, 128)["perplexity"]]
    for ratio in (0.7, 0.4, 0.15):
        sparse, report = convert_gpt2_to_sparse(dense, cal, ConversionArguments(ffn_flops_ratio=ratio))
        ppl.append(perplexity(sparse, val, 128)["perplexity"])
        for layer in report["layers"]:  # on real text the fit is better on its own tokens than on new ones
            assert layer["rel_error_sparse_ffn_held_out"] > layer["rel_error_sparse_ffn"], (ratio, layer)
    assert all(a < b for a, b in zip(ppl, ppl[1:])), ppl
    assert ppl[1] < 1.5 * ppl[0], ppl  # a generous budget stays close to dense


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_fit_domain_rule_picks_the_domain_where_the_series_reproduces_gelu_best(device):
    """--poly_domain_rule fit: on wide pre-activations (as a trained model's are) the quantile rule puts s at
    6-8, where a degree-8 series is percents off GELU; the fit rule's s is the grid's best and beats it.
    With the model on a GPU too (the calibration's pre-activations stay on the CPU): the healing curve's
    fit-domain row once failed there on a device mismatch."""
    from modeling_sparse_gpt2.polynomial import chebyshev_activation_autograd, gelu_new
    from modeling_sparse_gpt2.tooling.conversion import DOMAIN_GRID, choose_domain

    ffn = SparseGPT2LMHeadModel(sparse_config_for_budget(tiny_dense().config, ConversionArguments(sparse_components=["polynomial"]))).transformer.h[0].mlp.to(device)
    poly = ffn.components["polynomial"]
    h = torch.randn(100_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2.5 - 1.0

    def error(domain):
        poly.domain = domain
        poly.fit_activation(samples=h)
        a = chebyshev_activation_autograd(h, poly.coeffs.detach().view(-1, poly.degree + 1)[0].cpu().double(), poly.coeff_mask.cpu().double(), domain, poly.degree)
        return float((a - gelu_new(h)).norm() / gelu_new(h).norm())

    quantile, fit = choose_domain(poly, h, "quantile"), choose_domain(poly, h, "fit")
    assert quantile >= 6 and fit in DOMAIN_GRID and fit < quantile
    assert error(fit) == min(error(s) for s in DOMAIN_GRID) and error(fit) < error(quantile) / 3


def test_conversion_refuses_a_model_that_is_not_gpt2():
    sparse = SparseGPT2LMHeadModel(sparse_config_for_budget(tiny_dense().config, ConversionArguments()))
    with pytest.raises(ValueError, match="already a SparseGPT2"):
        convert_gpt2_to_sparse(sparse, calib())
    with pytest.raises(ValueError, match="expected a dense GPT-2"):
        convert_gpt2_to_sparse(torch.nn.Linear(2, 2), calib())


def test_budget_that_cannot_be_met_names_the_knobs():
    args = ConversionArguments(ffn_flops_ratio=0.01, sparse_components=IN_GEMMS)  # one neuron alone is 1/128 of the MLP
    with pytest.raises(ValueError, match="ffn_flops_ratio=0.01 cannot be met"):
        convert_gpt2_to_sparse(tiny_dense(), calib(), args)


def test_empty_or_too_long_calibration_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        convert_gpt2_to_sparse(tiny_dense(), torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's n_positions"):
        convert_gpt2_to_sparse(tiny_dense(), calib(2, 100))


def test_a_two_token_calibration_file_is_refused_naming_the_flags_and_the_floor(tmp_path):
    tok = load_tokenizer(DEFAULT_MODEL)
    path = tmp_path / "two_tokens.txt"
    path.write_text("import")
    ids = tokenize_blocks(load_texts(str(path)), tok, 2, 64)
    assert ids.shape == (1, 2)  # "import" and the end-of-text token
    with pytest.raises(ValueError) as err:
        convert_gpt2_to_sparse(tiny_dense(vocab_size=len(tok)), ids)
    message = str(err.value)
    features = 4 * 32 + 1  # the OBS selection's least squares over every dense neuron + bias
    assert "\n" not in message
    for part in ("--num_calibration_samples", "--block_size", "--calibration_file", f"{features} features",
                 f"needs {2 * features} tokens", "give 2 tokens to fit"):
        assert part in message, (part, message)


def test_calibration_floor_is_two_fitted_tokens_per_feature_of_the_largest_fit():
    dense, args = tiny_dense(), ConversionArguments(ffn_flops_ratio=0.5)
    features, _ = largest_fit(sparse_config_for_budget(dense.config, args), "obs")
    assert features == 4 * 32 + 1
    assert TOKENS_PER_FEATURE == 2
    fitted_sequences = -(-2 * features // 32)  # 9 of 32 tokens, plus 1 in 8 held out
    with pytest.raises(ValueError, match="calibration too small"):
        convert_gpt2_to_sparse(dense, calib(fitted_sequences), args)
    convert_gpt2_to_sparse(dense, calib(fitted_sequences + 1), args)
    # no fit over all neurons: the largest is the output side's over the kept neurons and the spectral candidates
    imp = ConversionArguments(ffn_flops_ratio=0.5, neuron_selection="importance", sparse_components=IN_GEMMS)
    spec = sparse_config_for_budget(dense.config, imp).layer_spec(0)
    assert largest_fit(sparse_config_for_budget(dense.config, imp), "importance")[0] == spec.poly_neurons + spec.spectral_candidates + 1


def test_held_out_sequences_are_never_fitted_and_their_error_is_reported():
    dense, args = tiny_dense(), ConversionArguments(ffn_flops_ratio=0.5, sparse_components=IN_GEMMS)  # frequencies chosen too
    ids = calib(16)
    other = ids.clone()
    other[7::8] = calib(2, seed=9)  # only the held-out sequences (every 8th) differ
    logs = []
    torch.manual_seed(0)  # the parts no fit sets (feedback's w_in) start from the same random draw
    sparse, report = convert_gpt2_to_sparse(dense, ids, args, progress=logs.append)
    torch.manual_seed(0)
    sparse_other, report_other = convert_gpt2_to_sparse(dense, other, args)
    for (name, a), b in zip(sparse.state_dict().items(), sparse_other.state_dict().values()):
        assert torch.equal(a, b), name  # the fit never saw them
    held_out = [layer["rel_error_sparse_ffn_held_out"] for layer in report["layers"]]
    assert held_out != [layer["rel_error_sparse_ffn_held_out"] for layer in report_other["layers"]]
    assert (report["calibration_tokens_fitted"], report["calibration_tokens_held_out"]) == (14 * 32, 2 * 32)
    for layer, line in zip(report["layers"], logs):
        assert layer["rel_error_sparse_ffn_held_out"] != pytest.approx(layer["rel_error_sparse_ffn"], rel=1e-2)
        assert f"{layer['rel_error_sparse_ffn_held_out']:.4f} held out" in line
    captured = []  # layer 0's held-out error, recomputed from the dense MLP's input on those sequences
    hook = dense.transformer.h[0].mlp.register_forward_hook(lambda mod, i, o: captured.append((i[0], o)))
    with torch.no_grad():
        dense(ids[7::8])
        hook.remove()
        x, y = captured[0]
        residual = (sparse.transformer.h[0].mlp(x) - y).pow(2).sum()
    centred = (y - y.reshape(-1, y.shape[-1]).mean(0)).pow(2).sum()
    assert held_out[0] == pytest.approx((residual / centred).item(), rel=1e-4)


@pytest.mark.parametrize("bad", [dict(ffn_flops_ratio=0), dict(budget_mode="greedy"), dict(neuron_selection="random"), dict(ridge=-1),
                                 dict(poly_domain_rule="widest")])
def test_conversion_arguments_validate_themselves(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ConversionArguments(**bad)


def test_perplexity_matches_a_hand_computation():
    model = tiny_dense()
    tokens = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # stride == block: windows [0,64), [64,128), [128,150); every target after a window's first token
        nll, n = 0.0, 0
        for b in range(0, 150, 64):
            w = tokens[b : b + 64]
            logp = torch.log_softmax(model(w[None]).logits[0, :-1], -1)
            nll -= logp.gather(1, w[1:, None]).sum().item()
            n += len(w) - 1
        res = perplexity(model, tokens, 64)
        assert res["tokens_scored"] == n
        assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
        # stride 32 < block 64: every token from the 2nd on is scored exactly once
        nll, n = 0.0, 0
        prev_end = 0
        for b in range(0, 149, 32):
            e = min(b + 64, 150)
            w = tokens[b:e]
            logp = torch.log_softmax(model(w[None]).logits[0, :-1], -1)
            targets = list(range(max(prev_end, b + 1), e))
            for t in targets:
                nll -= logp[t - b - 1, tokens[t]].item()
            n += len(targets)
            prev_end = e
            if e == 150:
                break
        res = perplexity(model, tokens, 64, stride=32)
        assert res["tokens_scored"] == n == 149
        assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_spectral_frequencies_are_where_the_residual_lives():
    """The spectral segment keeps the k DCT frequencies of x that carry the residual the kept neurons
    leave: with a target whose unexplained part depends on x only through k planted frequencies (the
    kept activations independent of x), the fit chooses exactly those, and its residual is the noise."""
    from modeling_sparse_gpt2.configuration_sparse_gpt2 import SparseGPT2Config
    from modeling_sparse_gpt2.sparse_ffn import UltraEfficientSparseFFN
    from modeling_sparse_gpt2.spectral import dct_rows
    from modeling_sparse_gpt2.tooling.conversion import GramStats, fit_output_side

    d, k = 32, 4
    ffn = UltraEfficientSparseFFN(SparseGPT2Config(n_embd=d, n_layer=1, n_head=4, n_positions=16, vocab_size=97,
                                                   sparse_components=["polynomial", "spectral"], k_freq=k), 0)
    m = ffn.segment_widths[0]
    g = torch.Generator().manual_seed(0)
    planted = torch.tensor([3, 9, 17, 25])
    x, a = torch.randn(4096, d, generator=g, dtype=torch.float64), torch.randn(4096, m, generator=g, dtype=torch.float64)
    z = x @ dct_rows(planted, d).double().T  # x's planted frequency components
    y = a @ torch.randn(m, d, generator=g, dtype=torch.float64) + z @ torch.randn(k, d, generator=g, dtype=torch.float64)
    y = y + 1e-3 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    stats = GramStats(m, d, "cpu")
    stats.add(a, x, y)
    residual, pruned_only = fit_output_side(ffn, stats, ridge=1e-9)
    assert ffn.components["spectral"].freq_index.tolist() == planted.tolist()
    assert residual.sum() < 1e-4 * pruned_only.sum()

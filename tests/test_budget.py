"""The one FFN FLOPs budget solver (tooling/budget.py) that the conversion and the benchmarks call."""

import pytest

from modeling_sparse_gpt2.tooling.budget import (
    kept_neurons_by_sensitivity,
    kept_neurons_within,
    layer_flops_ratio,
    with_kept_neurons,
)

from conftest import ALL, tiny_config

PER_LAYER_SETS = dict(n_embd=64, sparse_components=[["polynomial"], ALL], tensor_blocks=8, k_freq=8)


@pytest.mark.parametrize("target", [0.9, 0.4, 0.15])
def test_kept_neurons_are_the_most_within_the_target_in_every_layer(target):
    config = tiny_config(**PER_LAYER_SETS)
    kept = kept_neurons_within(config, target)
    assert kept[0] > kept[1]  # layer 1's other components take part of its budget
    for i, m in enumerate(kept):
        assert layer_flops_ratio(with_kept_neurons(config, [m] * 2), i) <= target
        if m < config.inner_dim:
            assert layer_flops_ratio(with_kept_neurons(config, [m + 1] * 2), i) > target


def test_sensitivity_budget_follows_the_weights_within_the_uniform_total():
    config = tiny_config(n_embd=64, sparse_components=["polynomial", "spectral"], k_freq=8)
    uniform = kept_neurons_within(config, 0.4)
    kept = kept_neurons_by_sensitivity(config, 0.4, [1.0, 3.0])
    assert kept[0] < uniform[0] == uniform[1] < kept[1]
    total = lambda ks: sum(layer_flops_ratio(with_kept_neurons(config, ks), i) for i in range(2))  # noqa: E731
    assert total(kept) <= total(uniform) + 1e-12


def test_budget_below_the_fixed_components_names_the_flag_and_the_knobs():
    with pytest.raises(ValueError, match=r"ffn_flops_ratio=0.01 cannot be met.*--k_freq"):
        kept_neurons_within(tiny_config(), 0.01)


def test_budget_without_the_polynomial_backbone_says_so():
    with pytest.raises(ValueError, match="add polynomial to --sparse_components"):
        kept_neurons_within(tiny_config(sparse_components=["spectral", "tensor"]), 0.4)

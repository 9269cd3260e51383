"""The FFN FLOPs budget: how many neurons each layer keeps within a target FLOPs ratio.

One layer's FFN FLOPs are linear in its kept neurons m (the polynomial backbone costs 4·d·m, every
other component a fixed amount), so the most neurons within a target ratio r of the dense MLP are

    m = 1 + floor((r - ratio(m=1)) / (ratio(m=2) - ratio(m=1)))

with ratio(m) counted by the FFN itself (``flops_per_token``). The conversion and the benchmarks
both call ``kept_neurons_within`` (uniform) or ``kept_neurons_by_sensitivity``.
"""

import copy
import math

import torch

from ..configuration_sparse_gpt2 import SparseGPT2Config
from ..sparse_ffn import UltraEfficientSparseFFN

ROOM_KNOBS = "--k_freq, --feedback_rank, --tensor_blocks, --micro_keep_ratio, --sparse_components"


def with_kept_neurons(config: SparseGPT2Config, neurons: list[int]) -> SparseGPT2Config:
    """A copy of ``config`` whose layer i keeps ``neurons[i]`` of the dense MLP's neurons."""
    config = copy.deepcopy(config)
    config.poly_keep_ratio = [m / config.inner_dim for m in neurons]
    return config


def layer_flops_ratio(config: SparseGPT2Config, layer: int) -> float:
    """Matmul FLOPs of layer ``layer``'s sparse FFN over those of the dense MLP it replaces."""
    with torch.device("meta"):
        ffn = UltraEfficientSparseFFN(config, layer)
    return sum(mm for mm, _ in ffn.flops_per_token().values()) / ffn.dense_flops_per_token()


def _linear_costs(config: SparseGPT2Config) -> list[tuple[float, float]]:
    """Per layer (ratio with one kept neuron, ratio added by each further neuron)."""
    one, two = with_kept_neurons(config, [1] * config.n_layer), with_kept_neurons(config, [2] * config.n_layer)
    costs = []
    for i in range(config.n_layer):
        base = layer_flops_ratio(one, i)
        costs.append((base, layer_flops_ratio(two, i) - base))
    return costs


def kept_neurons_within(config: SparseGPT2Config, target: float) -> list[int]:
    """Per layer, the most kept neurons whose FFN FLOPs ratio is <= ``target``, every other knob of
    ``config`` fixed (its ``poly_keep_ratio`` is ignored). Raises ``ValueError`` when one kept neuron
    and the other components already cost more than ``target``."""
    if not uses_polynomial(config):
        raise ValueError("the FLOPs budget sets the polynomial's kept neurons; add polynomial to --sparse_components")
    f = config.inner_dim
    kept = []
    for i, (base, per_neuron) in enumerate(_linear_costs(config)):
        m = 1 + math.floor((target - base) / per_neuron + 1e-9)
        if m < 1:
            raise ValueError(
                f"ffn_flops_ratio={target} cannot be met: with one kept neuron the other components already cost "
                f"{base:.3f} of the dense FFN FLOPs in layer {i}; raise --ffn_flops_ratio or shrink/switch off "
                f"components ({ROOM_KNOBS})"
            )
        kept.append(min(m, f))
    return kept


def kept_neurons_by_sensitivity(config: SparseGPT2Config, target: float, layer_weights) -> list[int]:
    """Kept neurons per layer in proportion to ``layer_weights`` (clamped to [1, f]), with the same
    total FLOPs as the uniform budget ``kept_neurons_within(config, target)``, never more."""
    f, n_layer = config.inner_dim, config.n_layer
    uniform = kept_neurons_within(config, target)
    w = torch.as_tensor(layer_weights, dtype=torch.float64)
    w = w / w.mean()
    total = sum(uniform)
    m = torch.clamp((torch.tensor(uniform, dtype=torch.float64) * w).round(), 1, f)
    for _ in range(20):  # rescale the free layers until the total neuron count matches the uniform one
        free = (m > 1) & (m < f)
        if not free.any() or abs(m.sum().item() - total) < 1:
            break
        m[free] = torch.clamp((m[free] * (total - m[~free].sum()) / m[free].sum()).floor(), 1, f)
    kept = [int(v) for v in m.tolist()]
    costs = _linear_costs(config)
    budget = sum(base + per * m_u for (base, per), m_u in zip(costs, uniform))
    while sum(base + per * k for (base, per), k in zip(costs, kept)) > budget + 1e-9 * n_layer:
        kept[max(range(n_layer), key=lambda i: kept[i])] -= 1  # rounding overshoot: take from the largest
    return kept


def uses_polynomial(config: SparseGPT2Config) -> bool:
    return all("polynomial" in config.layer_spec(i).components for i in range(config.n_layer))


def flops_by_component(model, batch_size: int = 1, seq_len: int | None = None) -> dict[str, int]:
    """Matmul FLOPs of each component summed over the blocks, in the order they first appear
    (token gates included when they cost matmul FLOPs), from ``model.flops_breakdown``."""
    totals = {}
    for block in model.flops_breakdown(batch_size, seq_len):
        for name, flops in block["matmul"].items():
            totals[name] = totals.get(name, 0) + flops
    return {name: flops for name, flops in totals.items() if flops or name != "gates"}

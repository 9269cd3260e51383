"""The alternatives a user would pick instead, at the same FFN FLOPs (for the benchmarks).

* ``prune_neurons``      structured neuron pruning (importance E|gelu(h_j)| * ||W2[j]||), GELU kept,
                         optionally with a layer-sequential least-squares refit of ``c_proj`` (the
                         strong training-free baseline the conversion must beat, docs/benchmarks.md
                         section 2), or with the conversion's OBS selection; the result is a plain
                         ``GPT2LMHeadModel`` with a narrower ``n_inner``.
* ``svd_low_rank``       ``c_fc`` and ``c_proj`` replaced by their rank-r truncated SVDs.
* ``random_sparse``      the SparseGPT2 architecture at the same budget, FFNs randomly initialised
                         (attention, embeddings, norms and head copied), i.e. no conversion.
"""

import copy

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from .conversion import (
    ConversionArguments,
    _block_inputs,
    _ridge,
    _run_block_capturing_mlp,
    activation_gram,
    copy_shared_weights,
    select_neurons,
    select_neurons_obs,
    sparse_config_for_budget,
)
from ..modeling_sparse_gpt2 import SparseGPT2LMHeadModel


def _inner(config):
    return config.n_inner if config.n_inner is not None else 4 * config.n_embd


@torch.no_grad()
def prune_neurons(dense: GPT2LMHeadModel, calibration_ids: torch.Tensor, ffn_flops_ratio: float, refit: bool,
                  ridge: float = 1e-3, batch_size: int = 8, selection: str = "importance") -> GPT2LMHeadModel:
    """``selection``: importance, or obs (the conversion's least-squares-aware rule) to isolate what the components add.
    The narrow model is built in fp32 whatever ``dense``'s dtype, as the conversion builds the sparse one."""
    if selection not in ("importance", "obs"):
        raise ValueError(f"selection must be 'importance' or 'obs', got {selection!r}")
    dense = dense.eval()
    f = _inner(dense.config)
    m = max(1, int(ffn_flops_ratio * f))
    config = GPT2Config(**{**dense.config.to_dict(), "n_inner": m})
    pruned = GPT2LMHeadModel(config).to(device=dense.device, dtype=torch.float32).eval()
    pruned.load_state_dict({k: v for k, v in dense.state_dict().items() if ".mlp." not in k}, strict=False)
    batches = _block_inputs(dense, calibration_ids, batch_size)
    hidden = [h.float() for h, _, _ in batches]  # the narrow model's hidden states, in its fp32
    for dense_block, block in zip(dense.transformer.h, pruned.transformer.h):
        xs, ys, resid = [], [], []
        for h, (_, a, kw) in zip(hidden, batches):
            out, x, y = _run_block_capturing_mlp(dense_block, h.to(dense.dtype), a, kw)
            xs.append(x.float())
            ys.append(y.float())
            resid.append(out.float() - y.float())
        if selection == "obs":
            neurons = select_neurons_obs(dense_block.mlp, xs, ys, m, ridge)
        else:
            neurons = select_neurons(dense_block.mlp, xs, m)
        block.mlp.c_fc.weight.copy_(dense_block.mlp.c_fc.weight[:, neurons])
        block.mlp.c_fc.bias.copy_(dense_block.mlp.c_fc.bias[neurons])
        block.mlp.c_proj.weight.copy_(dense_block.mlp.c_proj.weight[neurons])
        block.mlp.c_proj.bias.copy_(dense_block.mlp.c_proj.bias)
        if refit:
            gram, cross = activation_gram(block.mlp.act, block.mlp.c_fc.weight, block.mlp.c_fc.bias, xs, ys)
            w = _ridge(gram, cross, ridge)
            block.mlp.c_proj.weight.copy_(w[:m])
            block.mlp.c_proj.bias.copy_(w[m])
        hidden = [r + block.mlp(x) for r, x in zip(resid, xs)]
    return pruned


class LowRankMLP(nn.Module):
    """y = V2 U2 gelu(V1 U1 x + b1) + b2: rank-r factors of c_fc and c_proj. FLOPs 4 r (d + f)."""

    def __init__(self, mlp, rank: int):
        super().__init__()
        self.act = mlp.act
        self.dropout = copy.deepcopy(mlp.dropout)
        self.fc_in, self.fc_out = self._factor(mlp.c_fc.weight.T, mlp.c_fc.bias, rank)
        self.proj_in, self.proj_out = self._factor(mlp.c_proj.weight.T, mlp.c_proj.bias, rank)

    @staticmethod
    def _factor(w, b, rank):  # w: (out, in)
        u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        root = s[:rank].sqrt()
        first = nn.Linear(w.shape[1], rank, bias=False)
        second = nn.Linear(rank, w.shape[0], bias=True)
        with torch.no_grad():
            first.weight.copy_(root[:, None] * vh[:rank])
            second.weight.copy_(u[:, :rank] * root)
            second.bias.copy_(b)
        return first, second

    def forward(self, x):
        return self.dropout(self.proj_out(self.proj_in(self.act(self.fc_out(self.fc_in(x))))))


@torch.no_grad()
def svd_low_rank(dense: GPT2LMHeadModel, ffn_flops_ratio: float) -> GPT2LMHeadModel:
    d, f = dense.config.n_embd, _inner(dense.config)
    rank = max(1, int(ffn_flops_ratio * d * f / (d + f)))
    model = copy.deepcopy(dense)
    for block in model.transformer.h:
        block.mlp = LowRankMLP(block.mlp, rank).to(dense.device)
    return model


def random_sparse(dense: GPT2LMHeadModel, ffn_flops_ratio: float, args: ConversionArguments | None = None, seed: int = 0):
    args = args or ConversionArguments(ffn_flops_ratio=ffn_flops_ratio)
    torch.manual_seed(seed)
    model = SparseGPT2LMHeadModel(sparse_config_for_budget(dense.config, args)).to(dense.device)
    copy_shared_weights(dense, model)
    return model


def ffn_flops_ratio_of(model, dense_inner: int) -> float:
    """FFN FLOPs ratio of any of the baselines against a dense MLP of width ``dense_inner``."""
    if hasattr(model, "flops_report"):
        return model.flops_report(1, 1)["FLOPs/ffn_ratio"]
    d, f_dense = model.config.n_embd, dense_inner
    block = model.transformer.h[0].mlp
    if isinstance(block, LowRankMLP):
        r = block.fc_in.out_features
        f = block.fc_out.out_features
        return 4 * r * (d + f) / (4 * d * f)
    return _inner(model.config) / f_dense

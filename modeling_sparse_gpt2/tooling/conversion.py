"""Dense GPT-2 -> SparseGPT2, as a pipeline of named steps.

    1. check_dense_gpt2          the input is a GPT2LMHeadModel (any size: distilgpt2 .. gpt2-xl)
    2. sparse_config_for_budget  knobs from --ffn_flops_ratio (tooling/budget.py: uniform, or by
                                 layer sensitivity)
    3. split_calibration         every 8th calibration sequence is held out of every fit;
       check_calibration_size    refuse fewer fitted tokens than 2 per feature of the largest fit
    4. copy_shared_weights       attention, embeddings, norms, head: bit for bit
    5. per layer, in order, on the outputs of the already converted layers (as SparseGPT does):
       a. capture              the MLP input x and the dense MLP output y on calibration tokens
       b. select_neurons_obs   keep the m neurons whose removal least raises the least-squares
                               error of the layer output (Optimal Brain Surgeon on whole neurons;
                               --neuron_selection importance: select_neurons, top-m by
                               E|gelu(h_j)| * ||W2[j]||)
       c. fit_polynomial       the Chebyshev activation, fitted to GELU where h_S actually lies (its
                               domain by --poly_domain_rule: choose_domain)
       d. accumulate_gram      streamed statistics of [a_S, x, 1] and y (never all activations)
       e. fit_output_side      ridge regression of the layer output: the Monarch (tensor) factor
                               from the linear residual, the DCT frequencies with the most residual
                               energy (spectral), then W2[:, S], the spectral map and the bias
                               jointly (the mean residual lands in the bias)
       f. place_micro          micro groups on the channels with the largest remaining error;
                               micro and feedback start at zero output behind gates of 1
       g. held_out_error       the fitted FFN's relative error on the held-out sequences
    6. report                   achieved FLOPs ratio and per-layer error, fitted and held out
"""

import math
from dataclasses import asdict, dataclass, field, make_dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from ..configuration_sparse_gpt2 import CONVERSION_DEFAULTS, SPARSE_KNOBS, SparseGPT2Config
from ..modeling_sparse_gpt2 import SparseGPT2LMHeadModel
from ..polynomial import gelu_fit_error
from ..sparse_ffn import UltraEfficientSparseFFN
from ..spectral import dct_rows
from .budget import kept_neurons_by_sensitivity, kept_neurons_within, with_kept_neurons

FITTED_KNOBS = ("poly_domain",)  # picked per layer from the calibration pre-activations (fit_polynomial)
HELD_OUT_EVERY = 8  # every 8th calibration sequence (the last one if fewer) is held out of the fits
TOKENS_PER_FEATURE = 2
"""The floor: fitted calibration tokens per feature of the largest least-squares fit of a layer. With
N tokens and p features a least-squares fit's error on its own tokens is about (1 - p / N) of its
error on new ones, so at N = 2p the fitted error already reads half, and below p it reads 0."""


@dataclass
class ConversionOptions:
    """The conversion's own options; ``ConversionArguments`` adds one field per sparse knob."""

    ffn_flops_ratio: float = field(default=0.4, metadata={"help": "Target FFN FLOPs as a fraction of the dense MLP, in (0, 1.5]."})
    neuron_selection: Literal["obs", "importance"] = field(
        default="obs", metadata={"help": "obs (least-squares-aware, Optimal Brain Surgeon on neurons) or importance (E|gelu(h)| * ||W2||)."}
    )
    budget_mode: Literal["uniform", "sensitivity"] = field(
        default="uniform", metadata={"help": "uniform, or sensitivity (more for layers with larger reconstruction error)."}
    )
    poly_domain_rule: Literal["quantile", "fit"] = field(
        default="fit", metadata={"help": "How each layer's polynomial domain s is picked: fit (the s of DOMAIN_GRID whose fitted series reproduces GELU best on the calibration pre-activations; the default since it healed 1.4% closer to dense than quantile after 32 M tokens, docs/benchmarks.md §2.3) or quantile (the 99th percentile of |h|, clamped to [3, 8])."}
    )
    ridge: float = field(default=1e-3, metadata={"help": "Ridge strength, relative to each feature's energy."})
    calibration_batch_size: int = field(default=8, metadata={"help": "Sequences per calibration forward."})

    def __post_init__(self):
        if not (isinstance(self.ffn_flops_ratio, (int, float)) and 0 < self.ffn_flops_ratio <= 1.5):
            raise ValueError(f"ffn_flops_ratio must be in (0, 1.5], got {self.ffn_flops_ratio!r}")
        if self.neuron_selection not in ("obs", "importance"):
            raise ValueError(f"neuron_selection must be 'obs' or 'importance', got {self.neuron_selection!r}")
        if self.budget_mode not in ("uniform", "sensitivity"):
            raise ValueError(f"budget_mode must be 'uniform' or 'sensitivity', got {self.budget_mode!r}")
        if self.poly_domain_rule not in ("quantile", "fit"):
            raise ValueError(f"poly_domain_rule must be 'quantile' or 'fit', got {self.poly_domain_rule!r}")
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge!r}")
        if self.calibration_batch_size < 1:
            raise ValueError(f"calibration_batch_size must be >= 1, got {self.calibration_batch_size!r}")
        for knob in CONVERSION_KNOBS:  # the bounds that depend on the dense model are checked by the config
            value = knob.normalise(getattr(self, knob.name))
            setattr(self, knob.name, value)
            if value is not None or knob.name not in CONVERSION_DEFAULTS:
                knob.check(value)
        if "polynomial" not in self.sparse_components:
            raise ValueError(
                "the conversion builds on the polynomial backbone (the dense MLP's kept neurons): add polynomial to "
                f"--sparse_components, got {list(self.sparse_components)}"
            )


CONVERSION_KNOBS = tuple(k for k in SPARSE_KNOBS if k.name not in FITTED_KNOBS)


def _knob_field(knob):
    """(name, type, field) of the ConversionArguments field for ``knob``: its default and help from
    SPARSE_KNOBS, or from CONVERSION_DEFAULTS where the conversion starts elsewhere (with the reason)."""
    default, reason = CONVERSION_DEFAULTS.get(knob.name, (knob.default, None))
    kind = {"components": list[str], "ratio": float, "int": int, "number": float, "choice": str}[knob.kind]
    if knob.kind == "choice":
        kind = Literal[knob.choices]
    if knob.none_means or default is None:
        kind = kind | None
    help = knob.help if knob.kind == "choice" else f"{knob.help} Allowed: {knob.allowed}."  # choices: --help lists them
    if reason:
        help += f" The config's default is {knob.default!r}; here {default!r}: {reason}."
    if isinstance(default, list):
        return knob.name, kind, field(default_factory=lambda d=tuple(default): list(d), metadata={"help": help})
    return knob.name, kind, field(default=default, metadata={"help": help})


ConversionArguments = make_dataclass(
    "ConversionArguments", [_knob_field(k) for k in CONVERSION_KNOBS], bases=(ConversionOptions,),
)  # fmt: skip
ConversionArguments.__module__ = __name__
ConversionArguments.__doc__ = (
    "Options of the conversion (the script exposes each as ``--name``): its own, then one per sparse knob of "
    "SPARSE_KNOBS (poly_domain apart: it is fitted), with CONVERSION_DEFAULTS' values where they differ."
)


# ---------------------------------------------------------------------------- 1. check
def check_dense_gpt2(model) -> GPT2LMHeadModel:
    """The dense model must be a GPT2LMHeadModel whose blocks hold GPT2MLPs."""
    if isinstance(model, SparseGPT2LMHeadModel):
        raise ValueError("the model is already a SparseGPT2 model; conversion takes a dense GPT2LMHeadModel")
    if not isinstance(model, GPT2LMHeadModel):
        raise ValueError(
            f"expected a dense GPT-2 (GPT2LMHeadModel, model_type 'gpt2'), got {type(model).__name__} "
            f"(model_type {getattr(getattr(model, 'config', None), 'model_type', None)!r})"
        )
    if not all(isinstance(b.mlp, GPT2MLP) for b in model.transformer.h):
        raise ValueError("every block of the dense model must hold a GPT2MLP")
    if model.config.add_cross_attention:
        raise ValueError("GPT-2 with cross-attention is not supported")
    return model


# ---------------------------------------------------------------------------- 2. budget
def _sparse_config(dense_config, args: ConversionArguments, keep_ratios) -> SparseGPT2Config:
    kwargs = dense_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        kwargs.pop(key, None)
    kwargs.update({knob.name: getattr(args, knob.name) for knob in CONVERSION_KNOBS})
    kwargs.update(poly_keep_ratio=list(keep_ratios), architectures=["SparseGPT2LMHeadModel"])
    return SparseGPT2Config(**kwargs)


def sparse_config_for_budget(dense_config, args: ConversionArguments, layer_weights=None) -> SparseGPT2Config:
    """The SparseGPT2 config whose FFNs meet ``args.ffn_flops_ratio`` (or use ``args.poly_keep_ratio``).

    ``layer_weights`` (sensitivity mode) scales each layer's share of the kept neurons while the
    total FFN FLOPs stay within the budget.
    """
    n_layer = dense_config.n_layer
    if args.poly_keep_ratio is not None:
        return _sparse_config(dense_config, args, [args.poly_keep_ratio] * n_layer)
    config = _sparse_config(dense_config, args, [1.0] * n_layer)
    if layer_weights is None:
        return with_kept_neurons(config, kept_neurons_within(config, args.ffn_flops_ratio))
    return with_kept_neurons(config, kept_neurons_by_sensitivity(config, args.ffn_flops_ratio, layer_weights))


def preset_config(ffn_flops_ratio: float) -> SparseGPT2Config:
    """The config the conversion picks for GPT-2 small (124M) at ``ffn_flops_ratio`` (``configs/``)."""
    config = sparse_config_for_budget(GPT2Config(), ConversionArguments(ffn_flops_ratio=ffn_flops_ratio))
    if len(set(config.poly_keep_ratio)) == 1:  # uniform budget: one value for every layer
        config.poly_keep_ratio = config.poly_keep_ratio[0]
    return config


# ---------------------------------------------------------------------------- 3. calibration
def split_calibration(calibration_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fitted, held-out) sequences: every HELD_OUT_EVERY-th is held out, the last one if there are fewer."""
    held = torch.zeros(len(calibration_ids), dtype=torch.bool)
    held[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY] = True
    if len(calibration_ids) > 1 and not held.any():
        held[-1] = True
    return calibration_ids[~held], calibration_ids[held]


def largest_fit(config: SparseGPT2Config, neuron_selection: str) -> tuple[int, str]:
    """(features, which fit) of the largest least-squares fit the conversion makes in any layer."""
    fits = []
    for i in range(config.n_layer):
        s = config.layer_spec(i)
        if neuron_selection == "obs":
            fits.append((s.f + 1, f"the OBS selection over all {s.f} neurons + bias"))
        k = s.spectral_candidates if "spectral" in s.components else 0
        fits.append((s.poly_neurons + k + 1, f"the output-side ridge over {s.poly_neurons} neurons + {k} frequencies + bias in layer {i}"))
        if "tensor" in s.components:
            fits.append((s.d, f"the Monarch fit over the {s.d} channels of x"))
    return max(fits, key=lambda fit: fit[0])


def check_calibration_size(config: SparseGPT2Config, args: ConversionArguments, shape) -> int:
    """Refuse calibration with fewer fitted tokens than TOKENS_PER_FEATURE per feature of the largest
    fit, or with no held-out sequence; returns the floor (fitted tokens)."""
    n, block = shape
    features, which = largest_fit(config, args.neuron_selection)
    floor = TOKENS_PER_FEATURE * features
    fitted = lambda k: len(split_calibration(torch.arange(k))[0])  # noqa: E731  (sequences fitted of k)
    if n < 2 or fitted(n) * block < floor:
        need = next(k for k in range(2, floor + 3) if fitted(k) * block >= floor)
        raise ValueError(
            f"calibration too small: {n} sequence(s) of {block} tokens give {fitted(n) * block} tokens to fit and "
            f"{n - fitted(n)} sequence(s) held out (1 in {HELD_OUT_EVERY}, at least one), but {which} has {features} "
            f"features and needs {floor} tokens ({TOKENS_PER_FEATURE} per feature); raise --num_calibration_samples "
            f"(to {need} at this --block_size) or --block_size, or give a longer --calibration_file"
        )
    return floor


# ---------------------------------------------------------------------------- 4. copy
def copy_shared_weights(dense: GPT2LMHeadModel, sparse: SparseGPT2LMHeadModel):
    """Copy every non-MLP tensor bit for bit; returns the copied names."""
    sparse_sd = sparse.state_dict()
    copied = []
    with torch.no_grad():
        for name, tensor in dense.state_dict().items():
            if ".mlp." in name or name not in sparse_sd:
                continue
            if sparse_sd[name].shape != tensor.shape:
                raise ValueError(f"shape mismatch for {name}: dense {tuple(tensor.shape)} vs sparse {tuple(sparse_sd[name].shape)}")
            sparse_sd[name].copy_(tensor)
            copied.append(name)
    return copied


# ---------------------------------------------------------------------------- 5. per layer
class _StopForward(Exception):
    pass


def _block_inputs(model: GPT2LMHeadModel, calibration_ids: torch.Tensor, batch_size: int):
    """Per calibration batch: the hidden states entering block 0 and the args GPT2Model gives blocks."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args[0].detach(), args[1:], dict(kwargs)))
        raise _StopForward

    handle = model.transformer.h[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, len(calibration_ids), batch_size):
            try:
                model(calibration_ids[start : start + batch_size].to(model.device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _run_block_capturing_mlp(block, hidden, args, kwargs):
    """Run a block; return (block output, MLP input x, MLP output y)."""
    seen = {}

    def hook(module, inputs, output):
        seen["x"], seen["y"] = inputs[0].detach(), output.detach()

    handle = block.mlp.register_forward_hook(hook)
    try:
        out = block(hidden, *args, **kwargs)
    finally:
        handle.remove()
    out = out[0] if isinstance(out, tuple) else out
    return out, seen["x"], seen["y"]


def select_neurons(mlp: GPT2MLP, xs: list[torch.Tensor], m: int) -> torch.Tensor:
    """The top-m neurons (sorted) by importance E|act(h_j)| * ||W2[j]||."""
    w1, b1 = mlp.c_fc.weight.double(), mlp.c_fc.bias.double()
    score, n = torch.zeros(w1.shape[1], dtype=torch.float64, device=w1.device), 0
    for x in xs:
        a = mlp.act(x.reshape(-1, x.shape[-1]).double() @ w1 + b1)
        score += a.abs().sum(0)
        n += a.shape[0]
    importance = score / n * mlp.c_proj.weight.double().norm(dim=1)
    return torch.topk(importance, m).indices.sort().values


def activation_gram(act, w1, b1, xs, ys):
    """Streamed statistics of B = [act(x w1 + b1), 1] against y: (B^T B, B^T y), in float64."""
    k = w1.shape[1] + 1
    gram = torch.zeros(k, k, dtype=torch.float64, device=w1.device)
    cross = torch.zeros(k, ys[0].shape[-1], dtype=torch.float64, device=w1.device)
    for x, y in zip(xs, ys):
        a = act(x.reshape(-1, x.shape[-1]).double() @ w1.double() + b1.double())
        a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        gram += a.T @ a
        cross += a.T @ y.reshape(-1, y.shape[-1]).double()
    return gram, cross


def select_neurons_obs(mlp: GPT2MLP, xs: list[torch.Tensor], ys: list[torch.Tensor], m: int, ridge: float):
    """Least-squares-aware selection (Optimal Brain Surgeon on whole neurons).

    With G = [a, 1]^T [a, 1] over all f neurons, H = (G + ridge)^-1 and the LS output map
    W = H [a, 1]^T y, removing neuron j raises the reconstruction error by ||W_j||^2 / H_jj.
    Neurons are removed in rounds (the cheapest ~5% of those left to remove), each followed by the
    exact Schur-complement update of H and W, until m remain. The bias column is never removed.
    """
    w1 = mlp.c_fc.weight
    f = w1.shape[1]
    gram, cross = activation_gram(mlp.act, w1, mlp.c_fc.bias, xs, ys)
    diag = gram.diagonal().clamp_min(1e-12)
    h = torch.linalg.inv(gram + torch.diag(ridge * diag + 1e-10 * diag.mean()))
    w = h @ cross
    alive = torch.arange(f + 1, device=w1.device)  # positions into the current h / w
    while len(alive) - 1 > m:
        n_remove = max(1, min(len(alive) - 1 - m, int(0.05 * (len(alive) - 1 - m)) + 1))
        hd = h.diagonal()[:-1]
        cost = w[:-1].pow(2).sum(1) / hd
        drop = torch.topk(cost, n_remove, largest=False).indices
        keep = torch.ones(len(alive), dtype=torch.bool, device=w1.device)
        keep[drop] = False
        h_rr_inv = torch.linalg.inv(h[drop][:, drop])
        h_kr = h[keep][:, drop]
        w = w[keep] - h_kr @ (h_rr_inv @ w[drop])
        h = h[keep][:, keep] - h_kr @ h_rr_inv @ h_kr.T
        alive = alive[keep]
    return alive[:-1].sort().values


def _sample_rows(xs, max_rows: int, seed: int = 0):
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randperm(flat.shape[0], generator=g)[:max_rows].to(flat.device)
    return flat[idx]


DOMAIN_GRID = (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
"""The domains ``poly_domain_rule="fit"`` chooses from."""


def choose_domain(poly, h: torch.Tensor, rule: str) -> float:
    """The polynomial's domain s for pre-activations ``h`` (float64, CPU).

    ``quantile``: the 99th percentile of |h|, clamped to [3, 8], so all but the largest 1% of the
    pre-activations fall inside the polynomial. ``fit``: the s of DOMAIN_GRID whose fitted series
    reproduces GELU best on (a sample of) h, in relative RMS. Beyond -s the activation is the
    constant a(-s) and beyond +s GELU's linear tail, which GELU nearly is once |h| > 3 (gelu(-3) =
    -0.004), so a narrow domain spends the series' degree where GELU curves: at degree 8 the
    relative error is 0.2-0.3% at s = 3 against 2-6% at s = 8 (``benchmarks/chebyshev_fit_error.py``).
    """
    if rule == "quantile":
        return float(torch.quantile(h.abs()[:1_000_000].float(), 0.99).clamp(3.0, 8.0))
    sample = h[:500_000]

    def error(domain: float) -> float:
        poly.domain = domain
        poly.fit_activation(samples=sample)
        # on the sample's device (the CPU), where the model's fitted coefficients may be on a GPU
        c = poly.coeffs.detach().view(-1, poly.degree + 1)[0]  # per neuron: all start equal
        return gelu_fit_error(sample, c, poly.coeff_mask, domain, poly.degree)

    return min(DOMAIN_GRID, key=error)


def fit_polynomial(ffn, mlp: GPT2MLP, xs, neurons, domain_rule: str):
    """Set the kept rows of c_fc, choose the domain s and fit the Chebyshev activation on h_S."""
    poly = ffn.components["polynomial"]
    w1 = mlp.c_fc.weight[:, neurons].T
    b1 = mlp.c_fc.bias[neurons]
    h = (_sample_rows(xs, 4096).double() @ w1.double().T + b1.double()).flatten().cpu()
    with torch.no_grad():
        ffn.w_in("polynomial").copy_(w1)
        ffn.b_in("polynomial").copy_(b1)
        poly.neuron_index.copy_(neurons)
    poly.domain = choose_domain(poly, h, domain_rule)
    poly.fit_activation(samples=h)
    return poly.domain


class GramStats:
    """Streamed second moments of the base features B = [a_S (m), x (d), 1] and the target y."""

    def __init__(self, m: int, d: int, device):
        k = m + d + 1
        self.m, self.d = m, d
        self.bb = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.by = torch.zeros(k, d, dtype=torch.float64, device=device)
        self.yy = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, a, x, y):
        a, x, y = (t.reshape(-1, t.shape[-1]).double() for t in (a, x, y))
        base = torch.cat([a, x, torch.ones_like(x[:, :1])], dim=1)
        self.bb += base.T @ base
        self.by += base.T @ y
        self.yy += y.T @ y
        self.n += base.shape[0]


def _ridge(gram, cross, ridge):
    diag = gram.diagonal().clamp_min(1e-12)
    reg = ridge * diag + 1e-10 * diag.mean()
    return torch.linalg.solve(gram + torch.diag(reg), cross)


def _residual_energy(stats: GramStats, w_base):
    """diag of R^T R for the prediction base @ w_base (per output channel), from the statistics."""
    cross = w_base.T @ stats.by
    return (stats.yy - cross - cross.T + w_base.T @ stats.bb @ w_base).diagonal()


def fit_output_side(ffn: UltraEfficientSparseFFN, stats: GramStats, ridge: float):
    """Ridge fits of the output side.

    Returns the per-output-channel residual energy of the fitted FFN and of the kept neurons with
    a refit alone (the training-free baseline this conversion must beat).
    """
    m, d = stats.m, stats.d
    comps = ffn.components
    dev = stats.bb.device
    ia = torch.arange(m, device=dev)
    ix = torch.arange(m, m + d, device=dev)
    i1 = torch.tensor([m + d], device=dev)
    a1 = torch.cat([ia, i1])

    # (A) kept neurons + bias alone, then the best linear map from x to what they leave out
    w_a1 = _ridge(stats.bb[a1][:, a1], stats.by[a1], ridge)
    resid_cross = stats.by[ix] - stats.bb[ix][:, a1] @ w_a1  # X^T R
    linear = _ridge(stats.bb[ix][:, ix], resid_cross, ridge)  # R ~ X @ linear
    tensor_map = torch.zeros(d, d, dtype=torch.float64, device=dev)  # y_tensor = x @ tensor_map
    if "tensor" in comps:
        comps["tensor"].project_dense(linear.T.float())
        tensor_map = comps["tensor"].dense().double().T.detach()

    # (B) spectral frequencies: most residual energy once the tensor part is in
    transform_cols = [torch.eye(m + d + 1, dtype=torch.float64, device=dev)[:, ia]]
    if "spectral" in comps:
        spectral = comps["spectral"]
        basis_all = dct_rows(torch.arange(d), d).to(dev)
        left = basis_all @ (linear - tensor_map)  # residual map in frequency coordinates
        zz = (basis_all @ stats.bb[ix][:, ix] @ basis_all.T).diagonal()
        energy = zz * left.pow(2).sum(1)
        kc = spectral.rows
        ffn.set_spectral_frequencies(torch.topk(energy, kc).indices.sort().values.cpu())
        to_z = torch.zeros(m + d + 1, kc, dtype=torch.float64, device=dev)
        to_z[ix] = ffn.w_in("spectral").double().T.to(dev)
        transform_cols.append(to_z)
    transform_cols.append(torch.eye(m + d + 1, dtype=torch.float64, device=dev)[:, i1])
    t = torch.cat(transform_cols, dim=1)  # features = base @ t  ([a, z, 1])

    # (C) joint ridge of [a, z, 1] against y minus the tensor part
    tensor_base = torch.zeros(m + d + 1, d, dtype=torch.float64, device=dev)
    tensor_base[ix] = tensor_map
    gram_f = t.T @ stats.bb @ t
    cross_f = t.T @ (stats.by - stats.bb @ tensor_base)
    w_f = _ridge(gram_f, cross_f, ridge)
    with torch.no_grad():
        ffn.w_out("polynomial").copy_(w_f[:m].T)
        if "spectral" in comps:
            ffn.w_out("spectral").copy_(w_f[m:-1].T)
        ffn.c_proj.bias.copy_(w_f[-1])
    pruned_only = torch.zeros(m + d + 1, d, dtype=torch.float64, device=dev)
    pruned_only[a1] = w_a1
    return _residual_energy(stats, t @ w_f + tensor_base), _residual_energy(stats, pruned_only)


def place_micro(micro, residual_energy: torch.Tensor):
    """Refine the channel groups with the largest remaining error (blocks stay zero until healing)."""
    b = micro.group_size
    groups = residual_energy.reshape(-1, b).sum(1)
    micro.set_groups(torch.topk(groups, micro.groups).indices.sort().values.cpu())


def held_out_error(ffn: UltraEfficientSparseFFN, xs, ys) -> float:
    """Relative error of the FFN on tokens no fit saw: sum |ffn(x) - y|^2 / sum |y - mean(y)|^2."""
    y = torch.cat([t.reshape(-1, t.shape[-1]) for t in ys]).double()
    pred = torch.cat([ffn(x).reshape(-1, x.shape[-1]) for x in xs]).double()
    return float((pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


# ---------------------------------------------------------------------------- pipeline
@torch.no_grad()
def convert_gpt2_to_sparse(dense: GPT2LMHeadModel, calibration_ids: torch.Tensor, args: ConversionArguments | None = None, progress=None):
    """Convert ``dense`` into a SparseGPT2LMHeadModel using ``calibration_ids`` (N x T tokens).

    Returns ``(sparse_model, report)``; ``report`` has the achieved FLOPs ratio and, per layer, the
    relative reconstruction error of the FFN output (residual energy / energy of the centred dense
    output) of the pruned+refit polynomial alone and of the whole fitted sparse FFN, on the fitted
    tokens and on the held-out ones (every 8th sequence, which no fit sees).
    """
    args = args or ConversionArguments()
    check_dense_gpt2(dense)
    if calibration_ids.dim() != 2 or calibration_ids.numel() == 0:
        raise ValueError("calibration_ids must be a non-empty (num_sequences, block_size) tensor")
    if calibration_ids.shape[1] > dense.config.n_positions:
        raise ValueError(f"calibration block_size {calibration_ids.shape[1]} exceeds the model's n_positions {dense.config.n_positions}")
    dense = dense.eval()
    device = dense.device
    log = progress or (lambda msg: None)

    config = sparse_config_for_budget(dense.config, args)
    check_calibration_size(config, args, calibration_ids.shape)
    fit_ids, held_ids = split_calibration(calibration_ids)
    if args.budget_mode == "sensitivity" and args.poly_keep_ratio is None:
        sensitivity = layer_sensitivity(dense, fit_ids, args)
        log(f"layer sensitivity (relative error at the uniform budget): {[round(v, 4) for v in sensitivity]}")
        config = sparse_config_for_budget(dense.config, args, [math.sqrt(max(v, 1e-6)) for v in sensitivity])
        check_calibration_size(config, args, calibration_ids.shape)  # a layer may now keep more neurons
    sparse = SparseGPT2LMHeadModel(config).to(device=device, dtype=torch.float32).eval()
    copy_shared_weights(dense, sparse)

    batches = {"fit": _block_inputs(dense, fit_ids, args.calibration_batch_size),
               "held_out": _block_inputs(dense, held_ids, args.calibration_batch_size)}  # fmt: skip
    hidden = {part: [h.float() for h, _, _ in b] for part, b in batches.items()}
    layers = []
    domains = []
    for i, (dense_block, sparse_block) in enumerate(zip(dense.transformer.h, sparse.transformer.h)):
        mlp, ffn = dense_block.mlp, sparse_block.mlp
        m = config.layer_spec(i).poly_neurons
        xs, ys, resid = {}, {}, {}
        for part in batches:
            captured = [_run_block_capturing_mlp(dense_block, h.to(dense.dtype), bargs, bkwargs)
                        for h, (_, bargs, bkwargs) in zip(hidden[part], batches[part])]  # fmt: skip
            xs[part] = [x.float() for _, x, _ in captured]
            ys[part] = [y.float() for _, _, y in captured]
            resid[part] = [out.float() - y.float() for out, _, y in captured]
        poly = ffn.components["polynomial"]
        if args.neuron_selection == "obs":
            neurons = select_neurons_obs(mlp, xs["fit"], ys["fit"], m, args.ridge)
        else:
            neurons = select_neurons(mlp, xs["fit"], m)
        domains.append(fit_polynomial(ffn, mlp, xs["fit"], neurons, args.poly_domain_rule))
        stats = GramStats(m, config.n_embd, device)
        for x, y in zip(xs["fit"], ys["fit"]):
            a = poly.activate(F.linear(x, ffn.w_in("polynomial"), ffn.b_in("polynomial")), None)
            stats.add(a, x, y)
        residual, residual_pruned = fit_output_side(ffn, stats, args.ridge)
        if "micro" in ffn.components:
            place_micro(ffn.components["micro"], residual)
        centred = (stats.yy.diagonal() - stats.by[-1] ** 2 / stats.n).sum()
        err = {
            "layer": i,
            "kept_neurons": m,
            "poly_domain": domains[-1],
            "rel_error_pruned_refit": float(residual_pruned.sum() / centred),
            "rel_error_sparse_ffn": float(residual.sum() / centred),
            "rel_error_sparse_ffn_held_out": held_out_error(ffn, xs["held_out"], ys["held_out"]),
        }
        layers.append(err)
        log(
            f"layer {i}: kept {m} neurons, relative error {err['rel_error_sparse_ffn']:.4f} fitted, "
            f"{err['rel_error_sparse_ffn_held_out']:.4f} held out (pruned+refit alone {err['rel_error_pruned_refit']:.4f} fitted)"
        )
        hidden = {part: [r + ffn(x) for r, x in zip(resid[part], xs[part])] for part in batches}
    config.poly_domain = domains
    report = sparse.flops_report(batch_size=1, seq_len=calibration_ids.shape[1])
    return sparse, {
        "ffn_flops_ratio": report["FLOPs/ffn_ratio"],
        "requested_ffn_flops_ratio": args.ffn_flops_ratio if args.poly_keep_ratio is None else None,
        "calibration_tokens": int(calibration_ids.numel()),
        "calibration_tokens_fitted": int(fit_ids.numel()),
        "calibration_tokens_held_out": int(held_ids.numel()),
        "layers": layers,
        "arguments": asdict(args),
    }


@torch.no_grad()
def layer_sensitivity(dense: GPT2LMHeadModel, calibration_ids: torch.Tensor, args: ConversionArguments) -> list[float]:
    """Relative reconstruction error of each dense layer pruned to the uniform budget with an LS
    refit (measured on the dense model's own activations): larger means more sensitive."""
    uniform = sparse_config_for_budget(dense.config, args)
    xs = {i: [] for i in range(dense.config.n_layer)}
    ys = {i: [] for i in range(dense.config.n_layer)}
    def keep(i):
        def hook(module, inputs, output):
            xs[i].append(inputs[0].float())
            ys[i].append(output.float())

        return hook

    hooks = [b.mlp.register_forward_hook(keep(i)) for i, b in enumerate(dense.transformer.h)]
    try:
        for start in range(0, len(calibration_ids), args.calibration_batch_size):
            dense(calibration_ids[start : start + args.calibration_batch_size].to(dense.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    errors = []
    for i, block in enumerate(dense.transformer.h):
        m = uniform.layer_spec(i).poly_neurons
        neurons = select_neurons(block.mlp, xs[i], m)
        gram, cross = activation_gram(block.mlp.act, block.mlp.c_fc.weight[:, neurons], block.mlp.c_fc.bias[neurons], xs[i], ys[i])
        y = torch.cat([t.reshape(-1, t.shape[-1]) for t in ys[i]]).double()
        yy, ysum, n = (y * y).sum(), y.sum(0), y.shape[0]
        w = _ridge(gram, cross, args.ridge)
        resid = yy - 2 * (w * cross).sum() + (w * (gram @ w)).sum()
        errors.append(float(resid / (yy - (ysum**2).sum() / n)))
        xs[i], ys[i] = None, None
    return errors


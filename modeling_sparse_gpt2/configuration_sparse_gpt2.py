"""Configuration of SparseGPT2: a GPT-2 whose MLP is an UltraEfficientSparseFFN.

Every sparse knob may be a single value (all layers) or a list with one value per layer, so a
conversion can give sensitive layers a larger budget. The config checks itself when it is built
and when it is loaded; a bad value raises ``ValueError`` naming the knob and its allowed range.
"""

import difflib
import math
from dataclasses import dataclass
from typing import Any

from transformers import GPT2Config
from transformers.utils import logging

logger = logging.get_logger(__name__)

COMPONENTS = ("polynomial", "spectral", "feedback", "tensor", "micro")
"""Canonical component order (it is also the order of segments inside the fused GEMMs)."""

FUSED_COMPONENTS = ("polynomial", "spectral", "feedback")
"""The components that ride inside the FFN's two fused GEMMs (the conversion's default set): on an
H200 the Monarch (``tensor``) and ``micro`` parts add batched small matmuls and layout copies beside
the GEMMs and cost more time than their FLOPs, and in calibration-only conversion they did not pay
back their share of the budget (docs/benchmarks.md)."""

GATE_KINDS = ("scalar", "token")
LEGACY_GATE_KINDS = {"channel": "scalar"}  # version 0.1: a gate per output channel, folded into c_proj on load
POLY_COEFFICIENTS = ("shared", "per_neuron")
SPECTRAL_SELECTIONS = ("static", "topk")
POLY_DOMAIN_RANGE = (1e-6, 1e4)  # below ~1e-45 the domain underflows to 0 in float32 and h / s gives 0 / 0 = NaN
SPARSE_KNOBS = (
    "sparse_components", "poly_keep_ratio", "poly_degree", "poly_num_terms", "poly_domain", "k_freq",
    "spectral_selection", "micro_steps", "micro_keep_ratio", "micro_group_size", "feedback_rank",
    "feedback_window", "tensor_blocks", "gate_kind", "poly_coefficients",
)

AUTO_MAP = {
    "AutoConfig": "configuration_sparse_gpt2.SparseGPT2Config",
    "AutoModel": "modeling_sparse_gpt2.SparseGPT2Model",
    "AutoModelForCausalLM": "modeling_sparse_gpt2.SparseGPT2LMHeadModel",
    "AutoModelForSequenceClassification": "modeling_sparse_gpt2.SparseGPT2ForSequenceClassification",
}


@dataclass(frozen=True)
class FFNLayerSpec:
    """The resolved (integer) shape of one layer's sparse FFN, derived from the config knobs."""

    d: int  # n_embd
    f: int  # the dense MLP's inner width (n_inner or 4 * n_embd)
    components: tuple
    poly_neurons: int  # m = round(poly_keep_ratio * f)
    poly_degree: int
    poly_num_terms: int  # number of non-zero Chebyshev coefficients
    poly_domain: float
    poly_coefficients: str  # "shared": one Chebyshev series per layer, "per_neuron": one per kept neuron
    spectral_freqs: int  # k_freq: frequencies kept per token
    spectral_candidates: int  # frequencies analysed (k_freq, or 2 * k_freq for per-token top-k)
    spectral_selection: str
    micro_steps: int
    micro_group_size: int
    micro_groups: int  # groups updated (top micro_keep_ratio of n_embd / group size)
    feedback_rank: int
    feedback_window: int
    tensor_blocks: int  # Monarch: n_embd = tensor_blocks * block size
    gate_kind: str


def _divisor_near(n: int, target: float) -> int:
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    return min(divisors, key=lambda k: (abs(math.log(k / target)), k))


class SparseGPT2Config(GPT2Config):
    r"""
    GPT-2 configuration plus the UltraEfficientSparseFFN knobs. Each knob below (except
    ``sparse_components``, which takes a list of names or a list of such lists) accepts one value or a
    list of ``n_layer`` values.

    Args:
        sparse_components (`list[str]`): subset of ``"spectral"``, ``"polynomial"``, ``"micro"``,
            ``"feedback"``, ``"tensor"``; ``"polynomial"`` is the backbone and must be present.
        poly_keep_ratio (`float`, (0, 1]): fraction of the dense MLP's hidden neurons kept.
        poly_degree (`int`, >= 1): degree of the Chebyshev activation.
        poly_num_terms (`int`, 1..poly_degree+1, or None for all): non-zero Chebyshev coefficients.
        poly_domain (`float`, [1e-6, 1e4]): half-width ``s`` of the polynomial's input domain ``[-s, s]``.
        k_freq (`int`, 1..n_embd, or None for n_embd // 16): DCT frequencies kept by the spectral part.
        spectral_selection (`str`): ``"static"`` (fixed frequency set) or ``"topk"`` (per token, the
            k_freq largest of 2 * k_freq analysed frequencies).
        micro_steps (`int`, >= 1): refinement iterations.
        micro_keep_ratio (`float`, (0, 1]): fraction of channel groups refined.
        micro_group_size (`int`, divides n_embd, or None for 16 or the nearest divisor).
        feedback_rank (`int`, 1..n_embd, or None for n_embd // 48): rank of the token-feedback path.
        feedback_window (`int`, 1..n_positions): causal window (tokens) of the feedback aggregation.
        tensor_blocks (`int`, divides n_embd, or None for the divisor nearest sqrt(n_embd)): Monarch blocks.
        gate_kind (`str`): ``"scalar"`` (a learned gate per component) or ``"token"`` (that gate times
            a token-dependent ``2 * sigmoid(w . x + b)``); ``"channel"`` (version 0.1) loads as ``"scalar"``.
        poly_coefficients (`str`): ``"shared"`` (one Chebyshev series per layer) or ``"per_neuron"``
            (one per kept neuron, trained while healing).
    """

    model_type = "sparse_gpt2"

    sparse_components: Any = None
    poly_keep_ratio: Any = 0.35
    poly_degree: Any = 8
    poly_num_terms: Any = None
    poly_domain: Any = 4.0
    k_freq: Any = None
    spectral_selection: Any = "static"
    micro_steps: Any = 2
    micro_keep_ratio: Any = 0.25
    micro_group_size: Any = None
    feedback_rank: Any = None
    feedback_window: Any = 4
    tensor_blocks: Any = None
    gate_kind: Any = "scalar"
    poly_coefficients: Any = "shared"

    def __post_init__(self, **kwargs):
        for key in kwargs:  # unknown keys are kept as attributes without a word; a misspelt knob deserves one
            close = difflib.get_close_matches(key, SPARSE_KNOBS, n=1, cutoff=0.8)
            if close:
                logger.warning(f"SparseGPT2Config: unknown key {key!r} has no effect; did you mean {close[0]!r}?")
        super().__post_init__(**kwargs)
        if self.sparse_components is None:
            self.sparse_components = list(COMPONENTS)
        kinds = self.gate_kind if isinstance(self.gate_kind, (list, tuple)) else [self.gate_kind]
        if any(k in LEGACY_GATE_KINDS for k in kinds):
            normalised = [LEGACY_GATE_KINDS.get(k, k) for k in kinds]
            self.gate_kind = normalised if isinstance(self.gate_kind, (list, tuple)) else normalised[0]
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        self.validate_sparse_knobs()

    # ------------------------------------------------------------------ per-layer access
    def _per_layer(self, name: str):
        value = getattr(self, name)
        if isinstance(value, (list, tuple)) and name != "sparse_components":
            return list(value)
        if name == "sparse_components" and value and isinstance(value[0], (list, tuple)):
            return [list(v) for v in value]
        return [value] * self.n_layer

    def knob(self, name: str, layer_idx: int):
        """The value of knob ``name`` for layer ``layer_idx`` (lists are per layer)."""
        return self._per_layer(name)[layer_idx]

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def layer_spec(self, layer_idx: int) -> FFNLayerSpec:
        """Resolve the knobs of one layer into the integer shapes its FFN is built with."""
        d, f = self.n_embd, self.inner_dim
        k = lambda name: self.knob(name, layer_idx)  # noqa: E731
        components = tuple(c for c in COMPONENTS if c in k("sparse_components"))
        degree = int(k("poly_degree"))
        terms = k("poly_num_terms")
        k_freq = k("k_freq") if k("k_freq") is not None else max(1, d // 16)
        selection = k("spectral_selection")
        group = k("micro_group_size") if k("micro_group_size") is not None else _divisor_near(d, 16)
        n_groups = d // group
        return FFNLayerSpec(
            d=d,
            f=f,
            components=components,
            poly_neurons=max(1, int(round(float(k("poly_keep_ratio")) * f))),
            poly_degree=degree,
            poly_num_terms=degree + 1 if terms is None else int(terms),
            poly_domain=float(k("poly_domain")),
            poly_coefficients=k("poly_coefficients"),
            spectral_freqs=int(k_freq),
            spectral_candidates=int(k_freq) if selection == "static" else min(d, 2 * int(k_freq)),
            spectral_selection=selection,
            micro_steps=int(k("micro_steps")),
            micro_group_size=int(group),
            micro_groups=max(1, int(round(float(k("micro_keep_ratio")) * n_groups))),
            feedback_rank=int(k("feedback_rank")) if k("feedback_rank") is not None else max(1, d // 48),
            feedback_window=int(k("feedback_window")),
            tensor_blocks=int(k("tensor_blocks")) if k("tensor_blocks") is not None else _divisor_near(d, math.sqrt(d)),
            gate_kind=k("gate_kind"),
        )

    # ------------------------------------------------------------------ validation
    def validate_sparse_knobs(self):
        """Raise ``ValueError`` naming the knob and its allowed range for any invalid value."""
        n_layer, d = self.n_layer, self.n_embd
        if not isinstance(n_layer, int) or isinstance(n_layer, bool) or n_layer < 1:
            raise ValueError(f"n_layer must be an integer >= 1, got {n_layer!r}")
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"n_embd must be an integer >= 1, got {d!r}")
        if self.n_inner is not None and (not _is_int(self.n_inner) or self.n_inner < 1):
            raise ValueError(f"n_inner must be None or an integer >= 1, got {self.n_inner!r}")

        def values(name):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and name != "sparse_components":
                if len(value) != n_layer:
                    raise ValueError(
                        f"{name} given per layer must have n_layer={n_layer} entries, got {len(value)}"
                    )
                return list(value)
            return [value]

        comps = self.sparse_components
        if not isinstance(comps, (list, tuple)) or len(comps) == 0:
            raise ValueError(f"sparse_components must be a non-empty list drawn from {COMPONENTS}, got {comps!r}")
        per_layer = isinstance(comps[0], (list, tuple))
        if per_layer and len(comps) != n_layer:
            raise ValueError(f"sparse_components given per layer must have n_layer={n_layer} entries, got {len(comps)}")
        for layer_comps in comps if per_layer else [comps]:
            if not isinstance(layer_comps, (list, tuple)):
                raise ValueError(f"sparse_components: mix of names and per-layer lists in {comps!r}")
            for c in layer_comps:
                if c not in COMPONENTS:
                    raise ValueError(f"sparse_components: unknown component {c!r}; allowed: {COMPONENTS}")
            if len(set(layer_comps)) != len(layer_comps):
                raise ValueError(f"sparse_components: duplicate component in {list(layer_comps)!r}")
            if "polynomial" not in layer_comps:
                raise ValueError(
                    f"sparse_components: 'polynomial' (the backbone of kept neurons) must be present, got {list(layer_comps)!r}"
                )

        for v in values("poly_keep_ratio"):
            _check_ratio("poly_keep_ratio", v)
        for v in values("micro_keep_ratio"):
            _check_ratio("micro_keep_ratio", v)
        degrees = values("poly_degree")
        for v in degrees:
            _check_int("poly_degree", v, 1, 64)
        terms = values("poly_num_terms")
        per_layer_degrees = degrees * n_layer if len(degrees) == 1 else degrees
        for v, deg in zip(terms * n_layer if len(terms) == 1 else terms, per_layer_degrees):  # every layer's degree
            if v is not None:
                _check_int("poly_num_terms", v, 1, deg + 1, extra=f" (poly_degree + 1 = {deg + 1}) or None")
        lo, hi = POLY_DOMAIN_RANGE
        for v in values("poly_domain"):
            if not _is_number(v) or not (lo <= v <= hi):
                raise ValueError(f"poly_domain must be a number in [{lo:g}, {hi:g}], got {v!r}")
        for v in values("k_freq"):
            if v is not None:
                _check_int("k_freq", v, 1, d, extra=" (n_embd) or None")
        for v in values("spectral_selection"):
            if v not in SPECTRAL_SELECTIONS:
                raise ValueError(f"spectral_selection must be one of {SPECTRAL_SELECTIONS}, got {v!r}")
        for v in values("micro_steps"):
            _check_int("micro_steps", v, 1, 64)
        for v in values("micro_group_size"):
            if v is not None:
                _check_int("micro_group_size", v, 1, d, extra=" (n_embd) or None")
                if d % v:
                    raise ValueError(f"micro_group_size must divide n_embd={d}, got {v!r}")
        for v in values("feedback_rank"):
            if v is not None:
                _check_int("feedback_rank", v, 1, d, extra=" (n_embd) or None")
        for v in values("feedback_window"):
            _check_int("feedback_window", v, 1, max(1, self.n_positions), extra=" (n_positions)")
        for v in values("tensor_blocks"):
            if v is not None:
                _check_int("tensor_blocks", v, 1, d, extra=" (n_embd) or None")
                if d % v:
                    raise ValueError(f"tensor_blocks must divide n_embd={d}, got {v!r}")
        for v in values("gate_kind"):
            if v not in GATE_KINDS:
                raise ValueError(f"gate_kind must be one of {GATE_KINDS}, got {v!r}")
        for v in values("poly_coefficients"):
            if v not in POLY_COEFFICIENTS:
                raise ValueError(f"poly_coefficients must be one of {POLY_COEFFICIENTS}, got {v!r}")
        if not _is_number(self.resid_pdrop) or not (0 <= self.resid_pdrop < 1):
            raise ValueError(f"resid_pdrop must be a number in [0, 1), got {self.resid_pdrop!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_int(name, v, lo, hi, extra=""):
    if not _is_int(v) or not (lo <= v <= hi):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}]{extra}, got {v!r}")


def _check_ratio(name, v):
    if not _is_number(v) or v != v or not (0 < v <= 1):
        raise ValueError(f"{name} must be a number in (0, 1], got {v!r}")


__all__ = ["SparseGPT2Config", "FFNLayerSpec", "COMPONENTS"]

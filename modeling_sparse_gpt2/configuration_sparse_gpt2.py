"""Configuration of SparseGPT2: a GPT-2 whose MLP is an UltraEfficientSparseFFN.

Every sparse knob is declared once, in ``SPARSE_KNOBS``: its default, the values it takes and what
it does. The config's fields, its validation, the conversion's flags, the model card's knob table
and the tests all read that tuple. Every knob may be a single value (all layers) or a list with
one value per layer, so a conversion can give sensitive layers a larger budget. The config checks
itself when it is built and when it is loaded; a bad value raises ``ValueError`` naming the knob and
its allowed range.
"""

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from transformers import GPT2Config
from transformers.utils import logging

logger = logging.get_logger(__name__)

COMPONENTS = ("polynomial", "spectral", "feedback", "tensor", "micro")
"""Canonical component order (it is also the order of segments inside the fused GEMMs)."""

FUSED_COMPONENTS = ("polynomial", "spectral", "feedback")
"""The components that ride inside the FFN's two fused GEMMs, in their segment order (``c_fc`` rows,
``c_proj`` columns, the middle-stage kernel's segments). The Monarch (``tensor``) and ``micro`` parts
run beside the GEMMs as batched small matmuls and layout copies; on an H200 they cost more time than
their FLOPs (docs/benchmarks.md)."""

GATE_KINDS = ("scalar", "token")
SPECTRAL_SELECTIONS = ("static", "topk")
POLY_COEFFICIENTS = ("shared", "per_neuron")
POLY_DOMAIN_RANGE = (1e-6, 1e4)  # below ~1e-45 the domain underflows to 0 in float32 and h / s gives 0 / 0 = NaN


@dataclass(frozen=True)
class Knob:
    """One sparse knob: its default, the values it takes, what it does.

    ``kind`` is "components" (list of names), "ratio" (a number in (0, 1]), "int" or "number" (in
    [low, high]; a bound given as a string names what it depends on: "n_embd", "n_positions",
    "poly_degree + 1") or "choice" (one of ``choices``). ``none_means`` says what None resolves to
    (None is refused when it is not set). ``legacy`` maps values accepted on load to what is stored.
    ``component`` is the component the knob shapes (None: the FFN as a whole); ``spec_field`` the
    ``FFNLayerSpec`` field it resolves to where that is named otherwise (``resolved`` reads it).
    """

    name: str
    default: Any
    help: str
    kind: str
    component: str | None = None
    low: Any = None
    high: Any = None
    choices: tuple = ()
    none_means: str | None = None
    divides_n_embd: bool = False
    legacy: dict = field(default_factory=dict)
    spec_field: str | None = None

    @property
    def allowed(self) -> str:
        """The allowed values in words (errors, --help, the model card)."""
        if self.kind == "components":
            text = f"a non-empty list drawn from {', '.join(COMPONENTS)}"
        elif self.kind == "ratio":
            text = "a number in (0, 1]"
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            fmt = str if self.kind == "int" else (lambda b: b if isinstance(b, str) else f"{b:g}")
            text = f"{'an integer' if self.kind == 'int' else 'a number'} in [{fmt(self.low)}, {fmt(self.high)}]"
        if self.divides_n_embd:
            text += " dividing n_embd"
        return text + (f", or None ({self.none_means})" if self.none_means else "")

    def resolved(self, config, layer: int):
        """The value layer ``layer`` is built with: the ``FFNLayerSpec`` field this knob resolves to."""
        return getattr(config.layer_spec(layer), self.spec_field or self.name)

    def normalise(self, value):
        """``value`` (one, or one per layer) with the legacy spellings replaced by what is stored."""
        one = lambda v: self.legacy.get(v, v) if isinstance(v, str) else v  # noqa: E731
        return [one(v) for v in value] if isinstance(value, list) else one(value)

    def check(self, value, config=None, layer: int = 0):
        """Raise ``ValueError`` naming the knob unless ``value`` is allowed in ``layer`` of ``config``
        (without a config, the bounds that depend on it are left unchecked)."""
        if value is None and self.none_means:
            return
        if self.kind == "components":
            _check_components(value)
        elif self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise ValueError(f"{self.name} must be one of {self.choices}, got {value!r}")
        elif self.kind == "ratio":
            if not _is_number(value) or value != value or not (0 < value <= 1):
                raise ValueError(f"{self.name} must be a number in (0, 1], got {value!r}")
        else:
            (lo, lo_name), (hi, hi_name) = _bound(self.low, config, layer), _bound(self.high, config, layer)
            right_type = _is_int(value) if self.kind == "int" else _is_number(value)
            if not right_type or (lo is not None and not value >= lo) or (hi is not None and not value <= hi):
                fmt = str if self.kind == "int" else (lambda b: f"{b:g}")
                span = f"[{lo_name if lo is None else fmt(lo)}, {hi_name if hi is None else fmt(hi)}]"
                named = [n for n, b in ((lo_name, lo), (hi_name, hi)) if n and b is not None]
                span += f" ({', '.join(named)})" if named else ""
                what = "an integer" if self.kind == "int" else "a number"
                raise ValueError(f"{self.name} must be {what} in {span}{' or None' if self.none_means else ''}, got {value!r}")
            if self.divides_n_embd and config is not None and config.n_embd % value:
                raise ValueError(f"{self.name} must divide n_embd={config.n_embd}, got {value!r}")


def _check_components(names):
    """One layer's component set: any non-empty set of known names, each once."""
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"sparse_components must be a non-empty list drawn from {COMPONENTS}, got {names!r}")
    for c in names:
        if c not in COMPONENTS:
            raise ValueError(f"sparse_components: unknown component {c!r}; allowed: {COMPONENTS}")
    if len(set(names)) != len(names):
        raise ValueError(f"sparse_components: duplicate component in {list(names)!r}")


def _bound(bound, config, layer):
    """(value, name) of a bound: a number, or a name resolved on ``config`` (None without one)."""
    if not isinstance(bound, str):
        return bound, ""
    if config is None:
        return None, bound
    value = {
        "n_embd": lambda: config.n_embd,
        "n_positions": lambda: max(1, config.n_positions),
        "poly_degree + 1": lambda: config.knob("poly_degree", layer) + 1,
    }[bound]()
    return value, f"{bound} = {value}" if " " in bound else bound


SPARSE_KNOBS = (
    Knob("sparse_components", None, "The components of each layer's FFN (any non-empty set); a list of such lists gives one per layer.",
         "components", none_means="all five", spec_field="components"),
    Knob("poly_keep_ratio", 0.35, "Fraction of the dense MLP's hidden neurons kept by the polynomial backbone.",
         "ratio", "polynomial", spec_field="poly_neurons"),
    Knob("poly_degree", 8, "Degree of the Chebyshev activation.", "int", "polynomial", 1, 64),
    Knob("poly_num_terms", None, "Non-zero Chebyshev coefficients (the largest of the fit).",
         "int", "polynomial", 1, "poly_degree + 1", none_means="all: poly_degree + 1"),
    Knob("poly_domain", 4.0, "Half-width s of the polynomial's input domain [-s, s]; beyond +s the activation is linear.",
         "number", "polynomial", *POLY_DOMAIN_RANGE),
    Knob("poly_coefficients", "shared", "One Chebyshev series per layer ('shared') or one per kept neuron ('per_neuron').",
         "choice", "polynomial", choices=POLY_COEFFICIENTS),
    Knob("k_freq", None, "DCT frequencies of x kept by the spectral part.", "int", "spectral", 1, "n_embd",
         none_means="n_embd // 16", spec_field="spectral_freqs"),
    Knob("spectral_selection", "static", "'static' (a fixed frequency set) or 'topk' (per token, the k_freq largest of 2 * k_freq analysed).",
         "choice", "spectral", choices=SPECTRAL_SELECTIONS),
    Knob("micro_steps", 2, "Micro refinement iterations.", "int", "micro", 1, 64),
    Knob("micro_keep_ratio", 0.25, "Fraction of the channel groups the micro steps refine.", "ratio", "micro",
         spec_field="micro_groups"),
    Knob("micro_group_size", None, "Channels per micro group.", "int", "micro", 1, "n_embd",
         none_means="16, or the divisor of n_embd nearest it", divides_n_embd=True),
    Knob("feedback_rank", None, "Rank of the causal token-feedback path.", "int", "feedback", 1, "n_embd",
         none_means="n_embd // 48"),
    Knob("feedback_window", 4, "Causal window (tokens) the feedback aggregates.", "int", "feedback", 1, "n_positions"),
    Knob("tensor_blocks", None, "Monarch blocks: n_embd = tensor_blocks * block size.", "int", "tensor", 1, "n_embd",
         none_means="the divisor of n_embd nearest sqrt(n_embd)", divides_n_embd=True),
    Knob("gate_kind", "scalar", "'scalar' (one learned gate per component) or 'token' (times a token-dependent 2 * sigmoid(w . x + b)).",
         "choice", choices=GATE_KINDS, legacy={"channel": "scalar"}),
)
"""The sparse knobs, in the order the config, the flags and the card list them."""

KNOBS = {knob.name: knob for knob in SPARSE_KNOBS}

CONVERSION_DEFAULTS = {
    "sparse_components": (["polynomial"], "spectral and feedback did not pay back their share of the budget on the healing curve (docs/benchmarks.md §2.3), nor tensor and micro in the quality table (§2)"),
    "poly_keep_ratio": (None, "the kept neurons come from --ffn_flops_ratio unless this is given"),
    "poly_num_terms": (6, "at degree 8 GELU is T_1 plus five even terms; the odd ones above T_1 vanish, so 6 lose nothing"),
    "micro_keep_ratio": (0.125, "micro starts at zero output and only healing trains it, so calibration-only conversion keeps fewer groups"),
}
"""Where tools/conversion.py starts from other values than a bare config, each with its reason.
``poly_domain`` is no flag there: the conversion picks it per layer from the calibration pre-activations."""

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
    poly_coefficients: str  # "shared" (one series per layer) or "per_neuron"
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
    GPT-2 configuration plus the UltraEfficientSparseFFN knobs of ``SPARSE_KNOBS``. Each knob accepts
    one value or a list of ``n_layer`` values (``sparse_components``: a list of names, or a list of
    such lists).

    Args:
    """

    model_type = "sparse_gpt2"
    # one dataclass field per knob (typed Any: one value or one per layer), default from SPARSE_KNOBS
    __annotations__ = {knob.name: Any for knob in SPARSE_KNOBS}
    vars().update({knob.name: knob.default for knob in SPARSE_KNOBS})

    def __post_init__(self, **kwargs):
        for key in kwargs:  # unknown keys are kept as attributes without a word; a misspelt knob deserves one
            close = difflib.get_close_matches(key, list(KNOBS), n=1, cutoff=0.8)
            if close:
                logger.warning(f"SparseGPT2Config: unknown key {key!r} has no effect; did you mean {close[0]!r}?")
        super().__post_init__(**kwargs)
        if self.sparse_components is None:
            self.sparse_components = list(COMPONENTS)
        for knob in SPARSE_KNOBS:  # values older checkpoints wrote ("channel" gates), stored as their present name
            if knob.legacy:
                setattr(self, knob.name, knob.normalise(getattr(self, knob.name)))
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        self.validate_sparse_knobs()

    # ------------------------------------------------------------------ per-layer access
    def _per_layer(self, name: str) -> list:
        value = getattr(self, name)
        if name == "sparse_components":
            return [list(v) for v in value] if isinstance(value[0], (list, tuple)) else [value] * self.n_layer
        return list(value) if isinstance(value, (list, tuple)) else [value] * self.n_layer

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
        """Raise ``ValueError`` naming the knob and its allowed values for any invalid value."""
        n_layer = self.n_layer
        for name in ("n_layer", "n_embd"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.n_inner is not None and (not _is_int(self.n_inner) or self.n_inner < 1):
            raise ValueError(f"n_inner must be None or an integer >= 1, got {self.n_inner!r}")
        for knob in SPARSE_KNOBS:  # in declaration order: poly_degree is checked before poly_num_terms reads it
            value = getattr(self, knob.name)
            if knob.kind == "components":
                if not isinstance(value, (list, tuple)) or not value:
                    raise ValueError(f"sparse_components must be {knob.allowed}, got {value!r}")
                per_layer = isinstance(value[0], (list, tuple))
            else:
                per_layer = isinstance(value, (list, tuple))
            if per_layer and len(value) != n_layer:
                raise ValueError(f"{knob.name} given per layer must have n_layer={n_layer} entries, got {len(value)}")
            for i in range(n_layer):
                knob.check(self.knob(knob.name, i), self, i)
        if not _is_number(self.resid_pdrop) or not (0 <= self.resid_pdrop < 1):
            raise ValueError(f"resid_pdrop must be a number in [0, 1), got {self.resid_pdrop!r}")


SparseGPT2Config.__doc__ = SparseGPT2Config.__doc__.rstrip(" ") + "".join(
    f"        {k.name} (`{k.kind}`, {k.allowed}; default {k.default!r}): {k.help}\n" for k in SPARSE_KNOBS
)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


__all__ = ["SparseGPT2Config", "FFNLayerSpec", "COMPONENTS", "SPARSE_KNOBS", "Knob"]

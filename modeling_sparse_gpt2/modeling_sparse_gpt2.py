"""SparseGPT2: GPT-2 with every MLP replaced by an UltraEfficientSparseFFN.

The models subclass their GPT-2 counterparts and swap modules; GPT-2's own forward code runs
unchanged. Two thin additions carry what the token-feedback component needs: the model passes the
2-D padding mask down to the blocks, and each block hands the MLP the cache and that mask.
"""

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2Block,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPT2PreTrainedModel,
)
from transformers.utils import SAFE_WEIGHTS_NAME, logging

from .component_base import FFNContext
from .configuration_sparse_gpt2 import SparseGPT2Config
from .feedback import FeedbackComponent, reorder_feedback_states
from .gates import ResidualGates
from .micro import MicroComponent
from .polynomial import PolynomialComponent
from .sparse_ffn import UltraEfficientSparseFFN
from .spectral import SpectralComponent, dct_rows
from .tensor import TensorComponent

logger = logging.get_logger(__name__)

TOKEN_MASK_KWARG = "sparse_ffn_token_mask"
CACHE_NAMES = ("cache", "past_key_values", "layer_past")


class SparseGPT2Block(GPT2Block):
    """GPT-2 block whose ``mlp`` is an UltraEfficientSparseFFN."""

    def __init__(self, config, layer_idx=None):
        super().__init__(config, layer_idx=layer_idx)
        self.mlp = UltraEfficientSparseFFN(config, layer_idx or 0)

    def forward(self, hidden_states, *args, **kwargs):
        token_mask = kwargs.pop(TOKEN_MASK_KWARG, None)
        mlp = self.mlp
        if not mlp.reads_context:  # no token feedback: the FFN reads x alone (no context to build per call)
            return super().forward(hidden_states, *args, **kwargs)
        cache = _cache_argument(args, kwargs)
        # layer_idx only matters with a cache; reading it otherwise would make compile specialise
        # (and recompile) every block on its index
        layer_idx = mlp.layer_idx if cache is not None else 0
        # a plain attribute, set as nn.Module.__setattr__ would, without its parameter / module /
        # buffer checks (two calls per block and decode step)
        object.__setattr__(mlp, "context", FFNContext(cache=cache, token_mask=token_mask, layer_idx=layer_idx))
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            object.__setattr__(mlp, "context", None)


def _cache_argument(args: tuple, kwargs: dict):
    """The ``Cache`` a block was called with (None without one): GPT2Model passes it positionally,
    after the hidden states; other callers may name it."""
    if args and args[0] is not None and not isinstance(args[0], torch.Tensor):
        return args[0]
    return next((kwargs[n] for n in CACHE_NAMES if kwargs.get(n) is not None), None)


class SparseGPT2PreTrainedModel(GPT2PreTrainedModel):
    config_class = SparseGPT2Config
    config: SparseGPT2Config
    _no_split_modules = ["SparseGPT2Block"]
    checkpoint_reader = None  # (name_or_path, from_pretrained kwargs) -> {name: tensor}; set by the package
    _can_record_outputs = {**GPT2PreTrainedModel._can_record_outputs, "hidden_states": SparseGPT2Block}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained`` with errors that name what is wrong. transformers 5.24 reports an
        unreadable safetensors file without its name and a wrong-shape tensor as "look at the above report"."""
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, ignore_mismatched_sizes=True, output_loading_info=True,
                **kwargs,
            )  # fmt: skip
        except Exception as err:
            if type(err).__name__ != "SafetensorError":
                raise
            where = "/".join(str(p) for p in (pretrained_model_name_or_path, kwargs.get("subfolder")) if p)
            message = f"Unable to read the weights file {SAFE_WEIGHTS_NAME} (or a shard) in {where}: {err}"
            raise OSError(message) from err
        legacy = [k for k in info["unexpected_keys"] if k.endswith(LEGACY_FFN_SUFFIXES)]
        if legacy:
            if cls.checkpoint_reader is None:  # remote code reads no files; the package does
                raise OSError(
                    f"{pretrained_model_name_or_path} was written by sparse-gpt2 0.1 (per-component FFN tensors); "
                    "install the sparse-gpt2 package to load it in this layout"
                )
            load_legacy_ffn_weights(model, cls.checkpoint_reader(pretrained_model_name_or_path, kwargs))
            logger.info(f"{pretrained_model_name_or_path}: version-0.1 FFN tensors rewritten into c_fc / c_proj")
            info["unexpected_keys"] = [k for k in info["unexpected_keys"] if k not in set(legacy)]
            info["missing_keys"] = [k for k in info["missing_keys"] if not k.endswith(FUSED_KEY_SUFFIXES)]
        mismatched = sorted(info["mismatched_keys"], key=lambda m: m[0])
        if mismatched and not ignore_mismatched:  # raise, as transformers does, but name the tensors
            shapes = "; ".join(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched)
            raise RuntimeError(
                f"Weights of {pretrained_model_name_or_path} with the wrong shape: {shapes}. "
                "Pass ignore_mismatched_sizes=True to re-initialise them instead."
            )
        return (model, info) if output_loading_info else model

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # transformers skips a custom-code module whose own (non-recursive) parameters are all loaded;
        # the FFN owns none directly, but its init writes the segments of its c_fc / c_proj children
        if isinstance(module, UltraEfficientSparseFFN) and not getattr(module, "_is_hf_initialized", False):
            self._init_weights(module)
            module._is_hf_initialized = True
            return
        super()._initialize_weights(module, is_custom_code)

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.n_layer)  # GPT-2's scaled init of c_proj
        if isinstance(module, UltraEfficientSparseFFN):
            init.copy_(module.c_fc.weight, _initial_down_projection(module, std))
            init.zeros_(module.c_fc.bias)
            up = torch.randn_like(module.c_proj.weight, device="cpu") * residual_std
            if "feedback" in module.segments:
                up[:, module.segments["feedback"]] = 0  # zero output until trained or fitted
            init.copy_(module.c_proj.weight, up.to(module.c_proj.weight))
            init.zeros_(module.c_proj.bias)
        elif isinstance(module, ResidualGates):
            init.ones_(module.weight)
        elif isinstance(module, PolynomialComponent):
            if not getattr(module.coeffs, "_is_hf_initialized", False):
                module.fit_activation()
            init.copy_(module.neuron_index, torch.full_like(module.neuron_index, -1))
        elif isinstance(module, SpectralComponent):
            init.copy_(module.freq_index, torch.arange(module.freq_index.shape[0], device=module.freq_index.device))
        elif isinstance(module, FeedbackComponent):
            decay = 0.5 ** torch.arange(module.window - 1, -1, -1, dtype=torch.float32)
            init.copy_(module.kernel, decay.expand_as(module.kernel).to(module.kernel))
        elif isinstance(module, TensorComponent):
            init.normal_(module.left, std=1.0 / math.sqrt(module.bs))
            init.normal_(module.right, std=residual_std / math.sqrt(module.nb))
        elif isinstance(module, MicroComponent):
            init.copy_(module.channel_index, torch.arange(module.channel_index.shape[0]).to(module.channel_index))
            init.zeros_(module.blocks)  # zero output until trained or fitted

    # ------------------------------------------------------------------ FLOPs
    def flops_breakdown(self, batch_size: int = 1, seq_len: int | None = None) -> list[dict]:
        """Analytic FFN FLOPs of one forward of ``batch_size x seq_len`` tokens, per block:
        ``{"matmul": {component: FLOPs}, "elementwise": {component: FLOPs}, "dense_equivalent": FLOPs}``.

        Matmul FLOPs count a multiply-add as 2, for what executes ("gates" included: 0 unless the
        gates are token-dependent); elementwise work (activations, gates) is apart, as GPT-2's GELU
        is not counted in its MLP FLOPs either; ``dense_equivalent`` is GPT-2's MLP of the same shape.
        """
        tokens = batch_size * (seq_len if seq_len is not None else self.config.n_positions)
        blocks = []
        for ffn in sparse_ffns(self):
            per_token = ffn.flops_per_token()
            blocks.append({
                "matmul": {name: mm * tokens for name, (mm, _) in per_token.items()},
                "elementwise": {name: ew * tokens for name, (_, ew) in per_token.items()},
                "dense_equivalent": ffn.dense_flops_per_token() * tokens,
            })  # fmt: skip
        return blocks

    def flops_report(self, batch_size: int = 1, seq_len: int | None = None) -> dict:
        """``flops_breakdown`` flattened into the keys the Trainer logs.

        ``FLOPs/block_{i}_{component}`` (matmul; the gates' key only when they cost any),
        ``FLOPs/block_{i}_ffn`` (the block's sum), ``FLOPs/ffn_total``, ``FLOPs/ffn_dense_equivalent``,
        ``FLOPs/ffn_ratio``, ``ElementwiseFLOPs/block_{i}_{component}`` and ``ElementwiseFLOPs/ffn_total``.
        """
        blocks = self.flops_breakdown(batch_size, seq_len)
        report = {}
        for i, block in enumerate(blocks):
            for name, flops in block["matmul"].items():
                if flops or name != "gates":
                    report[f"FLOPs/block_{i}_{name}"] = flops
            for name, flops in block["elementwise"].items():
                report[f"ElementwiseFLOPs/block_{i}_{name}"] = flops
            report[f"FLOPs/block_{i}_ffn"] = sum(block["matmul"].values())
        report["FLOPs/ffn_total"] = sum(sum(b["matmul"].values()) for b in blocks)
        report["FLOPs/ffn_dense_equivalent"] = sum(b["dense_equivalent"] for b in blocks)
        report["FLOPs/ffn_ratio"] = report["FLOPs/ffn_total"] / report["FLOPs/ffn_dense_equivalent"]
        report["ElementwiseFLOPs/ffn_total"] = sum(sum(b["elementwise"].values()) for b in blocks)
        return report

    def mean_gate_values(self) -> dict:
        """``Gates/block_{i}_{component}``: the mean channel gate of each component."""
        return {
            f"Gates/block_{i}_{name}": value
            for i, ffn in enumerate(sparse_ffns(self))
            for name, value in ffn.gates.mean_values().items()
        }

    def set_fused_ffn(self, enabled: bool = True):
        """Choose the fused fast path (default) or the per-component reference path."""
        for ffn in sparse_ffns(self):
            ffn.use_fused = enabled


# ---------------------------------------------------------------------------- version 0.1 checkpoints
# Version 0.1 stored every component's projections on the component and a gate per output channel:
# mlp.components.{polynomial.w_in,b_in,w_out; spectral.basis,w_out; feedback.w_in,w_out}, mlp.bias,
# mlp.gates.{channel,token_weight,token_bias}. They map exactly onto c_fc / c_proj, with each
# component's channel gates folded into its columns of c_proj (and into the Monarch right factor).
LEGACY_FFN_SUFFIXES = (
    "components.polynomial.w_in", "components.polynomial.b_in", "components.polynomial.w_out",
    "components.spectral.basis", "components.spectral.w_out", "components.feedback.w_in",
    "components.feedback.w_out", "mlp.bias", "gates.channel", "gates.token_weight", "gates.token_bias",
)
FUSED_KEY_SUFFIXES = ("mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "mlp.gates.weight")


@torch.no_grad()
def load_legacy_ffn_weights(model, old: dict):
    """Rewrite a version-0.1 checkpoint's FFN tensors (``old``: name -> tensor) into this layout and
    load them into ``model``."""
    for name, ffn in model.named_modules():
        if not isinstance(ffn, UltraEfficientSparseFFN):
            continue
        key = next((p + name + "." for p in ("", "transformer.") if f"{p}{name}.gates.channel" in old), None)
        if key is None:
            continue
        gates = old[key + "gates.channel"]  # (C, d): one gate per output channel and component
        comp = lambda c, t: old[f"{key}components.{c}.{t}"]  # noqa: E731
        downs, biases, ups = [], [], []
        for i, c in enumerate(ffn.components):
            if c not in ffn.segments:
                continue
            downs.append(comp(c, "basis" if c == "spectral" else "w_in"))
            biases.append(comp(c, "b_in") if c == "polynomial" else torch.zeros(downs[-1].shape[0]))
            ups.append(gates[i][:, None] * comp(c, "w_out"))
        if ffn.gates.token:
            downs.append(old[key + "gates.token_weight"])
            biases.append(old[key + "gates.token_bias"])
        ffn.c_fc.weight.copy_(torch.cat(downs))
        ffn.c_fc.bias.copy_(torch.cat(biases))
        ffn.c_proj.weight.copy_(torch.cat(ups, dim=1))
        ffn.c_proj.bias.copy_(old[key + "bias"])
        scalar = torch.ones(len(ffn.components))
        if "tensor" in ffn.components:  # right[k, o, :] feeds output channel o * bs + k
            tensor, g = ffn.components["tensor"], gates[ffn.gates.index["tensor"]]
            tensor.right.copy_(old[key + "components.tensor.right"] * g.view(tensor.nb, tensor.bs).T[:, :, None])
        if "micro" in ffn.components:  # only the refined channels' gates act; one scalar when they agree
            g = gates[ffn.gates.index["micro"]][old[key + "components.micro.channel_index"]]
            if not torch.allclose(g, g.mean().expand_as(g)):
                logger.warning(f"{name}: the micro component's per-channel gates differ; loaded as their mean {g.mean():.4f}")
            scalar[ffn.gates.index["micro"]] = g.mean()
        ffn.gates.weight.copy_(scalar)


def _initial_down_projection(ffn: UltraEfficientSparseFFN, std: float) -> torch.Tensor:
    """c_fc's initial rows: N(0, std) for the kept neurons and the feedback, the DCT rows of the
    first frequencies for the spectral part, zeros for the token gates (tau = 1)."""
    w = torch.randn(ffn.c_fc.weight.shape) * std
    if "spectral" in ffn.segments:
        w[ffn.segments["spectral"]] = dct_rows(torch.arange(ffn.components["spectral"].rows), ffn.spec.d).float()
    w[ffn.gate_rows] = 0
    return w.to(ffn.c_fc.weight)


def sparse_ffns(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, UltraEfficientSparseFFN)]


class SparseGPT2Model(SparseGPT2PreTrainedModel, GPT2Model):
    def __init__(self, config: SparseGPT2Config):
        super().__init__(config)
        self.h = nn.ModuleList([SparseGPT2Block(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        # whether any block has the token feedback (the only reader of the padding mask), fixed by
        # the layer specs: known here once, not resolved from the config on every forward
        self.uses_feedback = any(block.mlp.reads_context for block in self.h)
        self.post_init()

    def forward(self, *args, **kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 2:
            mask = args[2]
        if mask is not None and self.uses_feedback and mask.dim() == 2:
            kwargs[TOKEN_MASK_KWARG] = mask
        return super().forward(*args, **kwargs)


class SparseGPT2LMHeadModel(SparseGPT2PreTrainedModel, GPT2LMHeadModel):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: SparseGPT2Config):
        SparseGPT2PreTrainedModel.__init__(self, config)
        self.transformer = SparseGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.loss_type = "ForCausalLM"  # the class name does not match transformers' loss lookup
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, *args, attention_mask=None, **kwargs):
        """GPT-2's, plus the current tokens' columns of the 2-D padding mask for the token feedback:
        with a compilable (static) cache ``generate`` passes a 4-D attention mask, which the FFN cannot
        read. The slice has a fixed shape while decoding, so compiled steps (CUDA graphs) keep replaying."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, attention_mask=attention_mask, **kwargs)
        if attention_mask is not None and self.transformer.uses_feedback and attention_mask.dim() == 2:
            current = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
            token_mask = attention_mask[:, -current.shape[1] :]
            inputs[TOKEN_MASK_KWARG] = token_mask.clone(memory_format=torch.contiguous_format)  # fixed stride
        return inputs

    def _reorder_cache(self, cache, beam_idx):
        cache.reorder_cache(beam_idx)
        reorder_feedback_states(cache, beam_idx)
        return cache


class SparseGPT2ForSequenceClassification(SparseGPT2PreTrainedModel, GPT2ForSequenceClassification):
    def __init__(self, config: SparseGPT2Config):
        SparseGPT2PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.transformer = SparseGPT2Model(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        self.loss_type = "ForSequenceClassification"
        self.post_init()


__all__ = [
    "SparseGPT2PreTrainedModel",
    "SparseGPT2Model",
    "SparseGPT2LMHeadModel",
    "SparseGPT2ForSequenceClassification",
    "SparseGPT2Block",
]

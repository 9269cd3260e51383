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
from transformers.utils import SAFE_WEIGHTS_NAME

from .component_base import FFNContext
from .configuration_sparse_gpt2 import SparseGPT2Config
from .feedback import FeedbackComponent, reorder_feedback_states
from .micro import MicroComponent
from .polynomial import PolynomialComponent
from .sparse_ffn import UltraEfficientSparseFFN
from .spectral import SpectralComponent, dct_rows
from .tensor import TensorComponent

TOKEN_MASK_KWARG = "sparse_ffn_token_mask"
CACHE_NAMES = ("cache", "past_key_values", "layer_past")


class SparseGPT2Block(GPT2Block):
    """GPT-2 block whose ``mlp`` is an UltraEfficientSparseFFN."""

    def __init__(self, config, layer_idx=None):
        super().__init__(config, layer_idx=layer_idx)
        self.mlp = UltraEfficientSparseFFN(config, layer_idx or 0)

    def forward(self, hidden_states, *args, **kwargs):
        token_mask = kwargs.pop(TOKEN_MASK_KWARG, None)
        cache = next((kwargs[n] for n in CACHE_NAMES if kwargs.get(n) is not None), None)
        if cache is None and args and not isinstance(args[0], torch.Tensor):
            cache = args[0]  # GPT2Model passes the cache positionally
        # layer_idx only matters with a cache; reading it otherwise would make compile specialise
        # (and recompile) every block on its index
        layer_idx = self.mlp.layer_idx if cache is not None else 0
        self.mlp.context = FFNContext(cache=cache, token_mask=token_mask, layer_idx=layer_idx)
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            self.mlp.context = None


class SparseGPT2PreTrainedModel(GPT2PreTrainedModel):
    config_class = SparseGPT2Config
    config: SparseGPT2Config
    _no_split_modules = ["SparseGPT2Block"]
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
        mismatched = sorted(info["mismatched_keys"], key=lambda m: m[0])
        if mismatched and not ignore_mismatched:  # raise, as transformers does, but name the tensors
            shapes = "; ".join(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched)
            raise RuntimeError(
                f"Weights of {pretrained_model_name_or_path} with the wrong shape: {shapes}. "
                "Pass ignore_mismatched_sizes=True to re-initialise them instead."
            )
        return (model, info) if output_loading_info else model

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.n_layer)  # GPT-2's scaled init of c_proj
        if isinstance(module, UltraEfficientSparseFFN):
            init.zeros_(module.bias)
            init.ones_(module.gates.channel)
            if module.gates.token:
                init.zeros_(module.gates.token_weight)
                init.zeros_(module.gates.token_bias)
        elif isinstance(module, PolynomialComponent):
            init.normal_(module.w_in, std=std)
            init.zeros_(module.b_in)
            init.normal_(module.w_out, std=residual_std)
            if not getattr(module.coeffs, "_is_hf_initialized", False):
                module.fit_activation()
            init.copy_(module.neuron_index, torch.full_like(module.neuron_index, -1))
        elif isinstance(module, SpectralComponent):
            freqs = torch.arange(module.freq_index.shape[0], device=module.freq_index.device)
            init.copy_(module.freq_index, freqs)
            init.copy_(module.basis, dct_rows(module.freq_index.cpu(), module.basis.shape[1]).to(module.basis))
            init.normal_(module.w_out, std=residual_std)
        elif isinstance(module, FeedbackComponent):
            init.normal_(module.w_in, std=std)
            decay = 0.5 ** torch.arange(module.window - 1, -1, -1, dtype=torch.float32)
            init.copy_(module.kernel, decay.expand_as(module.kernel).to(module.kernel))
            init.zeros_(module.w_out)  # zero output until trained or fitted
        elif isinstance(module, TensorComponent):
            init.normal_(module.left, std=1.0 / math.sqrt(module.bs))
            init.normal_(module.right, std=residual_std / math.sqrt(module.nb))
        elif isinstance(module, MicroComponent):
            init.copy_(module.channel_index, torch.arange(module.channel_index.shape[0]).to(module.channel_index))
            init.zeros_(module.blocks)  # zero output until trained or fitted

    # ------------------------------------------------------------------ FLOPs
    def flops_report(self, batch_size: int = 1, seq_len: int | None = None) -> dict:
        """Analytic FFN FLOPs of one forward of ``batch_size x seq_len`` tokens.

        Keys: ``FLOPs/block_{i}_{component}`` (matmul FLOPs, multiply-add = 2, what executes),
        ``FLOPs/block_{i}_ffn`` (the block's sum, gates included), ``FLOPs/ffn_total``,
        ``FLOPs/ffn_dense_equivalent`` (GPT-2's MLP of the same shape), ``FLOPs/ffn_ratio``, and the
        elementwise work (activations, gates; not counted in GPT-2's MLP FLOPs either) under
        ``ElementwiseFLOPs/block_{i}_{component}`` and ``ElementwiseFLOPs/ffn_total``.
        """
        tokens = batch_size * (seq_len if seq_len is not None else self.config.n_positions)
        report, total, dense, elementwise = {}, 0, 0, 0
        for i, ffn in enumerate(sparse_ffns(self)):
            block_total = 0
            for name, (mm, ew) in ffn.flops_per_token().items():
                if name != "gates" or ffn.gates.token:
                    report[f"FLOPs/block_{i}_{name}"] = mm * tokens
                report[f"ElementwiseFLOPs/block_{i}_{name}"] = ew * tokens
                block_total += mm * tokens
                elementwise += ew * tokens
            report[f"FLOPs/block_{i}_ffn"] = block_total
            total += block_total
            dense += ffn.dense_flops_per_token() * tokens
        report["FLOPs/ffn_total"] = total
        report["FLOPs/ffn_dense_equivalent"] = dense
        report["FLOPs/ffn_ratio"] = total / dense
        report["ElementwiseFLOPs/ffn_total"] = elementwise
        return report

    def mean_gate_values(self) -> dict:
        """``Gates/block_{i}_{component}``: the mean channel gate of each component."""
        return {
            f"Gates/block_{i}_{name}": value
            for i, ffn in enumerate(sparse_ffns(self))
            for name, value in ffn.gates.mean_values().items()
        }

    def freeze_ffn_for_inference(self):
        """Precompute every FFN's fused GEMM weights (gates folded in) once, for inference.

        Compiled decoding (CUDA graphs) then reads them instead of re-concatenating the weights
        at every step. ``train()`` drops them; call this again after changing weights in eval mode.
        """
        for ffn in sparse_ffns(self):
            ffn.freeze_fused_weights()
        return self

    def set_fused_ffn(self, enabled: bool = True):
        """Choose the fused fast path (default) or the per-component reference path."""
        for ffn in sparse_ffns(self):
            ffn.use_fused = enabled


def sparse_ffns(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, UltraEfficientSparseFFN)]


def _uses_feedback(config) -> bool:
    return any("feedback" in config.layer_spec(i).components for i in range(config.n_layer))


class SparseGPT2Model(SparseGPT2PreTrainedModel, GPT2Model):
    def __init__(self, config: SparseGPT2Config):
        super().__init__(config)
        self.h = nn.ModuleList([SparseGPT2Block(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.post_init()

    def forward(self, *args, **kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 2:
            mask = args[2]
        if mask is not None and mask.dim() == 2 and _uses_feedback(self.config):
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
        if attention_mask is not None and attention_mask.dim() == 2 and _uses_feedback(self.config):
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

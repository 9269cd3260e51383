"""sparse-gpt2: GPT-2 with UltraEfficientSparseFFN, native to Hugging Face transformers.

Importing the package registers ``sparse_gpt2`` with the Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_sparse_gpt2 import COMPONENTS, FUSED_COMPONENTS, SparseGPT2Config
from .modeling_sparse_gpt2 import (
    SparseGPT2Block,
    SparseGPT2ForSequenceClassification,
    SparseGPT2LMHeadModel,
    SparseGPT2Model,
    SparseGPT2PreTrainedModel,
)
from .sparse_ffn import UltraEfficientSparseFFN
from .tooling.legacy import read_checkpoint_tensors

AutoConfig.register("sparse_gpt2", SparseGPT2Config, exist_ok=True)
AutoModel.register(SparseGPT2Config, SparseGPT2Model, exist_ok=True)
AutoModelForCausalLM.register(SparseGPT2Config, SparseGPT2LMHeadModel, exist_ok=True)
AutoModelForSequenceClassification.register(SparseGPT2Config, SparseGPT2ForSequenceClassification, exist_ok=True)

SparseGPT2PreTrainedModel.checkpoint_reader = staticmethod(read_checkpoint_tensors)  # 0.1 checkpoints

# save_pretrained copies the model code next to the weights so the checkpoint loads with
# trust_remote_code=True for users who never installed this package.
SparseGPT2Config.register_for_auto_class()
SparseGPT2Model.register_for_auto_class("AutoModel")
SparseGPT2LMHeadModel.register_for_auto_class("AutoModelForCausalLM")
SparseGPT2ForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__version__ = "0.1.0"

__all__ = [
    "COMPONENTS",
    "FUSED_COMPONENTS",
    "SparseGPT2Config",
    "SparseGPT2PreTrainedModel",
    "SparseGPT2Model",
    "SparseGPT2LMHeadModel",
    "SparseGPT2ForSequenceClassification",
    "SparseGPT2Block",
    "UltraEfficientSparseFFN",
]

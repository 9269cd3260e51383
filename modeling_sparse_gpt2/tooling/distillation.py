"""Healing a converted model: knowledge distillation from the dense teacher with `Trainer`.

    loss = alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - alpha) * CE

averaged over real (non-padding) tokens. Everything else (bf16, progress bars, checkpoints,
``resume_from_checkpoint``, accelerate/DDP/FSDP) is the Trainer's own.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer

from .callbacks import attach_flops_callback
from ..modeling_sparse_gpt2 import sparse_ffns


FSDP_ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: {num_processes}
use_cpu: {use_cpu}
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: SparseGPT2Block
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_reshard_after_forward: true
"""


def fsdp_accelerate_config(num_processes: int, use_cpu: bool = False) -> str:
    """An ``accelerate launch --config_file`` YAML for healing with FSDP2, one shard unit per
    ``SparseGPT2Block`` (the class in ``_no_split_modules``), saving a full state dict."""
    return FSDP_ACCELERATE_CONFIG.format(num_processes=num_processes, use_cpu=str(use_cpu).lower())


@dataclass
class DistillationArguments:
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the KL term."})
    alpha_kl: float = field(default=0.7, metadata={"help": "Weight of the KL term; 1 - alpha_kl weights the CE."})
    train_only_ffn: bool = field(default=False, metadata={"help": "Freeze everything but the sparse FFNs."})

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha_kl <= 1:
            raise ValueError(f"alpha_kl must be in [0, 1], got {self.alpha_kl}")


class BlockDataset(Dataset):
    """``(N, block_size)`` token blocks as causal-LM examples."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def distillation_loss(student_logits, teacher_logits, labels, temperature: float, alpha_kl: float, ce=None):
    """alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE over the predicted positions."""
    s = student_logits[:, :-1].float() / temperature
    t = teacher_logits[:, :-1].float() / temperature
    valid = (labels[:, 1:] != -100).float()
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    kl = (kl * valid).sum() / valid.sum().clamp_min(1) * temperature**2
    if ce is None:
        ce = F.cross_entropy(student_logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return alpha_kl * kl + (1 - alpha_kl) * ce, kl, ce


class DistillationTrainer(Trainer):
    """A Trainer whose loss distils ``teacher_model`` into the model being trained."""

    def __init__(self, *args, teacher_model=None, distillation_args: DistillationArguments | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.distillation_args = distillation_args or DistillationArguments()
        self.teacher = teacher_model
        if self.teacher is not None:
            # same device as the student; its forward runs under the Trainer's autocast (bf16/fp16)
            self.teacher = self.teacher.to(self.args.device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if self.teacher is None or self.distillation_args.alpha_kl == 0 or not model.training:
            # evaluation reports the plain CE, so exp(eval_loss) is the perplexity
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
        labels = inputs.get("labels", inputs["input_ids"])
        d = self.distillation_args
        loss, _, _ = distillation_loss(outputs.logits, teacher_logits, labels, d.temperature, d.alpha_kl, ce=outputs.loss)
        return (loss, outputs) if return_outputs else loss


def freeze_all_but_ffn(model):
    """Only the sparse FFN parameters stay trainable (returns their count)."""
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for ffn in sparse_ffns(model):
        for p in ffn.parameters():
            p.requires_grad_(True)
            n += p.numel()
    return n


def build_healing_trainer(student, teacher, train_blocks, eval_blocks, training_args, distillation_args=None):
    """The DistillationTrainer for ``student`` with the FLOPs callback attached."""
    distillation_args = distillation_args or DistillationArguments()
    if distillation_args.train_only_ffn:
        freeze_all_but_ffn(student)
    trainer = DistillationTrainer(
        model=student,
        args=training_args,
        train_dataset=BlockDataset(train_blocks),
        eval_dataset=BlockDataset(eval_blocks) if eval_blocks is not None else None,
        teacher_model=teacher,
        distillation_args=distillation_args,
    )
    if hasattr(student, "flops_report"):
        attach_flops_callback(trainer, seq_len=train_blocks.shape[1])
    return trainer

"""Healing a converted model: knowledge distillation from the dense teacher with `Trainer`.

    loss = alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - alpha) * CE
           + alpha_hidden * mean_l ||h_student_l - h_teacher_l||^2 / ||h_teacher_l||^2

the first two averaged over the predicted (label != -100) tokens, the last over the real
(attention-mask) tokens of every block's output. z = h W^T is the lm_head over the 50,257-word
vocabulary; ``loss_impl`` picks how it is computed:

* ``plain``    both models' full logits (B, T, V), then the loss in fp32 (the reference).
* ``chunked``  pure torch: per chunk of tokens, the two lm_head matmuls, the loss and its closed-form
               gradient w.r.t. the chunk's logits, turned at once into the gradients of h and W;
               no (B, T, V) tensor exists. Same matmul FLOPs as plain (3 x 2 N d V for the student,
               2 N d V for the teacher), memory O(chunk x V) instead of O(N x V).
* ``liger``    liger-kernel's ``LigerFusedLinearJSDFunction`` with beta = 0, which is exactly
               KL(teacher || student) at temperature T, plus its CE term (torch.compile'd chunks on CUDA).
* ``auto``     liger on CUDA when liger-kernel is installed, chunked otherwise; plain under FSDP.

All three follow autocast: under bf16/fp16 (the Trainer's ``bf16=True``, which accelerate applies to
``model.forward`` only, so ``compute_loss`` enters it again around the fused loss) the lm_head matmuls,
and in ``chunked`` its two gradient matmuls, run in that dtype on tensor cores; softmax, KL, CE and the
gradient sums stay fp32, and the gradients come back in the parameters' dtypes. Without autocast
everything is fp32.

Everything else (bf16, progress bars, checkpoints, ``resume_from_checkpoint``, accelerate/DDP/FSDP)
is the Trainer's own.
"""

import importlib.util
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


LOSS_IMPLS = ("auto", "liger", "chunked", "plain")
IGNORE_INDEX = -100


@dataclass
class DistillationArguments:
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the KL term."})
    alpha_kl: float = field(default=0.7, metadata={"help": "Weight of the KL term; 1 - alpha_kl weights the CE."})
    alpha_hidden: float = field(default=0.0, metadata={"help": "Weight of the per-block hidden-state loss (relative MSE against the teacher's block outputs); 0: logits only."})
    loss_impl: str = field(default="auto", metadata={"help": "auto, liger, chunked or plain: how the lm_head + distillation loss is computed."})
    loss_chunk_tokens: int = field(default=1024, metadata={"help": "Tokens per chunk of the chunked and liger losses."})
    train_only_ffn: bool = field(default=False, metadata={"help": "Freeze everything but the sparse FFNs."})

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha_kl <= 1:
            raise ValueError(f"alpha_kl must be in [0, 1], got {self.alpha_kl}")
        if not self.alpha_hidden >= 0:
            raise ValueError(f"alpha_hidden must be >= 0, got {self.alpha_hidden}")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        if self.loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens must be >= 1, got {self.loss_chunk_tokens}")


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


class ChunkedLinearDistillation(torch.autograd.Function):
    """The lm_head matmuls and the distillation loss per chunk of tokens, gradients in the forward.

    Per token with student logits z = W h + b, teacher logits u, label y, and n predicted tokens:
        loss = [alpha T^2 KL(softmax(u/T) || softmax(z/T)) + (1 - alpha) (logsumexp(z) - z_y)] / n
        dloss/dz = [alpha T (softmax(z/T) - softmax(u/T)) + (1 - alpha) (softmax(z) - onehot(y))] / n
    then dh = dz W and dW = dz^T h, db = sum dz; the chunk's logits are freed before the next chunk.
    The four matmuls (z, u, dz W, dz^T h) run in ``matmul_dtype`` (the caller's autocast dtype; None: h's
    own); logits, softmax, dz, the loss and the gradient sums are fp32, the gradients come back in the
    inputs' dtypes. Returns (loss, kl, ce) with kl and ce as in :func:`distillation_loss` (not differentiable).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, teacher_h, teacher_weight, teacher_bias, labels, temperature, alpha_kl, chunk_tokens,
                matmul_dtype=None):
        valid = labels != IGNORE_INDEX
        n = valid.sum().clamp_min(1)
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        kl_sum = h.new_zeros((), dtype=torch.float32)
        ce_sum = h.new_zeros((), dtype=torch.float32)
        # the four matmuls in matmul_dtype (the caller's autocast dtype; cast once here), the rest in fp32
        mm = matmul_dtype or h.dtype
        h_mm, w_mm, th_mm, tw_mm = h.to(mm), weight.to(mm), teacher_h.to(mm), teacher_weight.to(mm)
        bias32 = None if bias is None else bias.float()
        teacher_bias32 = None if teacher_bias is None else teacher_bias.float()
        with torch.autocast(h.device.type, enabled=False):  # the casts above alone decide the matmul dtype
            for start in range(0, h.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                z = (h_mm[rows] @ w_mm.T).float()
                u = (th_mm[rows] @ tw_mm.T).float()
                if bias is not None:
                    z += bias32
                if teacher_bias is not None:
                    u += teacher_bias32
                keep = valid[rows]
                target = labels[rows].clamp_min(0)
                log_ps_t = F.log_softmax(z / temperature, -1)
                log_pt_t = F.log_softmax(u / temperature, -1)
                log_ps = F.log_softmax(z, -1)
                del z, u
                kl_sum += ((log_pt_t.exp() * (log_pt_t - log_ps_t)).sum(-1) * keep).sum()
                ce_sum -= (log_ps.gather(1, target[:, None]).squeeze(1) * keep).sum()
                if grad_h is None and grad_w is None and grad_b is None:
                    continue
                # dz = alpha T (ps_T - pt_T) + (1 - alpha) (ps - onehot(y)), masked and over n, built in place (fp32)
                dz = log_ps_t.exp_().sub_(log_pt_t.exp_()).mul_(alpha_kl * temperature)
                dz.add_(log_ps.exp_(), alpha=1 - alpha_kl)
                dz[torch.arange(len(target), device=dz.device), target] -= 1 - alpha_kl
                dz.mul_((keep / n)[:, None])
                del log_ps_t, log_pt_t, log_ps
                if grad_b is not None:
                    grad_b += dz.sum(0)
                dz = dz.to(mm)
                if grad_h is not None:
                    grad_h[rows] = dz @ w_mm
                if grad_w is not None:
                    grad_w += (dz.T @ h_mm[rows]).float()
        kl = kl_sum / n * temperature**2
        ce = ce_sum / n
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(kl, ce)
        return alpha_kl * kl + (1 - alpha_kl) * ce, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g, dtype=None: None if g is None else (g * grad_loss).to(dtype or g.dtype)
        return scale(grad_h), scale(grad_w, ctx.weight_dtype), scale(grad_b, ctx.weight_dtype), None, None, None, None, None, None, None, None


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_loss_impl(loss_impl: str, device: torch.device, fsdp: bool = False) -> str:
    """``auto`` -> liger (CUDA with liger-kernel), plain (FSDP: lm_head.weight is sharded outside the forward), else chunked."""
    if loss_impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
    if loss_impl == "auto":
        if fsdp:
            return "plain"
        return "liger" if device.type == "cuda" and liger_available() else "chunked"
    if loss_impl == "liger" and not liger_available():
        raise ImportError("loss_impl='liger' needs liger-kernel: pip install liger-kernel")
    if fsdp and loss_impl != "plain":
        raise ValueError(f"loss_impl={loss_impl!r} reads lm_head.weight outside the forward, which FSDP shards: use 'plain' or 'auto'")
    return loss_impl


def autocast_dtype(device: torch.device):
    """The autocast dtype (bf16/fp16) enabled for ``device``'s type here, or None."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


_LIGER_KL = None  # the class below, built once (liger is imported only when used)


def _liger_kl_function():
    """liger's fused linear JSD with its soft loss on fp32 logits: under autocast its lm_head matmuls give
    bf16/fp16 logits, whose log_softmax over the vocabulary it would otherwise take in that dtype."""
    global _LIGER_KL
    if _LIGER_KL is None:
        from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction

        class LigerFusedLinearKLFunction(LigerFusedLinearJSDFunction):
            @staticmethod
            def distillation_loss_fn(student_logits, teacher_logits, **kwargs):
                return LigerFusedLinearJSDFunction.distillation_loss_fn(student_logits.float(), teacher_logits.float(), **kwargs)

        _LIGER_KL = LigerFusedLinearKLFunction
    return _LIGER_KL


def fused_distillation_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels, temperature: float,
                            alpha_kl: float, loss_impl: str = "auto", chunk_tokens: int = 1024):
    """:func:`distillation_loss` from the final hidden states (B, T, d) and the two lm_heads (nn.Linear).

    Position t's hidden state predicts ``labels[:, t + 1]``. Returns (loss, kl, ce). Under autocast the
    lm_head matmuls (and, in the fused impls, their gradient matmuls) run in the autocast dtype, as the
    plain path's ``lm_head`` does; softmax, KL, CE and the gradient sums stay fp32, the gradients come back
    in the parameters' dtypes.
    """
    impl = resolve_loss_impl(loss_impl, student_hidden.device)
    if impl == "plain":
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)
        return distillation_loss(student_head(student_hidden), teacher_logits, labels, temperature, alpha_kl)
    h = student_hidden[:, :-1].flatten(0, 1)
    teacher_h = teacher_hidden[:, :-1].flatten(0, 1).detach()
    target = labels[:, 1:].flatten()
    teacher_bias = teacher_head.bias.detach() if teacher_head.bias is not None else None
    teacher_weight = teacher_head.weight.detach()
    if impl == "chunked":
        return ChunkedLinearDistillation.apply(h, student_head.weight, student_head.bias, teacher_h, teacher_weight,
                                               teacher_bias, target, temperature, alpha_kl, chunk_tokens,
                                               autocast_dtype(h.device))
    # beta = 0 is F.kl_div(log p_student, log p_teacher) = KL(teacher || student), at temperature T and
    # without the T^2 factor; its hard loss is the CE of the unscaled student logits; both over the
    # non-ignored tokens. So weights (1 - alpha, alpha T^2) give this module's objective exactly.
    # Its matmuls follow the ambient autocast (the weights stay fp32, so its grad_weight / grad_bias
    # accumulators, zeros_like(weight), do too).
    loss, soft, hard = _liger_kl_function().apply(
        h, student_head.weight, teacher_h, teacher_weight, target, student_head.bias, teacher_bias,
        1 - alpha_kl, alpha_kl * temperature**2, 0.0, IGNORE_INDEX, temperature, h.is_cuda, chunk_tokens, True,
    )
    return loss, soft.detach() * temperature**2, hard.detach()


def hidden_state_loss(student_states, teacher_states, attention_mask=None):
    """mean over blocks l of sum ||s_l - t_l||^2 / sum ||t_l||^2 over the real tokens (relative MSE).

    ``*_states``: one (B, T, d) tensor per block output (``output_hidden_states[1:]``: blocks 0..L-2,
    then the last block's output after ``ln_f``). Each block is scaled by the teacher's energy there, so
    deep blocks, whose residual stream is larger, do not outweigh the shallow ones.
    """
    if len(student_states) != len(teacher_states):
        raise ValueError(f"alpha_hidden needs as many blocks in the student ({len(student_states)}) as in the teacher ({len(teacher_states)})")
    total = 0.0
    for s, t in zip(student_states, teacher_states):
        t = t.detach().float()
        err = (s.float() - t).pow(2).sum(-1)
        energy = t.pow(2).sum(-1)
        if attention_mask is not None:
            err, energy = err * attention_mask, energy * attention_mask
        total = total + err.sum() / energy.sum().clamp_min(1e-12)
    return total / len(student_states)


class DistillationTrainer(Trainer):
    """A Trainer whose loss distils ``teacher_model`` into the model being trained."""

    def __init__(self, *args, teacher_model=None, distillation_args: DistillationArguments | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.distillation_args = distillation_args or DistillationArguments()
        self.loss_impl = resolve_loss_impl(self.distillation_args.loss_impl, self.args.device, fsdp=self.is_fsdp_enabled)
        self.teacher = teacher_model
        if self.teacher is not None:
            # same device as the student; its forward runs under the Trainer's autocast (bf16/fp16)
            self.teacher = self.teacher.to(self.args.device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        d = self.distillation_args
        if self.teacher is None or not model.training or (d.alpha_kl == 0 and d.alpha_hidden == 0):
            # evaluation reports the plain CE, so exp(eval_loss) is the perplexity
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        labels = inputs.get("labels", ids)
        wants_states = d.alpha_hidden > 0
        if self.loss_impl == "plain":  # both models' full logits, through their own forward (FSDP-safe)
            outputs = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=wants_states)
            with torch.no_grad():
                teacher_out = self.teacher(input_ids=ids, attention_mask=mask, output_hidden_states=wants_states)
            loss, _, _ = distillation_loss(outputs.logits, teacher_out.logits, labels, d.temperature, d.alpha_kl, ce=outputs.loss)
        else:  # final hidden states only (logits of the last position), the lm_head runs inside the loss
            outputs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
            with torch.no_grad():
                teacher_out = self.teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
            student_head = self.accelerator.unwrap_model(model).get_output_embeddings()
            # accelerate autocasts only inside model.forward; the lm_head runs here, so enter it again
            with self.accelerator.autocast():
                loss, _, _ = fused_distillation_loss(
                    outputs.hidden_states[-1], student_head, teacher_out.hidden_states[-1], self.teacher.get_output_embeddings(),
                    labels, d.temperature, d.alpha_kl, self.loss_impl, d.loss_chunk_tokens,
                )
        if wants_states:
            loss = loss + d.alpha_hidden * hidden_state_loss(outputs.hidden_states[1:], teacher_out.hidden_states[1:], mask)
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

"""Train a dense GPT-2 reference from scratch (the model the project converts and measures on).

Plain PyTorch in the style of nanoGPT: random windows of a token stream, AdamW with warm-up and a
cosine decay, bf16 autocast on GPU, evaluation on non-overlapping validation windows, early stop
when validation loss stops improving, best weights saved with ``save_pretrained``.
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel


SAVE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class PretrainArguments:
    output_dir: str = field(metadata={"help": "Folder the dense model, its tokenizer and training_curve.json are written to (atomically)."})
    train_tokens: str = field(metadata={"help": ".npy token stream of the training split (sparse-gpt2 prepare-tokens)."})
    validation_tokens: str = field(metadata={"help": ".npy token stream of the validation split."})
    tokenizer_name_or_path: str = field(metadata={"help": "The tokenizer the token files were made with; sets the vocabulary size and is saved with the model."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing non-empty --output_dir."})
    n_embd: int = field(default=512, metadata={"help": "Hidden size."})
    n_layer: int = field(default=8, metadata={"help": "Transformer blocks."})
    n_head: int = field(default=8, metadata={"help": "Attention heads (must divide --n_embd)."})
    n_positions: int = field(default=512, metadata={"help": "Context length; also the training and evaluation window."})
    dropout: float = field(default=0.1, metadata={"help": "Residual, embedding and attention dropout."})
    batch_size: int = field(default=64, metadata={"help": "Windows per training step (and per evaluation forward)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate (warm-up, then cosine decay to 10%%)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of the matrices (not biases, norms)."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear learning-rate warm-up steps."})
    max_steps: int = field(default=3000, metadata={"help": "Training steps at most (the cosine schedule's length unless --fit_schedule_to_time shortens it)."})
    max_minutes: float = field(default=5.0, metadata={"help": "Wall-clock cap on training, in minutes."})
    eval_every: int = field(default=100, metadata={"help": "Steps between validation evaluations."})
    eval_windows: int = field(default=400, metadata={"help": "Non-overlapping validation windows of --n_positions tokens per evaluation, at most."})
    patience: int = field(default=3, metadata={"help": "Stop after this many evaluations without a better validation loss."})
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation and of the training windows."})
    compile: bool = field(default=False, metadata={"help": "Train through torch.compile."})
    fit_schedule_to_time: bool = field(default=True, metadata={"help": "Shorten the cosine schedule so it ends by --max_minutes (measured step time)."})
    save_dtype: str = field(default="float32", metadata={"help": "Weights on disk: float32, float16 or bfloat16."})

    def __post_init__(self):
        for name in ("n_embd", "n_layer", "n_head", "n_positions", "batch_size", "max_steps", "eval_every", "eval_windows", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n_head {self.n_head} must divide --n_embd {self.n_embd}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"--save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")
        if self.max_minutes <= 0:
            raise ValueError(f"--max_minutes must be > 0, got {self.max_minutes}")


def _load_tokens(path: str, flag: str, min_tokens: int, vocab_size: int) -> torch.Tensor:
    """A 1-D .npy token stream of at least ``min_tokens`` ids below ``vocab_size``; errors name ``flag``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: token file not found: {path}")
    try:
        ids = np.load(path)
    except Exception as err:  # not a .npy file (numpy raises ValueError, OSError or pickle errors)
        raise ValueError(f"{flag}: {path} is not a .npy token file ({type(err).__name__}: {err})") from err
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{flag}: {path} holds a {ids.dtype} array of shape {ids.shape}; expected a 1-D stream of token ids")
    if len(ids) < min_tokens:
        raise ValueError(f"{flag}: {path} holds {len(ids)} tokens, fewer than the {min_tokens} one window of --n_positions needs")
    if ids.max() >= vocab_size or ids.min() < 0:
        raise ValueError(f"{flag}: {path} holds token ids {ids.min()}..{ids.max()}, outside the {vocab_size} of --tokenizer_name_or_path")
    return torch.from_numpy(ids.astype(np.int64))


@torch.no_grad()
def evaluate_windows(model, windows: torch.Tensor, batch_size: int, device) -> float:
    """Mean next-token NLL over non-overlapping windows."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        x = windows[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


def train_dense_reference(args: PretrainArguments, log=print) -> dict:
    """Train, then write the best weights, the tokenizer and ``training_curve.json`` to ``args.output_dir``
    atomically (the `sparse-gpt2 pretrain` command). An existing non-empty ``output_dir`` is refused
    before any work unless ``args.overwrite_output_dir``; an empty or absent one is fine."""
    from .checkpoints import atomic_output_dir, check_output_dir
    from .tokens import load_tokenizer_from_flag

    check_output_dir(args.output_dir, args.overwrite_output_dir)
    T = args.n_positions
    tokenizer = load_tokenizer_from_flag(args.tokenizer_name_or_path)
    train = _load_tokens(args.train_tokens, "--train_tokens", T + 1, len(tokenizer))
    val = _load_tokens(args.validation_tokens, "--validation_tokens", T, len(tokenizer))
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    val_windows = val[: (len(val) // T) * T].view(-1, T)[: args.eval_windows]
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=T, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
        resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(0.9, 0.95), fused=device.type == "cuda",
    )

    horizon = args.max_steps  # the step the cosine decay ends at

    def lr_at(step):
        if step < args.warmup_steps:
            return args.learning_rate * (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, horizon - args.warmup_steps)
        return args.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    step_fn = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(args.seed)
    curve, best, best_state, bad, stop_reason = [], float("inf"), None, 0, "max_steps"
    start = time.time()
    probe = (20, 60)  # steps between which the step time is measured (after compilation and warm-up)
    model.train()
    for step in range(args.max_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(0, len(train) - T, (args.batch_size,), generator=g)
        x = torch.stack([train[i : i + T] for i in idx]).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = step_fn(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.fit_schedule_to_time and step + 1 in probe:
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step + 1 == probe[0]:
                probe_t0 = time.time()
            else:  # evaluation costs ~10% on top of the training steps: plan for 90% of the time left
                step_s = (time.time() - probe_t0) / (probe[1] - probe[0])
                left = 0.9 * (args.max_minutes * 60 - (time.time() - start))
                horizon = max(step + 2, min(args.max_steps, step + 1 + int(left / step_s)))
                log(f"step time {step_s * 1e3:.1f} ms: the cosine schedule ends at step {horizon}")
        last = step + 1 >= horizon or (time.time() - start) / 60 > args.max_minutes
        if last:
            stop_reason = "schedule_end" if step + 1 >= horizon else "max_minutes"
        if (step + 1) % args.eval_every == 0 or last:
            val_loss = evaluate_windows(model, val_windows, args.batch_size, device)
            point = {
                "step": step + 1, "tokens": (step + 1) * args.batch_size * T, "train_loss": loss.item(),
                "val_loss": val_loss, "val_ppl": math.exp(val_loss), "elapsed_s": round(time.time() - start, 1),
            }
            curve.append(point)
            log(json.dumps(point))
            if val_loss < best - 1e-4:
                best, bad = val_loss, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
            if bad >= args.patience:
                log(f"validation loss stopped improving for {args.patience} evaluations: stopping")
                stop_reason = "patience"
                break
        if last:
            break
    model.load_state_dict(best_state)
    summary = {
        "best_val_loss": best, "best_val_ppl": math.exp(best), "eval_window": T, "eval_windows": len(val_windows),
        "steps": curve[-1]["step"], "schedule_steps": horizon, "stop_reason": stop_reason, "train_tokens_seen": curve[-1]["tokens"], "wall_s": round(time.time() - start, 1),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "arguments": asdict(args), "curve": curve,
    }
    with atomic_output_dir(args.output_dir, args.overwrite_output_dir) as tmp:
        model.to(getattr(torch, args.save_dtype)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "training_curve.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary

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


@dataclass
class PretrainArguments:
    output_dir: str = field(metadata={"help": "Where the dense model, tokenizer and training curve go."})
    train_tokens: str = field(metadata={"help": ".npy token stream of the training split (scripts/prepare_tokens.py)."})
    validation_tokens: str = field(metadata={"help": ".npy token stream of the validation split."})
    tokenizer_name_or_path: str = field(metadata={"help": "Tokenizer saved next to the model."})
    n_embd: int = 512
    n_layer: int = 8
    n_head: int = 8
    n_positions: int = 512
    dropout: float = 0.1
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 3000
    max_minutes: float = 5.0
    eval_every: int = 100
    eval_windows: int = 400
    patience: int = 3
    seed: int = 0
    compile: bool = False
    fit_schedule_to_time: bool = field(default=True, metadata={"help": "Shorten the cosine schedule so it ends by max_minutes (measured step time)."})
    save_dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16 weights on disk."})


def _load_tokens(path: str) -> torch.Tensor:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token file not found: {path}")
    return torch.from_numpy(np.load(path).astype(np.int64))


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
    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path)
    train = _load_tokens(args.train_tokens)
    val = _load_tokens(args.validation_tokens)
    T = args.n_positions
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
    os.makedirs(args.output_dir, exist_ok=True)
    model.to(getattr(torch, args.save_dtype)).save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    summary = {
        "best_val_loss": best, "best_val_ppl": math.exp(best), "eval_window": T, "eval_windows": len(val_windows),
        "steps": curve[-1]["step"], "schedule_steps": horizon, "stop_reason": stop_reason, "train_tokens_seen": curve[-1]["tokens"], "wall_s": round(time.time() - start, 1),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "arguments": asdict(args), "curve": curve,
    }
    with open(os.path.join(args.output_dir, "training_curve.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary

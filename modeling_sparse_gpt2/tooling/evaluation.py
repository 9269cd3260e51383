"""Perplexity: exp(mean next-token NLL) over a token stream, with stated windowing.

Windows of ``block_size`` tokens start every ``stride`` tokens. With ``stride == block_size`` they
do not overlap and every token after the first of a window is scored once; with a smaller stride
each window scores only its last ``stride`` tokens (the first window scores all of them), so every
token is scored once with up to ``block_size - stride`` tokens of context before it
(the transformers "perplexity of fixed-length models" recipe).
"""

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, block_size: int, stride: int | None = None, batch_size: int = 8) -> dict:
    """Evaluate ``model`` on a 1-D token stream; returns perplexity, mean NLL and the windowing."""
    stride = stride or block_size
    if tokens.dim() != 1:
        raise ValueError("tokens must be a 1-D stream")
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    if len(tokens) < 2:
        raise ValueError("need at least 2 tokens to score")
    n_pos = getattr(model.config, "n_positions", None)
    if n_pos is not None and block_size > n_pos:
        raise ValueError(f"block_size {block_size} exceeds the model's n_positions {n_pos}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    windows = []  # (start, end, targets scored: those at positions >= every earlier window's end)
    prev_end = 0
    for begin in range(0, len(tokens) - 1, stride):
        end = min(begin + block_size, len(tokens))
        windows.append((begin, end, end - max(prev_end, begin + 1)))
        prev_end = end
        if end == len(tokens):
            break
    total_nll, total_count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        width = max(e - b for b, e, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for j, (b, e, _) in enumerate(group):
            ids[j, : e - b] = tokens[b:e]
            mask[j, : e - b] = 1
        logits = model(ids.to(device), attention_mask=mask.to(device)).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].to(device).flatten(), reduction="none")
        nll = nll.view(len(group), width - 1)
        for j, (b, e, scored) in enumerate(group):
            n_pred = e - b - 1  # predictions in this window; the last `scored` are new
            total_nll += nll[j, n_pred - scored : n_pred].sum().item()
            total_count += scored
    model.train(was_training)
    mean = total_nll / total_count
    return {
        "perplexity": math.exp(mean),
        "mean_nll": mean,
        "tokens_scored": total_count,
        "block_size": block_size,
        "stride": stride,
        "windowing": f"windows of {block_size} tokens every {stride} tokens; each token scored once",
    }

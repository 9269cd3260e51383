"""Perplexity of a causal LM over a token stream, with stated windowing, and the FFN FLOPs ratio beside it.

An `evaluate` module read from this folder, offline:

    import evaluate
    metric = evaluate.load("path/to/metrics/sparse_perplexity", keep_in_memory=True)
    metric.compute(input_ids=token_stream, model=model, block_size=512, stride=512)

Windows of ``block_size`` tokens start every ``stride`` tokens. With ``stride == block_size`` they
do not overlap and every token after the first of a window is scored once; with a smaller stride
each window scores only the tokens after the previous window's end (the first window scores all of
them), so every token is scored once with up to ``block_size - stride`` tokens of context before it
(the transformers "perplexity of fixed-length models" recipe).

    perplexity = exp( sum of next-token NLL over scored tokens / tokens scored )

``ffn_flops_ratio`` is ``model.flops_report()["FLOPs/ffn_ratio"]`` for a sparse GPT-2 (FFN FLOPs over
the dense MLP's), 1.0 for a dense GPT-2, and None for other models.
"""

import math

import datasets
import evaluate
import torch
import torch.nn.functional as F

_CITATION = ""

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    input_ids (list of int): the token stream, in order (documents joined by EOS); add_batch appends.
    model: a transformers causal LM (its device is used).
    block_size (int): tokens per window, at most the model's n_positions.
    stride (int, optional): tokens between window starts, in [1, block_size]; default block_size.
    batch_size (int, optional): windows per forward pass; default 8.
Returns:
    perplexity, mean_nll, tokens_scored, block_size, stride, windowing (a sentence), ffn_flops_ratio.
"""


def windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, scored)`` per window: ``scored`` targets, the last ones of the window, each scored once."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + block_size, n_tokens)
        out.append((begin, end, end - max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def ffn_flops_ratio(model, seq_len: int):
    if hasattr(model, "flops_report"):
        return float(model.flops_report(batch_size=1, seq_len=seq_len)["FLOPs/ffn_ratio"])
    return 1.0 if getattr(model.config, "model_type", None) == "gpt2" else None


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SparsePerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"input_ids": datasets.Value("int64")}),
            format="numpy",
        )

    @torch.no_grad()
    def _compute(self, input_ids, model, block_size: int, stride: int | None = None, batch_size: int = 8):
        tokens = torch.as_tensor(input_ids, dtype=torch.long).flatten()
        stride = stride or block_size
        if not 1 <= stride <= block_size:
            raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
        if len(tokens) < 2:
            raise ValueError(f"need at least 2 tokens to score, got {len(tokens)}")
        n_pos = getattr(model.config, "n_positions", None)
        if n_pos is not None and block_size > n_pos:
            raise ValueError(f"block_size {block_size} exceeds the model's n_positions {n_pos}")
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        spans = windows(len(tokens), block_size, stride)
        total_nll, total_count = 0.0, 0
        for i in range(0, len(spans), batch_size):
            group = spans[i : i + batch_size]
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
            "ffn_flops_ratio": ffn_flops_ratio(model, block_size),
        }

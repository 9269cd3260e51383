"""Measuring a model: perplexity through the project's `evaluate` metric, and forward throughput.

The perplexity windowing is stated in ``metrics/sparse_perplexity/sparse_perplexity.py``, which
``evaluate.load`` reads from this package's folder (no Hub access).
"""

import os
import statistics
import time

import torch

METRIC_PATH = os.path.join(os.path.dirname(__file__), "metrics", "sparse_perplexity")


def load_perplexity_metric():
    """The ``sparse_perplexity`` metric, loaded by ``evaluate`` from its local folder."""
    import evaluate

    return evaluate.load(METRIC_PATH, keep_in_memory=True)


def perplexity(model, tokens: torch.Tensor, block_size: int, stride: int | None = None, batch_size: int = 8) -> dict:
    """Perplexity, mean NLL, tokens scored, the windowing and the FFN FLOPs ratio of ``model`` on a 1-D token stream."""
    if tokens.dim() != 1:
        raise ValueError("tokens must be a 1-D stream")
    return load_perplexity_metric().compute(input_ids=tokens.tolist(), model=model, block_size=block_size, stride=stride, batch_size=batch_size)


@torch.no_grad()
def forward_throughput(model, input_ids: torch.Tensor, warmup: int = 1, repeats: int = 3) -> dict:
    """Tokens per second of ``model(input_ids)`` (eval, no grad): the median of ``repeats`` timed
    forward passes after ``warmup`` untimed ones, on the model's device."""
    was_training = model.training
    model.eval()
    ids = input_ids.to(next(model.parameters()).device)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    for _ in range(warmup):
        model(ids)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        model(ids)
        sync()
        times.append(time.perf_counter() - start)
    model.train(was_training)
    seconds = statistics.median(times)
    return {"tokens_per_s": ids.numel() / seconds, "seconds": seconds, "batch_size": ids.shape[0], "seq_len": ids.shape[1]}

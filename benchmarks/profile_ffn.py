"""Where the sparse FFN's time goes: one component added at a time, against the dense MLP.

    python benchmarks/profile_ffn.py --output docs/benchmarks/results/ffn_profile.json   # on a GPU (bf16)

For d=768 and 8,192 tokens it times (median of 20 after warm-up, CUDA events) the forward and
forward+backward of: the dense GPT-2 MLP, the sparse FFN with the polynomial only, then with each
other component added alone, then all of them; eager and under torch.compile. It ends with the
torch.profiler kernel table of the compiled all-components forward.
"""

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from modeling_sparse_gpt2 import SparseGPT2Config, SparseGPT2LMHeadModel


def timed(fn, reps=20, warmup=5):
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def sparse_ffn(d, components, dtype, device, keep=0.3):
    config = SparseGPT2Config(n_embd=d, n_layer=1, n_head=max(1, d // 64), poly_keep_ratio=keep, sparse_components=components, vocab_size=128)
    model = SparseGPT2LMHeadModel(config).to(device, dtype)
    return model.transformer.h[0].mlp, model.flops_report(1, 1)["FLOPs/ffn_ratio"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    d, n = args.d, args.tokens
    x = torch.randn(n // 1024 or 1, min(n, 1024), d, device=device, dtype=dtype, requires_grad=True)
    variants = {"dense": None, "polynomial": ["polynomial"]}
    for c in ("spectral", "feedback", "tensor", "micro"):
        variants[f"polynomial+{c}"] = ["polynomial", c]
    variants["all"] = ["polynomial", "spectral", "feedback", "tensor", "micro"]
    rows = []
    for name, comps in variants.items():
        if comps is None:
            module, ratio = GPT2MLP(4 * d, GPT2Config(n_embd=d)).to(device, dtype), 1.0
        else:
            module, ratio = sparse_ffn(d, comps, dtype, device)
        for mode in ("eager", "compile"):
            fn = torch.compile(module) if mode == "compile" else module
            try:
                fwd = timed(lambda: fn(x))
                fb = timed(lambda: fn(x).sum().backward())
                rows.append({"variant": name, "mode": mode, "flops_ratio": ratio, "fwd_ms": fwd, "fwd_bwd_ms": fb})
            except Exception as err:  # keep going: one failure must not hide the rest
                rows.append({"variant": name, "mode": mode, "error": repr(err)[:500]})
            print(json.dumps(rows[-1]), flush=True)
    module, _ = sparse_ffn(d, variants["all"], dtype, device)
    fn = torch.compile(module)
    for _ in range(5):
        fn(x)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            fn(x)
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=20)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(), "torch": torch.__version__,
                       "d": d, "tokens": n, "dtype": str(dtype), "rows": rows, "profile": table}, f, indent=1)


if __name__ == "__main__":
    main()

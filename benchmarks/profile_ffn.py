"""Where the sparse FFN's time goes: one component added at a time, against the dense MLP.

    python benchmarks/profile_ffn.py --output docs/benchmarks/results/ffn_profile.json   # on a GPU (bf16)

At width d (768) and 8 x 1,024 tokens, FFN FLOPs ratio 0.4 (fused width aligned to 64), it times
forward and forward+backward (back-to-back calls, CUDA events, the helpers of ``bench_speed.py``)
of: the dense GPT-2 MLP, the narrower dense MLP of equal FLOPs (the ideal), the sparse FFN with
the polynomial only, with each other component added alone, and with all five; under
``torch.compile`` (and eager for dense / polynomial / all). It ends with ``torch.profiler`` tables
(kernels, and the operators with their input shapes) of the compiled forward+backward of the
polynomial-only and all-component FFNs.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_speed as B  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--tokens", default="8x1024")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--output", default=None)
    p.add_argument("--sparse-kwargs", default="{}", help="JSON dict of extra SparseGPT2Config knobs")
    args = p.parse_args()
    S = B.resolve_settings(B.parse_args(["--ffn-tokens", args.tokens, "--sparse-kwargs", args.sparse_kwargs]))
    B.warm_gpu(S)
    d, (batch, seq) = args.d, S["ffn_tokens"]
    dtype = B.DTYPES[S["dtype"]]
    x = torch.randn(batch, seq, d, device=S["device"], dtype=dtype, requires_grad=True)
    gy = torch.randn_like(x)
    variants = {"dense": None, "ideal": "ideal", "polynomial": ["polynomial"]}
    for c in ("spectral", "feedback", "tensor", "micro"):
        variants[f"polynomial+{c}"] = ["polynomial", c]
    variants["all"] = ["polynomial", "spectral", "feedback", "tensor", "micro"]
    rows, modules = [], {}
    ideal_ratio = args.ratio
    for name, comps in variants.items():
        info = {}
        if comps is None:
            module, ratio = B.build_dense_mlp(d, 4 * d, S), 1.0
        elif comps == "ideal":
            inner = B.ideal_inner(d, ideal_ratio, S["align"])
            module, ratio = B.build_dense_mlp(d, inner, S), inner / (4 * d)
        else:
            kw = B.sparse_config_kwargs(d, S, sparse_components=comps)
            keep = B.keep_ratio_for_budget(kw, args.ratio, S["align"])
            info = B.budget_info(kw, keep)
            module, ratio = B.build_sparse_ffn(kw, keep, S)
            if name == "all":
                ideal_ratio = ratio
        modules[name] = module
        for mode in ("eager", "compile") if name in ("dense", "polynomial", "all") else ("compile",):
            B.reset_compiler()
            fn = torch.compile(module) if mode == "compile" else module

            def fwd_bwd():
                x.grad = None
                module.zero_grad(set_to_none=True)
                fn(x).backward(gy)

            row = {"variant": name, "mode": mode, "flops_ratio": ratio, **info}
            try:
                row["first_call_s"] = round(B.first_call_s(fwd_bwd, S), 2)
                row["fwd_ms"] = B.time_fn(lambda: fn(x), S, min_sample_ms=10)["median_ms"]
                row["fwd_bwd_ms"] = B.time_fn(fwd_bwd, S, min_sample_ms=10)["median_ms"]
            except Exception as err:  # keep going: one failure must not hide the rest
                row["error"] = repr(err)[:500]
            rows.append(row)
            print(json.dumps(row), flush=True)
    tables = {}
    for name in ("polynomial", "all"):
        module = modules[name]
        B.reset_compiler()
        fn = torch.compile(module)

        def fwd_bwd():
            x.grad = None
            module.zero_grad(set_to_none=True)
            fn(x).backward(gy)

        for _ in range(3):
            fwd_bwd()
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            for _ in range(5):
                fwd_bwd()
            torch.cuda.synchronize()
        kernels = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=110)
        ops = prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=30,
                                                                 max_name_column_width=60, max_shapes_column_width=90)
        tables[name] = {"kernels": kernels, "ops": ops}
        print(f"==== {name}: kernels (5 x forward+backward)\n{kernels}\n==== {name}: operators\n{ops}", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"environment": B.environment(S), "d": d, "tokens": batch * seq, "ratio": args.ratio,
                       "rows": rows, "profiles": tables}, f, indent=1)


if __name__ == "__main__":
    main()

"""Which aten operators the tensor and micro components run: batched GEMMs, and any layout copies.

    python -m benchmarks.profile_layout --output docs/benchmarks/results/layout_profile_cpu.json

For the sparse FFN with the polynomial backbone plus ``tensor`` or ``micro`` (and, as the baseline,
the polynomial alone), one forward+backward at width ``--d`` over ``--tokens`` tokens is run under
``torch.profiler`` (CPU operators; the operator sequence is the same on CUDA, only the kernels
differ). Each row counts the top-level calls per operator (batched GEMMs: ``matmul`` of 3-D
operands, ``bmm``; GEMMs: ``linear``, ``mm``, ``addmm``) and every ``copy_`` / ``clone`` wherever it
runs (a ``reshape`` of a non-viewable tensor copies), with the top-level operator that made it;
dtype casts are left out. The difference to the polynomial-only row is what the component adds.
"""

import argparse
import json
import os
import platform
import time

import torch

from . import harness as H

GROUPS = {"batched gemm": ("aten::bmm", "aten::baddbmm", "aten::matmul"), "gemm": ("aten::mm", "aten::addmm", "aten::linear"),
          "layout copy": ()}


def op_counts(module, x) -> dict:
    gy = torch.randn_like(x)
    module(x).backward(gy)  # warm-up (lazy buffers, first-call paths)
    x.grad = None
    module.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(x).backward(gy)
    # top-level aten calls (an operator called inside another counts once, as its caller), and every
    # copy wherever it happens, named with the top-level operator that made it (a reshape that copies)
    counts, copies = {}, {}
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        top = e
        while top.cpu_parent is not None and top.cpu_parent.name.startswith("aten::"):
            top = top.cpu_parent
        if top is e:
            counts[e.name] = counts.get(e.name, 0) + 1
        if e.name in ("aten::copy_", "aten::clone") and top.name not in ("aten::to", "aten::_to_copy"):
            key = e.name if top is e else f"{e.name} in {top.name}"
            copies[key] = copies.get(key, 0) + 1
    return dict(sorted(counts.items())), dict(sorted(copies.items()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    common = argparse.ArgumentParser()
    H.add_common_args(common, output=None)
    S = H.common_settings(common.parse_args(["--device", "cpu"]), budget_s=60.0)
    x = torch.randn(1, args.tokens, args.d, requires_grad=True)
    rows = []
    baseline = None
    for comps in (["polynomial"], ["polynomial", "tensor"], ["polynomial", "micro"]):
        ffns, info = H.build_ffns(args.d, args.ratio, dict(S, sparse_kwargs={"sparse_components": comps}))
        counts, copies = op_counts(ffns["sparse"].float(), x)
        groups = {g: sum(counts.get(op, 0) for op in ops) for g, ops in GROUPS.items() if g != "layout copy"}
        groups["layout copy"] = sum(copies.values())
        row = {"components": comps, "ops": counts, "copies": copies, "groups": groups}
        if baseline is not None:
            row["added_vs_polynomial"] = {op: n - baseline["ops"].get(op, 0) for op, n in counts.items()
                                          if n != baseline["ops"].get(op, 0)}
        else:
            baseline = row
        rows.append(row)
        print(json.dumps({k: row[k] for k in row if k != "ops"}), flush=True)
    result = {"environment": {"torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "machine": platform.node()}, "settings": vars(args), "rows": rows}
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

"""Where the sparse FFN's time goes: one component added at a time, against the dense MLP.

    python -m benchmarks.profile_ffn --output docs/benchmarks/results/ffn_profile.json   # on a GPU (bf16)

At width ``--d`` (768) and 8 x 1,024 tokens, FFN FLOPs ``--ratio`` (0.4, fused width aligned to 64),
it times forward and forward+backward (the harness's settled medians) of: the dense GPT-2 MLP, the
ideal (``GPT2MLP`` of the default sparse FFN's fused width), the sparse FFN with the polynomial
only, with each other component added alone, and with all five; under ``torch.compile`` (and eager
for dense / polynomial / all). It ends with ``torch.profiler`` tables (kernels, and the operators
with their input shapes) of the compiled forward+backward of the polynomial-only and all-component
FFNs, and their kernel time counted once (``harness.kernel_ms_of_events``).
"""

import argparse

import torch

from . import harness as H

COMPONENT_SETS = {"polynomial": ["polynomial"], **{f"polynomial+{c}": ["polynomial", c] for c in ("spectral", "feedback", "tensor", "micro")},
                  "all": ["polynomial", "spectral", "feedback", "tensor", "micro"]}


def modules(d, ratio, S) -> dict:
    """{variant: (module, info)}: dense, ideal, then each component set of COMPONENT_SETS."""
    ffns, info = H.build_ffns(d, ratio, S)
    out = {"dense": (ffns["dense"], info["dense"]), "ideal": (ffns["ideal"], info["ideal"])}
    for name, comps in COMPONENT_SETS.items():
        ffns, info = H.build_ffns(d, ratio, dict(S, sparse_kwargs=dict(S["sparse_kwargs"], sparse_components=comps)))
        out[name] = (ffns["sparse"], info["sparse"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    H.add_common_args(p, output=None)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--tokens", default="8x1024")
    p.add_argument("--ratio", type=float, default=0.4)
    args = p.parse_args(argv)
    S = H.common_settings(args, budget_s=540.0)
    H.configure_torch(S)
    H.warm_gpu(S)
    batch, seq = (int(v) for v in args.tokens.lower().split("x"))
    x = torch.randn(batch, seq, args.d, device=S["device"], dtype=H.DTYPES[S["dtype"]], requires_grad=True)
    gy = torch.randn_like(x)
    results = H.Results(args.output, S, benchmark="profile_ffn") if args.output else None
    rows, built = [], modules(args.d, args.ratio, S)
    for name, (module, info) in built.items():
        for mode in ("eager", "compile") if name in ("dense", "polynomial", "all") else ("compile",):
            fn = torch.compile(module) if mode == "compile" else module
            H.reset_compiler()

            def fwd_bwd(fn=fn, module=module):
                x.grad = None
                module.zero_grad(set_to_none=True)
                fn(x).backward(gy)

            def measure(fn=fn, fwd_bwd=fwd_bwd):
                return dict(first_call_s=H.first_call_s(fwd_bwd, S), fwd=H.time_fn(lambda: fn(x), S), fwd_bwd=H.time_fn(fwd_bwd, S))

            row = dict(variant=name, mode=mode, **info)
            if results is not None:
                results.measure(rows, row, measure, label=f"{name} {mode}")
            else:
                rows.append(dict(row, **measure(), status="ok"))
    profiles = {}
    for name in ("polynomial", "all"):
        module = built[name][0]
        H.reset_compiler()
        fn = torch.compile(module)

        def fwd_bwd():
            x.grad = None
            module.zero_grad(set_to_none=True)
            fn(x).backward(gy)

        for _ in range(3):
            fwd_bwd()
        H.sync(S)
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if S["gpu"] else [])
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            for _ in range(5):
                fwd_bwd()
            H.sync(S)
        kernels = prof.key_averages().table(sort_by="self_cuda_time_total" if S["gpu"] else "self_cpu_time_total",
                                            row_limit=25, max_name_column_width=110)
        ops = prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total" if S["gpu"] else "cpu_time_total",
                                                                 row_limit=30, max_name_column_width=60, max_shapes_column_width=90)
        profiles[name] = {"kernel_ms_per_call": H.kernel_ms_of_events(prof.events()) / 5, "kernels": kernels, "ops": ops}
        print(f"==== {name}: kernels (5 x forward+backward)\n{kernels}\n==== {name}: operators\n{ops}", flush=True)
    if results is not None:
        results.data.update(d=args.d, tokens=batch * seq, ratio=args.ratio, rows=rows, profiles=profiles)
        results.save()


if __name__ == "__main__":
    main()

"""Where the sparse FFN's time goes: one component added at a time, against the dense MLP.

    python -m benchmarks.profile_ffn --output docs/benchmarks/results/ffn_profile.json   # on a GPU (bf16)
    python -m benchmarks.profile_ffn --d 768,1600 --variants none --profile ideal,polynomial   # kernel tables only

At each width of ``--d`` (768) and 8 x 1,024 tokens, FFN FLOPs ``--ratio`` (0.4, fused width aligned
to 64), it times forward and forward+backward (the harness's settled medians) of: the dense GPT-2 MLP,
the ideal (``GPT2MLP`` of the default sparse FFN's fused width), the sparse FFN with the polynomial
only, with each other component added alone, and with all five (``--variants``: a subset, or
``none``); under ``torch.compile`` (and eager for dense / polynomial / all). It ends with
``torch.profiler`` tables (kernels, and the operators with their input shapes) of the forward+backward
of each variant of ``--profile`` (ideal, polynomial-only, all) in each mode of ``--profile-modes``
(compiled), their kernel time counted once (``harness.kernel_ms_of_events``) and the same time kernel
by kernel (``harness.kernel_breakdown``: what the sparse FFN launches that the ideal does not, and
what each costs).
"""

import argparse

import torch

from . import harness as H

COMPONENT_SETS = {"polynomial": ["polynomial"], **{f"polynomial+{c}": ["polynomial", c] for c in ("spectral", "feedback", "tensor", "micro")},
                  "all": ["polynomial", "spectral", "feedback", "tensor", "micro"]}
EAGER_ROWS = ("dense", "polynomial", "all")  # the variants also timed eager


def modules(d, ratio, S) -> dict:
    """{variant: (module, info)}: dense, ideal, then each component set of COMPONENT_SETS."""
    ffns, info = H.build_ffns(d, ratio, S)
    out = {"dense": (ffns["dense"], info["dense"]), "ideal": (ffns["ideal"], info["ideal"])}
    for name, comps in COMPONENT_SETS.items():
        ffns, info = H.build_ffns(d, ratio, dict(S, sparse_kwargs=dict(S["sparse_kwargs"], sparse_components=comps)))
        out[name] = (ffns["sparse"], info["sparse"])
    return out


def _fwd_bwd(fn, module, x, gy):
    def call():
        x.grad = None
        module.zero_grad(set_to_none=True)
        fn(x).backward(gy)

    return call


def profile(module, mode: str, x, gy, S, calls: int = 5) -> dict:
    """``torch.profiler`` of ``calls`` forward+backward calls of ``module`` (``mode``: eager or compile)."""
    H.reset_compiler()
    call = _fwd_bwd(torch.compile(module) if mode == "compile" else module, module, x, gy)
    for _ in range(3):
        call()
    H.sync(S)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if S["gpu"] else [])
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        for _ in range(calls):
            call()
        H.sync(S)
    kernels = prof.key_averages().table(sort_by="self_cuda_time_total" if S["gpu"] else "self_cpu_time_total",
                                        row_limit=25, max_name_column_width=110)
    ops = prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total" if S["gpu"] else "cpu_time_total",
                                                             row_limit=30, max_name_column_width=60, max_shapes_column_width=90)
    events = prof.events()
    return {"kernel_ms_per_call": H.kernel_ms_of_events(events) / calls, "by_kernel": H.kernel_breakdown(events, calls),
            "kernels": kernels, "ops": ops}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    H.add_common_args(p, output=None)
    p.add_argument("--d", default="768", help="model widths, comma-separated")
    p.add_argument("--tokens", default="8x1024")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--variants", default=None,
                   help="the variants to time, comma-separated (dense, ideal, the COMPONENT_SETS), or none (default: all)")
    p.add_argument("--profile", default="ideal,polynomial,all", help="the variants to profile, comma-separated (or none)")
    p.add_argument("--profile-modes", default="compile", help="eager and/or compile, comma-separated")
    args = p.parse_args(argv)
    known = ["dense", "ideal", *COMPONENT_SETS]
    timed = known if args.variants is None else [] if args.variants == "none" else H.csv(args.variants)
    profiled = [] if args.profile == "none" else H.csv(args.profile)
    for flag, names, allowed in (("--variants", timed, known), ("--profile", profiled, known),
                                 ("--profile-modes", H.csv(args.profile_modes), ["eager", "compile"])):
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise SystemExit(f"{flag}: unknown {', '.join(unknown)} (choose from {', '.join(allowed)})")
    widths = H.csv(args.d, int)
    S = H.common_settings(args, budget_s=540.0)
    H.configure_torch(S)
    H.warm_gpu(S)
    batch, seq = (int(v) for v in args.tokens.lower().split("x"))
    results = H.Results(args.output, S, benchmark="profile_ffn") if args.output else None
    rows, profiles = [], {}
    for d in widths:
        x = torch.randn(batch, seq, d, device=S["device"], dtype=H.DTYPES[S["dtype"]], requires_grad=True)
        gy = torch.randn_like(x)
        built = modules(d, args.ratio, S)
        for name in timed:
            module, info = built[name]
            for mode in ("eager", "compile") if name in EAGER_ROWS else ("compile",):
                fn = torch.compile(module) if mode == "compile" else module
                H.reset_compiler()
                fwd_bwd = _fwd_bwd(fn, module, x, gy)

                def measure(fn=fn, fwd_bwd=fwd_bwd):
                    return dict(first_call_s=H.first_call_s(fwd_bwd, S), fwd=H.time_fn(lambda: fn(x), S), fwd_bwd=H.time_fn(fwd_bwd, S))

                row = dict(d=d, variant=name, mode=mode, **info)
                if results is not None:
                    results.measure(rows, row, measure, label=f"d={d} {name} {mode}")
                else:
                    rows.append(dict(row, **measure(), status="ok"))
        for name in profiled:
            for mode in H.csv(args.profile_modes):
                key = f"d={d} {name} {mode}"
                profiles[key] = prof = profile(built[name][0], mode, x, gy, S)
                lines = "\n".join(f"  {r['ms'] * 1e3:9.1f} us  x{r['launches']:g}  {r['name'][:120]}" for r in prof["by_kernel"])
                print(f"==== {key}: {prof['kernel_ms_per_call'] * 1e3:.1f} us of kernels per forward+backward\n{lines}\n"
                      f"==== {key}: kernels (5 x forward+backward)\n{prof['kernels']}\n==== {key}: operators\n{prof['ops']}",
                      flush=True)
        del built
        H.free_memory(S)
    if results is not None:
        results.data.update(d=widths, tokens=batch * seq, ratio=args.ratio, rows=rows, profiles=profiles)
        results.save()


if __name__ == "__main__":
    main()

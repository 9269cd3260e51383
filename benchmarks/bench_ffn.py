"""The FFN alone: GPT-2's MLP (dense), the sparse FFN and the ideal, forward and forward+backward.

    python -m benchmarks.bench_ffn --output docs/benchmarks/results/ffn_h200.json           # GPU, bf16
    python -m benchmarks.bench_ffn --device cpu --output docs/benchmarks/results/ffn_cpu.json  # CPU, fp32
    python -m benchmarks.bench_ffn --tiny --device cpu --output /tmp/ffn.json               # smoke run, seconds

At each width d (inner 4d) and FFN FLOPs target, on ``--tokens`` tokens (8 x 1,024): the dense
MLP (``GPT2MLP``), the sparse FFN (the block MLP of a sparse GPT-2 built by the package with the
conversion's budget solver, ``harness.build_ffns``) and the ideal (``GPT2MLP`` of the sparse FFN's
fused width). Modes: ``eager``; ``compile`` (``torch.compile(module)``); ``graphs``
(``torch.compile(mode="reduce-overhead")``, CUDA graphs, GPU only). "fwd" is the training forward
(autograd on; under ``graphs`` the no-grad inference forward), "fwd_bwd" forward and backward of a
random output gradient. Each figure: median of ``--reps`` samples of ~10 ms of back-to-back calls
(GPU) after a settled warm-up; ``gpu_kernel_ms`` beside it is the kernel time of one call under the
profiler. Every row also holds its time over dense's and over the ideal's (``*_vs_dense``,
``*_vs_ideal``), measured in the same run.
"""

from __future__ import annotations

import argparse

import torch

from . import harness as H

SECTION = "ffn"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    H.add_common_args(p, output=f"{H.RESULTS_DIR}/ffn.json")
    p.add_argument("--widths", default=None, help="FFN widths d (default 768,1024,1280,1600; --tiny: 64)")
    p.add_argument("--ratios", default=None, help="FFN FLOPs targets (default 0.5,0.4,0.2; --tiny: 0.5)")
    p.add_argument("--modes", default=None, help="comma list of eager,compile,graphs (default GPU eager,compile; CPU eager)")
    p.add_argument("--tokens", default=None, help="batch x seq (default 8x1024; --tiny 1x32)")
    return p.parse_args(argv)


def settings(args) -> dict:
    S = H.common_settings(args, budget_s=540.0)
    modes = H.csv(args.modes) or (["eager", "compile"] if S["gpu"] else ["eager"])
    unknown = sorted(set(modes) - {"eager", "compile", "graphs"})
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from eager,compile,graphs")
    tokens = args.tokens or ("1x32" if args.tiny else "8x1024")
    try:
        batch, seq = (int(v) for v in tokens.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--tokens: expected BATCHxSEQ such as 8x1024, got {tokens!r}") from None
    S.update(widths=H.csv(args.widths, int) or ([64] if args.tiny else [768, 1024, 1280, 1600]),
             ratios=H.csv(args.ratios, float) or ([0.5] if args.tiny else [0.5, 0.4, 0.2]),
             modes=modes, tokens=(batch, seq))
    return S


def measure(module, x, gy, mode: str, S) -> dict:
    """First call, then settled medians and kernel time of the forward and of forward+backward."""
    if mode == "graphs" and not S["gpu"]:
        raise RuntimeError("graphs mode needs CUDA")
    fn = module
    if mode != "eager":
        H.reset_compiler()
        fn = torch.compile(module, mode="reduce-overhead" if mode == "graphs" else None)

    def fwd():
        if mode == "graphs":  # CUDA graphs: the inference forward (its own graph, no autograd)
            torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                return fn(x)
        return fn(x)

    def fwd_bwd():
        if mode == "graphs":
            torch.compiler.cudagraph_mark_step_begin()
        x.grad = None
        module.zero_grad(set_to_none=True)
        fn(x).backward(gy)

    out = dict(first_call_s=H.first_call_s(fwd_bwd, S))
    flops = H.matmul_flops_per_token(module) * x.shape[0] * x.shape[1]
    for name, call, mult in (("fwd", fwd, 1), ("fwd_bwd", fwd_bwd, 3)):
        t = H.time_fn(call, S)
        t["gpu_kernel_ms"] = H.gpu_kernel_ms(call, S)
        t["tflops"] = mult * flops / t["median_ms"] / 1e9
        out[name] = t
    return out


def bench(S: dict, results: H.Results, section: str = SECTION):
    """Every (width, mode, kind, target) row of ``S`` into ``results[section]``."""
    rows = results.section(section, S)
    batch, seq = S["tokens"]
    dtype = H.DTYPES[S["dtype"]]
    for d in S["widths"]:
        variants = []  # (kind, target, module, info)
        for i, target in enumerate(S["ratios"]):
            try:
                ffns, info = H.build_ffns(d, target, S)
            except Exception as exc:  # noqa: BLE001
                rows.append(dict(d=d, kind="sparse", target=target, status="error", **H.error_record(exc)))
                continue
            if not any(v[0] == "dense" for v in variants):
                variants.append(("dense", None, ffns["dense"], info["dense"]))
            variants += [(kind, target, ffns[kind], info[kind]) for kind in ("sparse", "ideal")]
        torch.manual_seed(0)
        x = torch.randn(batch, seq, d, device=S["device"], dtype=dtype, requires_grad=True)
        gy = torch.randn(batch, seq, d, device=S["device"], dtype=dtype)
        for mode in S["modes"]:
            for kind, target, module, info in variants:
                row = dict(d=d, kind=kind, target=target, mode=mode, tokens=batch * seq, dtype=S["dtype"],
                           device=S["device"], **{k: v for k, v in info.items() if k != "target"})
                results.measure(rows, row, lambda: measure(module, x, gy, mode, S),
                                label=f"{section} d={d} {mode} {kind}@{target}")
        del variants, x, gy
        H.reset_compiler()
        H.free_memory(S)
    add_ratios(rows)
    results.save()


def add_ratios(rows):
    values = {f"{k}_{m}": (lambda r, k=k, m=m: r[k][m]) for k in ("fwd", "fwd_bwd") for m in ("median_ms", "gpu_kernel_ms")}
    H.add_ratios(rows, values, keys={"dense": lambda r: (r.get("d"), r.get("mode")),
                                     "ideal": lambda r: (r.get("d"), r.get("mode"), r.get("target"))})


def main(argv=None):
    return H.run_main(parse_args, settings, bench, argv, benchmark="bench_ffn")


if __name__ == "__main__":
    main()

"""Every speed row of the kernel issue in one run: each model beside dense and the ideal, one JSON.

    # H200, bf16, medians; stops starting measurements after --budget-s (default 540 s)
    python -m benchmarks.bench_all --output docs/benchmarks/results/kernels_h200.json
    # the same rows over several 10-minute calls
    python -m benchmarks.bench_all --sections ffn --output docs/benchmarks/results/kernels_ffn_h200.json
    python -m benchmarks.bench_all --sections e2e,decode --output docs/benchmarks/results/kernels_e2e_h200.json
    python -m benchmarks.bench_all --sections healing,ffn_cpu --output docs/benchmarks/results/kernels_healing_cpu_h200.json
    # smoke run of every section on the CPU, seconds
    python -m benchmarks.bench_all --tiny --device cpu --output /tmp/all.json

Sections (each a benchmark module's ``bench`` on the shared results file; they run in the order
``--sections`` names them, so a short budget reaches the first ones):

* ``ffn``: ``bench_ffn``, the FFN alone, d = 768/1024/1280/1600, 8 x 1,024 tokens, FFN FLOPs
  0.5/0.4/0.2, forward and forward+backward, eager and compiled;
* ``e2e``: ``bench_e2e``, GPT-2 small training step (16 x 1,024) and prefill (8 x 1,024), eager and compiled;
* ``decode``: ``bench_decode``, ``generate`` tokens/s at batch 1 and 32, eager and with CUDA graphs,
  and one decode step, eager and replayed from a CUDA graph;
* ``healing``: ``bench_healing``, distillation tokens/s of the sparse model and the pruned baseline;
* ``ffn_cpu``: ``bench_ffn`` on the CPU in fp32 (eager and compiled), the same widths and targets.

``--<section>-args "..."`` passes flags to that section's benchmark (e.g. ``--ffn-args "--widths 768"``);
``--tiny``, ``--device``, ``--reps``, ``--warmup-max``, ``--settle-tol``, ``--align`` and
``--sparse-kwargs`` reach every section (``ffn_cpu`` always runs on the CPU in fp32). The sparse
models are built by the package, so the same command measures whatever FFN implementation the
package runs by default.
"""

from __future__ import annotations

import argparse
import shlex

from . import bench_decode, bench_e2e, bench_ffn, bench_healing
from . import harness as H

SECTIONS = {  # name: (module, flags of its own)
    "ffn": (bench_ffn, []),
    "e2e": (bench_e2e, []),
    "decode": (bench_decode, []),
    "healing": (bench_healing, []),
    "ffn_cpu": (bench_ffn, ["--device", "cpu", "--dtype", "fp32", "--modes", "eager,compile"]),
}
SHARED = ("--device", "--reps", "--warmup-max", "--settle-tol", "--align", "--sparse-kwargs")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    H.add_common_args(p, output=f"{H.RESULTS_DIR}/kernels.json")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    for name in SECTIONS:
        p.add_argument(f"--{name.replace('_', '-')}-args", default="", help=f"extra flags of the {name} section")
    return p.parse_args(argv)


def section_argv(args, name: str) -> list:
    """The flags of one section: the shared ones given here, its own, then ``--<name>-args``."""
    argv = ["--tiny"] if args.tiny else []
    for flag in SHARED:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and not (name == "ffn_cpu" and flag == "--device"):
            argv += [flag, str(value)]
    if args.dtype and name != "ffn_cpu":
        argv += ["--dtype", args.dtype]
    if args.tiny and name == "ffn_cpu":
        own = ["--device", "cpu", "--dtype", "fp32", "--modes", "eager"]  # compiling takes minutes: not in a smoke run
    else:
        own = SECTIONS[name][1]
    return argv + own + shlex.split(getattr(args, f"{name}_args"))


def main(argv=None):
    args = parse_args(argv)
    sections = H.csv(args.sections)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    S = H.common_settings(args, budget_s=540.0)
    S["sections"] = sections
    H.configure_torch(S)
    results = H.Results(args.output, S, benchmark="bench_all")
    H.warm_gpu(S)
    for name in dict.fromkeys(sections):
        module = SECTIONS[name][0]
        section_settings = module.settings(module.parse_args(section_argv(args, name)))
        print(f"[{name}] t={results.budget.elapsed():.0f}s", flush=True)
        try:
            module.bench(section_settings, results, section=name)
        except Exception as exc:  # noqa: BLE001 -- keep the sections measured so far
            results.data.setdefault("section_errors", {})[name] = H.error_record(exc)
        results.save()
    print_summary(results.data)
    return results.data


def print_summary(data: dict):
    """One line per row: what it measured, its median and its ratios to dense / the ideal / pruned."""
    for name in SECTIONS:
        rows = data.get(name, {}).get("rows", [])
        if rows:
            print(f"\n{name}")
        for r in rows:
            where = " ".join(f"{k}={r[k]}" for k in ("d", "stage", "mode", "batch") if r.get(k) is not None)
            ratios = " ".join(f"{k}={v:.2f}" for k, v in r.items() if "_vs_" in k and "kernel" not in k and v is not None)
            print(f"  {r.get('kind', '?'):7s} @{r.get('target')} {where:32s} {H.row_summary(r):40s} {ratios}")
    if data.get("section_errors"):
        print("section errors:", {k: v["error"][:200] for k, v in data["section_errors"].items()})


if __name__ == "__main__":
    main()

"""Where a GPT-2 step's wall time goes on the GPU: kernel time, and the idle gaps between kernels.

    python -m benchmarks.profile_step --stages train,prefill --modes compile --output docs/benchmarks/results/step_gaps_h200.json
    python -m benchmarks.profile_step --tiny --device cpu --stages train --modes eager    # a check of this script

``bench_e2e`` gives each model's wall time and its GPU kernel time; where the two differ the GPU sat
idle between kernels. This profiles ``--steps`` calls (after three warm-up calls) of the same
training step or prefill (``bench_e2e.train_step`` / ``prefill_call``, the same compiled blocks) of
the ideal and the sparse model (``--kinds``), exports the ``torch.profiler`` trace and reads it
(``analyse``): per call, the span from the first kernel's start to the last one's end, the time some
kernel ran (the union of their intervals), and the idle rest as gaps between consecutive kernels.
A gap is *host-late* when the kernel after it was launched less than ``HOST_LATE_US`` before it
started (the GPU had nothing queued: it waited on the host), else a *device* gap (the GPU's own time
between dependent kernels). Host-late gaps are summed by the innermost operator (or
``record_function`` range) that launched the kernel after them, which names where the host work is.
"""

from __future__ import annotations

import bisect
import collections
import json
import os
import tempfile

import torch

from . import bench_e2e
from . import harness as H

HOST_LATE_US = 20.0  # a kernel launched less than this before it started found the GPU idle, waiting for it
KERNEL_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def analyse(events: list, calls: int, top: int = 15) -> dict:
    """The kernel time and idle gaps of a chrome trace's ``events`` (``prof.export_chrome_trace``) over
    ``calls`` calls, per call (microseconds), with the host-late gaps summed by the operator that
    launched the kernel after them (its innermost enclosing ``cpu_op`` / ``user_annotation`` on the
    launching thread)."""
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in KERNEL_CATS), key=lambda e: e["ts"])
    if not kernels:
        return dict(kernels_per_call=0, span_us=0.0, busy_us=0.0, idle_us=0.0, host_late_us=0.0, device_gap_us=0.0,
                    host_late_by_op=[], largest_gaps=[])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    ops_by_tid = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation"):
            ops_by_tid[e["tid"]].append(e)
    for ops in ops_by_tid.values():
        ops.sort(key=lambda e: e["ts"])
    starts_by_tid = {tid: [e["ts"] for e in ops] for tid, ops in ops_by_tid.items()}

    def launcher(launch) -> str:
        """The innermost op on the launch's thread that encloses it (the latest-starting one)."""
        ops, starts = ops_by_tid.get(launch["tid"], []), starts_by_tid.get(launch["tid"], [])
        for i in range(bisect.bisect_right(starts, launch["ts"]) - 1, -1, -1):
            if ops[i]["ts"] + ops[i]["dur"] >= launch["ts"] + launch.get("dur", 0):
                return ops[i]["name"]
        return "(no enclosing op)"

    busy = host_late = device_gap = 0.0
    end = kernels[0]["ts"]
    by_op = collections.defaultdict(lambda: [0.0, 0])
    gaps = []
    for k in kernels:
        start, stop = k["ts"], k["ts"] + k["dur"]
        gap = start - end
        if gap > 0:
            launch = launches.get(k.get("args", {}).get("correlation"))
            late = launch is not None and start - launch["ts"] < HOST_LATE_US
            op = launcher(launch) if launch is not None else "(no launch event)"
            if late:
                host_late += gap
                by_op[op][0] += gap
                by_op[op][1] += 1
            else:
                device_gap += gap
            gaps.append(dict(gap_us=gap, host_late=late, kernel=k["name"][:120], launched_by=op[:120]))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = end - kernels[0]["ts"]
    rows = sorted(([op, us, n] for op, (us, n) in by_op.items()), key=lambda row: -row[1])
    return dict(
        kernels_per_call=len(kernels) / calls, span_us=span / calls, busy_us=busy / calls, idle_us=(span - busy) / calls,
        host_late_us=host_late / calls, device_gap_us=device_gap / calls,
        host_late_by_op=[dict(op=op[:120], us=us / calls, gaps=n / calls) for op, us, n in rows[:top]],
        largest_gaps=sorted(gaps, key=lambda g: -g["gap_us"])[:top],
    )


def profile_calls(fn, S, calls: int) -> dict:
    """``analyse`` of ``calls`` calls of ``fn`` after three warm-up calls."""
    for _ in range(3):
        fn()
    H.sync(S)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if S["gpu"] else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        H.sync(S)
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    return analyse(events, calls)


def main(argv=None):
    p = bench_e2e.parser(__doc__.split("\n\n")[0])
    p.set_defaults(output=None)  # bench_e2e's default file is its own results
    p.add_argument("--kinds", default="ideal,sparse", help="models to profile, comma list of dense,ideal,sparse")
    p.add_argument("--steps", type=int, default=3, help="profiled calls per row")
    args = p.parse_args(argv)
    kinds = H.csv(args.kinds)
    if not kinds or set(kinds) - {"dense", "ideal", "sparse"}:
        raise SystemExit(f"--kinds: choose from dense,ideal,sparse, got {args.kinds!r}")
    S = bench_e2e.settings(args)
    H.configure_torch(S)
    H.warm_gpu(S)
    results = H.Results(args.output, S, benchmark="profile_step") if args.output else None
    target = S["ratios"][0]
    models, _ = H.build_models(S["model"], target, S, kinds=tuple(kinds))
    rows = []
    for stage in S["stages"]:
        for mode in S["modes"]:
            for kind in kinds:
                model = models[kind] if stage == "train" else H.inference_copy(models[kind], S)
                with bench_e2e.compiled(model, S, mode == "compile") as fwd:
                    fn = bench_e2e.train_step(model, fwd, S)[0] if stage == "train" else bench_e2e.prefill_call(model, fwd, S)
                    row = dict(stage=stage, mode=mode, kind=kind, target=None if kind == "dense" else target,
                               **profile_calls(fn, S, args.steps))
                model.zero_grad(set_to_none=True)
                rows.append(row)
                print(f"{stage} {mode} {kind}: {row['kernels_per_call']:.0f} kernels, span {row['span_us'] / 1e3:.2f} ms, "
                      f"busy {row['busy_us'] / 1e3:.2f} ms, idle {row['idle_us'] / 1e3:.2f} ms (host-late "
                      f"{row['host_late_us'] / 1e3:.2f}, device {row['device_gap_us'] / 1e3:.2f})", flush=True)
                for r in row["host_late_by_op"][:8]:
                    print(f"    {r['us']:8.1f} us in {r['gaps']:5.1f} host-late gaps before kernels launched by {r['op']}")
                H.free_memory(S)
    if results is not None:
        results.data.update(rows=rows, host_late_us=HOST_LATE_US)
        results.save()
    return rows


if __name__ == "__main__":
    main()

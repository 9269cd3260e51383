"""Tables and plots for docs/benchmarks.md, computed from the raw JSON in docs/benchmarks/results/.

    python -m benchmarks.make_report            # prints the markdown tables, writes docs/benchmarks/*.png
    python -m benchmarks.make_report --no-plots --kernels docs/benchmarks/results/kernels_h200.json
                                                # ... and the tables of a bench_all results file

Nothing here is typed in by hand: every figure comes from a results file written by a benchmark
(``bench_quality``, ``bench_all`` and its sections, or the earlier ``bench_speed.py``, whose files
are read as they are). Ratios are computed here from the medians of one file, a row against the
dense (or ideal) row of the same run; a figure or ratio that was not measured prints as "n/a" or
the row's status, never as a default.
"""

import argparse
import json
import os
import statistics

def pyplot():
    """matplotlib's pyplot (headless), imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(HERE, "..", "docs", "benchmarks")
RESULTS = os.path.join(DOCS, "results")
LABELS = {
    "sparse_gpt2": "sparse-gpt2 (default)",  # a row names the components it ran with: ``label``
    "sparse_gpt2_all": "sparse-gpt2, all five components",
    "sparse_gpt2_poly": "sparse-gpt2, polynomial only",
    "prune_ls": "pruning + LS refit of c_proj",
    "svd": "SVD low rank",
    "prune": "neuron pruning (GELU kept)",
    "random_sparse": "sparse arch., random init",
}
COLORS = dict(zip(LABELS, ["C0", "C9", "C8", "C2", "C3", "C1", "C4"]))
BASELINES = ("prune_ls", "svd", "prune", "random_sparse")


def load(name):
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------ quality
def ok(r) -> bool:
    """A measured row: status ok, or (files written before rows had a status) no error and no skip."""
    return r.get("status", "error" if "error" in r or "skipped" in r else "ok") == "ok"


def status(r) -> str:
    return r.get("status") or ("error" if "error" in r else "skipped")


def label(r) -> str:
    """The method of row ``r`` as the tables and plots name it; the default's rows say which components
    it was when they were measured (the conversion's default changed with issue 12)."""
    if r["method"] == "sparse_gpt2" and r.get("components"):
        return f"sparse-gpt2 (default: {' + '.join(r['components'])})"
    return LABELS[r["method"]]


def cell(v, fmt="{:.2f}"):
    return "n/a" if v is None else fmt.format(v)


def quality_tables(d):
    dense = d["dense"]["perplexity"]
    rows = [r for r in d["rows"] if ok(r)]
    out = [f"Dense reference: perplexity **{dense:.3f}** ({d['windowing']}).", "",
           "| FFN FLOPs (target) | method | FFN FLOPs | ppl calibration-only | / dense | ppl healed | / dense |",
           "|---|---|---|---|---|---|---|"]
    order = list(LABELS)
    for r in sorted(rows, key=lambda r: (-r["ffn_flops_ratio_target"], order.index(r["method"]))):
        out.append(f"| {r['ffn_flops_ratio_target']} | {label(r)} | {r['ffn_flops_ratio']:.3f} | "
                   f"{r['ppl_calibration_only']:.3f} | {r['ppl_calibration_only'] / dense:.3f} | "
                   f"{r['ppl_healed']:.3f} | {r['ppl_healed'] / dense:.3f} |")
    for r in d["rows"]:
        if not ok(r):
            why = f"failed: `{r['error'][:80]}`" if "error" in r else f"skipped: {r.get('reason', '')}"
            out.append(f"| {r['ffn_flops_ratio_target']} | {label(r)} | {why} | | | | |")
    # against the best baseline at each ratio
    out += ["", "| FFN FLOPs | sparse-gpt2 calibration-only / dense | best baseline (calibration-only) | sparse-gpt2 better by | "
            "sparse-gpt2 healed / dense | best baseline (healed) | sparse-gpt2 better by |", "|---|---|---|---|---|---|---|"]
    for t in sorted({r["ffn_flops_ratio_target"] for r in rows}, reverse=True):
        ours = next((r for r in rows if r["method"] == "sparse_gpt2" and r["ffn_flops_ratio_target"] == t), None)
        base = [r for r in rows if r["method"] in BASELINES and r["ffn_flops_ratio_target"] == t]
        if not ours or not base:
            continue
        cells = [f"{t}"]
        for key in ("ppl_calibration_only", "ppl_healed"):
            best = min(base, key=lambda r: r[key])
            cells += [f"{ours[key] / dense:.3f}", f"{best[key] / dense:.3f} ({best['method']})",
                      f"{(best[key] - ours[key]) / best[key] * 100:+.1f}%"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def quality_plot(d, path):
    plt = pyplot()
    dense = d["dense"]["perplexity"]
    rows = [r for r in d["rows"] if ok(r)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, key, title in ((axes[0], "ppl_calibration_only", "calibration only (no training)"),
                           (axes[1], "ppl_healed", f"after healing ({d['healing_budget']['tokens'] / 1e6:.2f} M tokens of distillation)")):
        for method in LABELS:
            ours = [r for r in rows if r["method"] == method]
            pts = sorted((r["ffn_flops_ratio"], r[key] / dense) for r in ours)
            if pts:
                ax.plot(*zip(*pts), "o-" if method.startswith("sparse_gpt2") else "s--", color=COLORS[method], label=label(ours[0]))
        front = {}  # Pareto front over every method: the lowest perplexity at each FLOPs target
        for r in rows:
            t = r["ffn_flops_ratio_target"]
            front[t] = min(front.get(t, (9e9, 0)), (r[key] / dense, r["ffn_flops_ratio"]))
        fx = sorted(front)
        ax.plot([front[t][1] for t in fx], [front[t][0] for t in fx], color="k", lw=2.5, alpha=0.25, label="Pareto front (all methods)")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylim(0.95, 4.0)
        ax.set_xlabel("FFN FLOPs / dense MLP")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("perplexity / dense (log; points above 4x are off the chart)")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"GPT-2 d=512, 8 layers, dense perplexity {dense:.2f} (H200)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def curve_plot(curve, path):
    plt = pyplot()
    pts = curve["curve"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([p["tokens"] / 1e6 for p in pts], [p["val_ppl"] for p in pts], "-", label="validation (400 windows of 512)")
    ax.plot([p["tokens"] / 1e6 for p in pts], [2.718281828 ** p["train_loss"] for p in pts], "-", alpha=0.4, label="training batch")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"dense reference: best validation perplexity {curve['best_val_ppl']:.2f} ({curve['stop_reason']})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------ speed
def flops_ratio(r):
    return r.get("ffn_flops_ratio", r.get("flops_ratio"))


def ffn_measured(r) -> bool:
    return "fwd_bwd" in r and (r.get("status") == "ok" if "status" in r else True)


def _over(r, ref, key, field="median_ms"):
    """r[key][field] / ref[key][field], None when either is missing."""
    a = r.get(key, {}).get(field) if r else None
    b = ref.get(key, {}).get(field) if ref else None
    return a / b if a and b else None


def ffn_table(d):
    rows = d["ffn"]["rows"] if isinstance(d["ffn"], dict) else d["ffn"]
    dense = {(r["d"], r["mode"]): r for r in rows if r["kind"] == "dense" and ffn_measured(r)}
    out = ["| mode | d | FFN | FLOPs / dense | fwd time / dense | f+b time / dense | fwd kernel time / dense | "
           "f+b kernel time / dense | f+b time / FLOPs ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for mode in ("eager", "compile", "graphs"):
        for r in rows:
            if r.get("mode") != mode:
                continue
            if not ffn_measured(r):
                out.append(f"| {mode} | {r['d']} | {r['kind']} | {cell(flops_ratio(r), '{:.3f}')} | {status(r)} | | | | |")
                continue
            ref = dense.get((r["d"], mode))
            if r["kind"] == "dense":
                out.append(f"| {mode} | {r['d']} | dense | 1 | {r['fwd']['median_ms']:.3f} ms | {r['fwd_bwd']['median_ms']:.3f} ms | "
                           f"{cell(r['fwd'].get('gpu_kernel_ms'), '{:.3f} ms')} | {cell(r['fwd_bwd'].get('gpu_kernel_ms'), '{:.3f} ms')} | |")
                continue
            fb = _over(r, ref, "fwd_bwd")
            out.append(f"| {mode} | {r['d']} | {r['kind']} | {flops_ratio(r):.3f} | {cell(_over(r, ref, 'fwd'))} | {cell(fb)} | "
                       f"{cell(_over(r, ref, 'fwd', 'gpu_kernel_ms'))} | {cell(_over(r, ref, 'fwd_bwd', 'gpu_kernel_ms'))} | "
                       f"{cell(fb / flops_ratio(r) if fb else None)} |")
    return "\n".join(out)


def ffn_plot(d, path):
    plt = pyplot()
    rows = [r for r in d["ffn"] if r.get("mode") == "graphs" and ffn_measured(r) and r.get("target") in (None, 0.4)]
    dense = {r["d"]: r for r in rows if r["kind"] == "dense"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in ((axes[0], "fwd", "forward (inference)"), (axes[1], "fwd_bwd", "forward + backward")):
        for kind, color, label in (("sparse", "C0", "sparse-gpt2 (default components)"), ("sparse_all", "C9", "sparse-gpt2, all five"),
                                   ("ideal", "C2", "ideal: narrower dense MLP")):
            pts = sorted((r["d"], _over(r, dense[r["d"]], key)) for r in rows if r["kind"] == kind)
            kpts = sorted((r["d"], _over(r, dense[r["d"]], key, "gpu_kernel_ms")) for r in rows if r["kind"] == kind)
            ax.plot(*zip(*pts), "o-", color=color, label=f"{label}, wall time")
            ax.plot(*zip(*kpts), "x:", color=color, alpha=0.7, label=f"{label}, GPU kernel time")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.4, color="r", lw=0.8, ls="--", label="FLOPs ratio 0.4")
        ax.axhline(0.44, color="r", lw=0.8, ls=":", label="target: 1.1 x FLOPs ratio")
        ax.set_xlabel("width d (inner 4d), 8 x 1024 tokens, bf16, CUDA graphs")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("time / dense MLP")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# decode measured with each model in a fresh process (--decode-isolation process); the decode rows of
# speed_e2e_h200.json were measured one model after another in one process and are not used
DECODE_RUNS = ("speed_e2e_h200_run2.json", "speed_e2e_decode_eager_h200.json", "speed_e2e_decode_graphs_h200.json",
               "speed_e2e_decode_graphs_b1_h200.json")


def model_of(r) -> str:
    """The model a row measured: ``model`` in bench_speed's files, ``kind`` and ``target`` in the harness's."""
    if "model" in r:
        return r["model"]
    return r["kind"] if r["kind"] == "dense" or r.get("target") is None else f"{r['kind']}@{r['target']}"


def speed_measured(r) -> bool:
    return "median_ms" in r and (r.get("status") == "ok" if "status" in r else True)


def _row(rows, model, stage, mode, batch=None):
    return next((r for r in rows if model_of(r) == model and r["stage"] == stage and r.get("mode") == mode
                 and r.get("batch") == batch), None)


def speedup(rows, r):
    """dense's median time over this row's, dense measured in the same run; None if either is missing."""
    ref = _row(rows, "dense", r["stage"], r.get("mode"), r.get("batch"))
    return ref["median_ms"] / r["median_ms"] if ref is not None and speed_measured(ref) and speed_measured(r) else None


def _decode_cell(runs, model, mode, batch):
    """Median tokens/s and median speed-up (each run's own ratio to its dense) over the isolated runs."""
    found = [(d["e2e"]["rows"], r) for d in runs if (r := _row(d["e2e"]["rows"], model, "decode", mode, batch)) and speed_measured(r)]
    if not found:
        return "not run"
    tps = statistics.median(r["tokens_per_s"] for _, r in found)
    speedups = sorted(s for rows, r in found if (s := speedup(rows, r)) is not None)
    n = len(found)
    if not speedups:
        return f"{tps:,.0f} (speed-up n/a: no dense row; {n} run{'s' if n > 1 else ''})"
    spread = f"; {speedups[0]:.2f}-{speedups[-1]:.2f}" if len(speedups) > 1 and model != "dense" else ""
    return f"{tps:,.0f} (**{statistics.median(speedups):.2f}x**{spread}; {n} run{'s' if n > 1 else ''})"


def e2e_table(d, decode_runs=None):
    """Train and prefill rows from ``d``; decode rows from ``decode_runs`` when given (else from ``d``)."""
    e = d["e2e"]
    names = list(e["models"])
    out = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    out.append("| FFN FLOPs / dense | " + " | ".join(f"{flops_ratio(e['models'][n]):.3f}" for n in names) + " |")
    out.append("| parameters (M) | " + " | ".join(f"{e['models'][n]['params'] / 1e6:.1f}" for n in names) + " |")
    out.append("| FFN parameters (M) | " + " | ".join(f"{e['models'][n]['ffn_params'] / 1e6:.1f}" for n in names) + " |")
    keys = [("train", "eager", None, "training tokens/s, eager"), ("train", "compile", None, "training tokens/s, compiled blocks"),
            ("prefill", "eager", None, "prefill ms, eager"), ("prefill", "compile", None, "prefill ms, compiled blocks"),
            ("decode", "eager", 1, "decode tokens/s, batch 1, eager"), ("decode", "eager", 32, "decode tokens/s, batch 32, eager"),
            ("decode", "cuda_graphs", 1, "decode tokens/s, batch 1, CUDA graphs"),
            ("decode", "cuda_graphs", 32, "decode tokens/s, batch 32, CUDA graphs")]
    for stage, mode, batch, label in keys:
        if stage == "decode" and decode_runs:
            out.append(f"| {label} | " + " | ".join(_decode_cell(decode_runs, n, mode, batch) for n in names) + " |")
            continue
        cells = []
        for n in names:
            r = _row(e["rows"], n, stage, mode, batch)
            if r is None or not speed_measured(r):
                cells.append("not run" if r is None or status(r) == "skipped" else "failed")
                continue
            v = f"{r['median_ms']:.2f}" if stage == "prefill" else f"{r['tokens_per_s']:,.0f}"
            extra = f" (GPU kernels {r['gpu_kernel_ms']:.2f} ms)" if r.get("gpu_kernel_ms") and stage == "prefill" else ""
            cells.append(f"{v} (**{cell(speedup(e['rows'], r))}x**){extra}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
        if stage == "train":
            mem = []
            dense_row = _row(e["rows"], "dense", stage, mode)
            for n in names:
                r = _row(e["rows"], n, stage, mode)
                rel = r["peak_mem_gib"] / dense_row["peak_mem_gib"] if r and dense_row and r.get("peak_mem_gib") and dense_row.get("peak_mem_gib") else None
                mem.append(f"{r['peak_mem_gib']:.2f} ({cell(rel)}x)" if r and r.get("peak_mem_gib") else "-")
            out.append(f"| peak GPU memory GiB, training {mode} | " + " | ".join(mem) + " |")
    return "\n".join(out)


def cpu_table(d):
    rows = [r for r in d["ffn"] if ffn_measured(r)]
    dense = next(r for r in rows if r["kind"] == "dense")
    out = [f"dense MLP: forward {dense['fwd']['median_ms']:.1f} ms, forward+backward {dense['fwd_bwd']['median_ms']:.1f} ms "
           f"({dense['tokens']} tokens)", "", "| FFN | FLOPs / dense | fwd time / dense | f+b time / dense | f+b time / FLOPs ratio |",
           "|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "dense":
            fb = _over(r, dense, "fwd_bwd")
            out.append(f"| {r['kind']} @{r['target']} | {flops_ratio(r):.3f} | {cell(_over(r, dense, 'fwd'))} | "
                       f"{cell(fb)} | {cell(fb / flops_ratio(r) if fb else None)} |")
    return "\n".join(out)


def flops_table(d):
    out = ["| component | analytic | FlopCounterMode |", "|---|---|---|"]
    for name, v in d["flop_agreement"].items():
        out.append(f"| {name} | {v['analytic']:,} | {v['flop_counter']:,} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------ kernel issue (bench_all)
KEY_FIELDS = {"ffn": ("mode", "d"), "ffn_cpu": ("mode", "d"), "e2e": ("stage", "mode"), "decode": ("stage", "mode", "batch"),
              "healing": ()}


def _time(r, measure):
    if not speed_measured(r) and not ffn_measured(r):
        return None
    return r[measure]["median_ms"] if measure in ("fwd", "fwd_bwd") else r.get("median_ms")


def versus_table(rows, fields, reference="ideal", with_dense=True):
    """One line per sparse row and measure: dense, reference and sparse ms, and the time ratios, all
    from rows of the same run (matched on ``fields``, and the target for the reference)."""
    measures = ("fwd", "fwd_bwd") if any("fwd_bwd" in r for r in rows) else ("median_ms",)
    head = list(fields) + ["target", "measure"] + (["dense ms"] if with_dense else []) + [f"{reference} ms", "sparse ms"]
    head += ([f"{reference} / dense", "sparse / dense"] if with_dense else []) + [f"sparse / {reference}"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    key = lambda r: tuple(r.get(f) for f in fields)  # noqa: E731
    for r in rows:
        if r.get("kind") != "sparse":
            continue
        dense = next((x for x in rows if x.get("kind") == "dense" and key(x) == key(r)), None)
        ref = next((x for x in rows if x.get("kind") == reference and key(x) == key(r) and x.get("target") == r.get("target")), None)
        for m in measures:
            t = {name: _time(x, m) if x is not None else None for name, x in (("dense", dense), ("ref", ref), ("sparse", r))}
            cells = [str(v) for v in key(r)] + [str(r.get("target")), "time" if m == "median_ms" else m]
            cells += ([cell(t["dense"], "{:.3f}")] if with_dense else []) + [cell(t["ref"], "{:.3f}"), cell(t["sparse"], "{:.3f}") if t["sparse"] else status(r)]
            if with_dense:
                cells += [cell(ratio(t["ref"], t["dense"])), cell(ratio(t["sparse"], t["dense"]))]
            cells.append(cell(ratio(t["sparse"], t["ref"])))
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def ratio(a, b):
    return a / b if a and b else None


def kernel_tables(d) -> str:
    """Every section of a ``bench_all`` results file as a table against dense and the ideal (pruned for healing)."""
    env = d.get("environment", {})
    out = [f"commit {env.get('commit')}" + (" (DIRTY tree)" if env.get("dirty") else "") + f", {env.get('gpu_name') or 'CPU'}, "
           f"torch {env.get('torch')}, {env.get('date_utc')}"]
    for name, fields in KEY_FIELDS.items():
        rows = d.get(name, {}).get("rows", [])
        if rows:
            S = d[name]["settings"]
            out += ["", f"### {name} ({S['device']}, {S['dtype']})", ""]
            out.append(versus_table(rows, fields, reference="pruned", with_dense=False) if name == "healing" else versus_table(rows, fields))
            skipped = [r for r in rows if not ok(r)]
            if skipped:
                out.append(f"\n{len(skipped)} rows not measured: " + "; ".join(
                    f"{model_of(r)} {' '.join(str(r.get(f)) for f in fields)}: {status(r)}" for r in skipped[:20]))
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-plots", action="store_true", help="print the tables only")
    p.add_argument("--kernels", nargs="*", default=[], help="bench_all results files to print as tables too")
    args = p.parse_args(argv)
    quality = load("quality.json")
    curve = load("reference_training_curve.json")
    ffn, e2e, cpu = load("speed_ffn_h200.json"), load("speed_e2e_h200.json"), load("speed_cpu.json")
    print("## quality\n" + quality_tables(quality))
    print("\n## FLOPs agreement\n" + flops_table(quality))
    print("\n## FFN (H200)\n" + ffn_table(ffn))
    print("\n## end to end (H200); decode: isolated runs\n" + e2e_table(e2e, [load(name) for name in DECODE_RUNS]))
    print("\n## end to end (H200), repeat run\n" + e2e_table(load("speed_e2e_h200_run2.json")))
    print("\n## FFN (CPU)\n" + cpu_table(cpu))
    for path in args.kernels:
        with open(path) as f:
            print(f"\n## {os.path.basename(path)}\n" + kernel_tables(json.load(f)))
    if not args.no_plots:
        quality_plot(quality, os.path.join(DOCS, "quality_vs_flops.png"))
        curve_plot(curve, os.path.join(DOCS, "reference_training_curve.png"))
        ffn_plot(ffn, os.path.join(DOCS, "ffn_speed_vs_width.png"))


if __name__ == "__main__":
    main()

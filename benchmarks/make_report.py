"""Tables and plots for docs/benchmarks.md, computed from the raw JSON in docs/benchmarks/results/.

    python benchmarks/make_report.py        # prints the markdown tables, writes docs/benchmarks/*.png

Nothing here is typed in by hand: every figure comes from a results file written by
``bench_quality.py`` or ``bench_speed.py``.
"""

import json
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(HERE, "..", "docs", "benchmarks")
RESULTS = os.path.join(DOCS, "results")
LABELS = {
    "sparse_gpt2": "sparse-gpt2 (default: polynomial + spectral + feedback)",
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
def quality_tables(d):
    dense = d["dense"]["perplexity"]
    rows = [r for r in d["rows"] if "error" not in r]
    out = [f"Dense reference: perplexity **{dense:.3f}** ({d['windowing']}).", "",
           "| FFN FLOPs (target) | method | FFN FLOPs | ppl calibration-only | / dense | ppl healed | / dense |",
           "|---|---|---|---|---|---|---|"]
    order = list(LABELS)
    for r in sorted(rows, key=lambda r: (-r["ffn_flops_ratio_target"], order.index(r["method"]))):
        out.append(f"| {r['ffn_flops_ratio_target']} | {LABELS[r['method']]} | {r['ffn_flops_ratio']:.3f} | "
                   f"{r['ppl_calibration_only']:.3f} | {r['ppl_calibration_only'] / dense:.3f} | "
                   f"{r['ppl_healed']:.3f} | {r['ppl_healed'] / dense:.3f} |")
    for r in d["rows"]:
        if "error" in r:
            out.append(f"| {r['ffn_flops_ratio_target']} | {LABELS[r['method']]} | failed: `{r['error'][:80]}` | | | | |")
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
    dense = d["dense"]["perplexity"]
    rows = [r for r in d["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, key, title in ((axes[0], "ppl_calibration_only", "calibration only (no training)"),
                           (axes[1], "ppl_healed", f"after healing ({d['healing_budget']['tokens'] / 1e6:.2f} M tokens of distillation)")):
        for method in LABELS:
            pts = sorted((r["ffn_flops_ratio"], r[key] / dense) for r in rows if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), "o-" if method.startswith("sparse_gpt2") else "s--", color=COLORS[method], label=LABELS[method])
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
def _kernel_ratio(r, dense, key):
    a, b = r[key].get("gpu_kernel_ms"), dense[key].get("gpu_kernel_ms")
    return a / b if a and b else None


def ffn_table(d):
    rows = d["ffn"]
    dense = {(r["d"], r["mode"]): r for r in rows if r["kind"] == "dense" and "fwd_bwd" in r}
    out = ["| mode | d | FFN | FLOPs / dense | fwd time / dense | f+b time / dense | fwd kernel time / dense | "
           "f+b kernel time / dense | f+b time / FLOPs ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for mode in ("eager", "compile", "graphs"):
        for r in rows:
            if r.get("mode") != mode or "fwd_bwd" not in r:
                continue
            ref = dense[(r["d"], mode)]
            if r["kind"] == "dense":
                out.append(f"| {mode} | {r['d']} | dense | 1 | {r['fwd']['median_ms']:.3f} ms | {r['fwd_bwd']['median_ms']:.3f} ms | "
                           f"{r['fwd']['gpu_kernel_ms']:.3f} ms | {r['fwd_bwd']['gpu_kernel_ms']:.3f} ms | |")
                continue
            fk, bk = _kernel_ratio(r, ref, "fwd"), _kernel_ratio(r, ref, "fwd_bwd")
            out.append(f"| {mode} | {r['d']} | {r['kind']} | {r['flops_ratio']:.3f} | {r['fwd_time_ratio']:.2f} | "
                       f"{r['fwd_bwd_time_ratio']:.2f} | {fk:.2f} | {bk:.2f} | {r['fwd_bwd_time_over_flops']:.2f} |")
    return "\n".join(out)


def ffn_plot(d, path):
    rows = [r for r in d["ffn"] if r.get("mode") == "graphs" and "fwd_bwd" in r and r.get("target") in (None, 0.4)]
    dense = {r["d"]: r for r in rows if r["kind"] == "dense"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in ((axes[0], "fwd", "forward (inference)"), (axes[1], "fwd_bwd", "forward + backward")):
        for kind, color, label in (("sparse", "C0", "sparse-gpt2 (default components)"), ("sparse_all", "C9", "sparse-gpt2, all five"),
                                   ("ideal", "C2", "ideal: narrower dense MLP")):
            pts = sorted((r["d"], r[key]["median_ms"] / dense[r["d"]][key]["median_ms"]) for r in rows if r["kind"] == kind)
            kpts = sorted((r["d"], _kernel_ratio(r, dense[r["d"]], key)) for r in rows if r["kind"] == kind)
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


def _row(rows, model, stage, mode, batch=None):
    return next((r for r in rows if r["model"] == model and r["stage"] == stage and r.get("mode") == mode
                 and r.get("batch") == batch), None)


def _decode_cell(runs, model, mode, batch):
    """Median tokens/s and median speed-up (each run's own ratio to its dense) over the isolated runs."""
    rows = [r for d in runs if (r := _row(d["e2e"]["rows"], model, "decode", mode, batch)) and "median_ms" in r]
    if not rows:
        return "not run"
    tps = statistics.median(r["tokens_per_s"] for r in rows)
    speedups = sorted(r.get("speedup", 1.0) for r in rows)
    spread = f"; {speedups[0]:.2f}-{speedups[-1]:.2f}" if len(rows) > 1 and model != "dense" else ""
    return f"{tps:,.0f} (**{statistics.median(speedups):.2f}x**{spread}; {len(rows)} run{'s' if len(rows) > 1 else ''})"


def e2e_table(d, decode_runs=None):
    """Train and prefill rows from ``d``; decode rows from ``decode_runs`` when given (else from ``d``)."""
    e = d["e2e"]
    names = list(e["models"])
    out = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    out.append("| FFN FLOPs / dense | " + " | ".join(f"{e['models'][n]['flops_ratio']:.3f}" for n in names) + " |")
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
            if r is None or "median_ms" not in r:
                cells.append("not run" if r is None or "skipped" in r else "failed")
                continue
            v = f"{r['median_ms']:.2f}" if stage == "prefill" else f"{r['tokens_per_s']:,.0f}"
            extra = f" (GPU kernels {r['gpu_kernel_ms']:.2f} ms)" if r.get("gpu_kernel_ms") and stage == "prefill" else ""
            cells.append(f"{v} (**{r.get('speedup', 1.0):.2f}x**){extra}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
        if stage == "train":
            mem = []
            for n in names:
                r = _row(e["rows"], n, stage, mode)
                mem.append(f"{r['peak_mem_gib']:.2f} ({r.get('peak_mem_ratio', 1.0):.2f}x)" if r and "peak_mem_gib" in r else "-")
            out.append(f"| peak GPU memory GiB, training {mode} | " + " | ".join(mem) + " |")
    return "\n".join(out)


def cpu_table(d):
    rows = [r for r in d["ffn"] if "fwd_bwd" in r]
    dense = next(r for r in rows if r["kind"] == "dense")
    out = [f"dense MLP: forward {dense['fwd']['median_ms']:.1f} ms, forward+backward {dense['fwd_bwd']['median_ms']:.1f} ms "
           f"({dense['tokens']} tokens)", "", "| FFN | FLOPs / dense | fwd time / dense | f+b time / dense | f+b time / FLOPs ratio |",
           "|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "dense":
            out.append(f"| {r['kind']} @{r['target']} | {r['flops_ratio']:.3f} | {r['fwd_time_ratio']:.2f} | "
                       f"{r['fwd_bwd_time_ratio']:.2f} | {r['fwd_bwd_time_over_flops']:.2f} |")
    return "\n".join(out)


def flops_table(d):
    out = ["| component | analytic | FlopCounterMode |", "|---|---|---|"]
    for name, v in d["flop_agreement"].items():
        out.append(f"| {name} | {v['analytic']:,} | {v['flop_counter']:,} |")
    return "\n".join(out)


if __name__ == "__main__":
    quality = load("quality.json")
    curve = load("reference_training_curve.json")
    ffn, e2e, cpu = load("speed_ffn_h200.json"), load("speed_e2e_h200.json"), load("speed_cpu.json")
    print("## quality\n" + quality_tables(quality))
    print("\n## FLOPs agreement\n" + flops_table(quality))
    print("\n## FFN (H200)\n" + ffn_table(ffn))
    print("\n## end to end (H200); decode: isolated runs\n" + e2e_table(e2e, [load(name) for name in DECODE_RUNS]))
    print("\n## end to end (H200), repeat run\n" + e2e_table(load("speed_e2e_h200_run2.json")))
    print("\n## FFN (CPU)\n" + cpu_table(cpu))
    quality_plot(quality, os.path.join(DOCS, "quality_vs_flops.png"))
    curve_plot(curve, os.path.join(DOCS, "reference_training_curve.png"))
    ffn_plot(ffn, os.path.join(DOCS, "ffn_speed_vs_width.png"))

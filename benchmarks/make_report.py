"""Tables and plots for docs/benchmarks.md from the raw JSON in docs/benchmarks/results/.

    python benchmarks/make_report.py        # prints markdown tables, writes docs/benchmarks/*.png
"""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks", "results")
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks")
LABELS = {"sparse_gpt2": "sparse-gpt2 (this project)", "prune": "neuron pruning", "prune_ls": "pruning + LS refit of c_proj",
          "svd": "SVD low rank", "random_sparse": "sparse arch., random init"}
COLORS = dict(zip(LABELS, ["C0", "C1", "C2", "C3", "C4"]))


def quality_table(path):
    d = json.load(open(path))
    dense = d["dense"]["perplexity"]
    lines = [f"dense reference: perplexity **{dense:.3f}** ({d['windowing']})", "",
             "| FFN FLOPs (target) | method | FFN FLOPs (achieved) | ppl calibration-only | / dense | ppl healed | / dense |",
             "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        if "error" in r:
            lines.append(f"| {r['ffn_flops_ratio_target']} | {LABELS[r['method']]} | failed: `{r['error'][:80]}` | | | | |")
            continue
        lines.append(f"| {r['ffn_flops_ratio_target']} | {LABELS[r['method']]} | {r['ffn_flops_ratio']:.3f} | {r['ppl_calibration_only']:.3f} | "
                     f"{r['ppl_calibration_only'] / dense:.3f} | {r['ppl_healed']:.3f} | {r['ppl_healed'] / dense:.3f} |")
    return "\n".join(lines), d


def quality_plot(runs, out):
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2))
    for ax, (title, d) in zip(axes if len(runs) > 1 else [axes], runs):
        dense = d["dense"]["perplexity"]
        for method in LABELS:
            rows = sorted([r for r in d["rows"] if r["method"] == method and "error" not in r], key=lambda r: r["ffn_flops_ratio"])
            if not rows:
                continue
            xs = [r["ffn_flops_ratio"] for r in rows]
            ys = [r["ppl_calibration_only"] / dense for r in rows]
            ax.plot(xs, ys, "o-", color=COLORS[method], label=f"{LABELS[method]} (calibration)")
            ax.plot(xs, [r["ppl_healed"] / dense for r in rows], "s--", color=COLORS[method], alpha=0.6, label=f"{LABELS[method]} (healed)")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylim(0.95, 2.0)
        ax.set_xlabel("FFN FLOPs / dense MLP")
        ax.set_ylabel("perplexity / dense")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def speed_plot(diag_rows, out):
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r[0] for r in diag_rows]
    ax.barh(names, [r[2] for r in diag_rows], label="forward + backward")
    ax.barh(names, [r[1] for r in diag_rows], label="forward")
    ax.set_xlabel("ms (H200, bf16, 8x1024 tokens, d=768, compiled)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    t1, d1 = quality_table(os.path.join(RESULTS, "quality.json"))
    t2, d2 = quality_table(os.path.join(RESULTS, "quality_run2.json"))
    print("## run 1\n" + t1 + "\n\n## run 2\n" + t2)
    quality_plot([("run 1: reference ppl %.2f (54M tokens); sparse-gpt2 rows failed" % d1["dense"]["perplexity"], d1),
                  ("run 2: reference ppl %.2f (26M tokens), same-run comparison" % d2["dense"]["perplexity"], d2)],
                 os.path.join(DOCS, "quality_vs_flops.png"))
    # per-component FFN timings (ms) from the H200 diagnostics run (ffn_diagnostics_h200_log.txt)
    speed_plot([("dense 3072", 0.214, 0.935), ("ideal narrow dense 1216", 0.165, 1.313), ("polynomial only", 0.238, 1.692), ("poly + spectral + feedback", 0.300, 1.781),
                ("poly + micro", 0.457, 2.442), ("poly + tensor", 0.640, 2.544), ("all five", 0.661, 2.889)],
               os.path.join(DOCS, "ffn_time_by_component.png"))

"""Healing curve: validation perplexity against distillation tokens, per method, at FFN FLOPs 0.4 and 0.2.

One command, repeated until it prints "all rows done" (each call stops by --budget_s and resumes
from the state in --out_dir: finished rows in healing_curve.json, per-row checkpoints in runs/):

    python benchmarks/bench_healing_curve.py --train_tokens tokens/gpt2/train.npy \\
        --validation_tokens tokens/gpt2/validation.npy --tokenizer_name_or_path path/to/gpt2-tokenizer \\
        --dense_model /tmp/ref512 --out_dir runs/healing_curve --budget_s 500

Without --dense_model the reference is trained first by ``train_dense_reference`` with the recipe of
docs/benchmarks.md §1 (saved in --work_dir, reused by later calls; a later device sitting retrains it,
and each call refuses a reference whose perplexity differs from the stored rows' by more than
REFERENCE_TOLERANCE). Rows (issue 12): at 0.4 the default conversion (polynomial only), the former
default (polynomial + spectral + feedback), all five components, importance pruning + LS refit (a
GPT-2 with a narrower GELU MLP), the same narrow MLP with the conversion's OBS selection + refit,
the narrow GPT-2 trained from scratch on the same tokens, and the ablations of the default
(per-neuron Chebyshev coefficients, degree 16, the fitted domain rule, sensitivity layer budgets,
intermediate hidden-state loss, and the fitted domain with per-neuron coefficients); at 0.2 the
default and pruning + LS.

Every row: the same DistillationTrainer, objective (0.7 T^2 KL at T = 2 + 0.3 CE, teacher = the
dense reference), batch, token windows (one seeded draw for all rows) and learning-rate rule, one
run evaluated at each of --tokens (perplexity: whole validation split, non-overlapping windows of
n_positions). Schedule: linear warm-up over --warmup_tokens, then constant (--schedule constant).
Constant, because one run evaluated along the way then shows at every point the model a user who
stopped there would have (before any cool-down), every method is at the same learning rate at the
same token count, and the curve extends past its last point on a later call without changing the
earlier ones. ``--schedule cosine`` decays over the last point instead (the earlier points are then
at a higher learning rate than a run of that length would use). The from-scratch row uses
--scratch_lr (the reference's own pre-training rate; 2e-4 is a fine-tuning rate) and the same rule.

``--measure_loss`` instead measures healing tokens/s and peak memory per loss implementation (plain
full logits against the fused ones) at the GPT-2 small shape and the 512-wide reference shape.
``--smoke``: a tiny random model and token stream on the CPU (seconds).

Rows can heal in parallel, one process per GPU (or several on one GPU: at the reference's size one
row does not fill an H200), each with its own --out_dir started from a copy of the curve's JSON and
its own --methods; ``--merge DIR,DIR`` then takes into --out_dir, per row, the most advanced version
found (done before running, then the furthest milestone), refusing folders healed from another
reference. ``--processes_per_gpu N`` records in the rows it runs that their tokens/s was a share.
"""

import argparse
import gc
import json
import os
import platform
import sys
import time
import uuid

import numpy as np
import torch
import transformers
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from modeling_sparse_gpt2 import COMPONENTS
from modeling_sparse_gpt2.tooling import baselines
from modeling_sparse_gpt2.tooling.conversion import ConversionArguments, convert_gpt2_to_sparse
from modeling_sparse_gpt2.tooling.distillation import DistillationArguments, DistillationTrainer, liger_available
from modeling_sparse_gpt2.tooling.evaluation import perplexity
from modeling_sparse_gpt2.tooling.pretraining import PretrainArguments, train_dense_reference

# (ratio, method) in the order they run; --ratios and --methods filter it. Each sparse-gpt2 row names what
# it is built with, so a row means the same whatever the package's default is when it runs:
# "sparse_gpt2_fit_domain" is the conversion's default (polynomial only, each layer's domain where the
# series fits GELU best: §2.3 of docs/benchmarks.md); "sparse_gpt2_poly" the default before it (the
# quantile domain), "sparse_gpt2_psf" the one before that (polynomial + spectral + feedback). The
# ablations (per-neuron coefficients, degree 16, sensitivity budgets, hidden-state loss) each change one
# thing of sparse_gpt2_poly, the default when they were added; sparse_gpt2_fit_per_neuron is the default
# with per-neuron coefficients.
PLAN = [(0.4, m) for m in ("sparse_gpt2_fit_domain", "sparse_gpt2_poly", "sparse_gpt2_psf", "sparse_gpt2_all", "prune_ls",
                           "prune_obs_ls", "scratch", "sparse_gpt2_per_neuron", "sparse_gpt2_deg16", "sparse_gpt2_sensitivity",
                           "sparse_gpt2_hidden", "sparse_gpt2_fit_per_neuron")]
PLAN += [(0.2, "sparse_gpt2_fit_domain"), (0.2, "sparse_gpt2_poly"), (0.2, "prune_ls")]
METHODS = sorted({m for _, m in PLAN})
Y_TOP = 1.6  # the plot's top (ppl / dense): rows above it are named in the legend
DEFAULT_METHOD = "sparse_gpt2_fit_domain"  # the row built as the conversion's default
RENAMED = {"sparse_gpt2": "sparse_gpt2_psf"}  # rows stored before the default changed: what they were built as
REFERENCE_TOLERANCE = 0.005  # a later call's reference may differ from the stored rows' by this much (relative ppl)


# --- small local helpers (benchmarks/harness.py will hold the shared ones) ---------------------------------------

def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "machine": platform.node(), "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "liger_kernel": _version("liger_kernel"), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
    }


def _version(package):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return None


def write_json(path: str, obj) -> None:
    """Write-then-rename, so a call killed mid-write leaves the previous file whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# --- data -------------------------------------------------------------------------------------------------------

class TokenWindows(Dataset):
    """Causal-LM examples: windows of ``block`` tokens at fixed seeded starts in a token stream."""

    def __init__(self, tokens: torch.Tensor, block: int, n: int, seed: int):
        self.tokens, self.block = tokens, block
        self.starts = torch.randint(0, len(tokens) - block, (n,), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        ids = self.tokens[self.starts[i] : self.starts[i] + self.block]
        return {"input_ids": ids, "labels": ids}


def load_tokens(path: str) -> torch.Tensor:
    if not os.path.isfile(path):
        raise SystemExit(f"--train_tokens/--validation_tokens: file not found: {path}")
    return torch.from_numpy(np.load(path).astype(np.int64))


def parse_tokens(text: str) -> list[int]:
    """'1M,4M,16M,32M' or '1e6,4000000' -> token counts."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(part[-1], 1)
        try:
            out.append(int(float(part[:-1] if scale != 1 else part) * scale))
        except ValueError:
            raise SystemExit(f"--tokens: cannot read {part!r} (use e.g. 1M,4M,16M,32M)") from None
    if not out or min(out) <= 0:
        raise SystemExit("--tokens: give positive token counts, e.g. 1M,4M,16M,32M")
    return sorted(out)


# --- methods ----------------------------------------------------------------------------------------------------

def build(method: str, ratio: float, dense, calib, seed: int):
    """The model a row starts from (before any healing) and a note on how it was built."""
    torch.manual_seed(seed)
    if method.startswith("sparse_gpt2"):
        # polynomial only with the quantile domain (sparse_gpt2_poly); every other row changes one or two
        # things of it, named here
        conv = ConversionArguments(ffn_flops_ratio=ratio, sparse_components=["polynomial"], poly_domain_rule="quantile")
        if method == "sparse_gpt2_psf":
            conv.sparse_components = ["polynomial", "spectral", "feedback"]
        elif method == "sparse_gpt2_all":
            conv.sparse_components = list(COMPONENTS)
        elif method == "sparse_gpt2_sensitivity":
            conv.budget_mode = "sensitivity"
        elif method == "sparse_gpt2_per_neuron":
            conv.poly_coefficients = "per_neuron"
        elif method == "sparse_gpt2_fit_domain":  # the default: each layer's domain where the series fits GELU best
            conv.poly_domain_rule = "fit"
        elif method == "sparse_gpt2_fit_per_neuron":  # starts as GELU to 0.2-0.3%, then learns an activation per neuron
            conv.poly_domain_rule, conv.poly_coefficients = "fit", "per_neuron"
        elif method == "sparse_gpt2_deg16":  # GELU is T_1 plus even terms: 9 non-zero up to degree 16
            conv.poly_degree, conv.poly_num_terms = 16, 9
        model, _ = convert_gpt2_to_sparse(dense, calib, conv)  # sparse_gpt2_hidden: the default; its loss differs
        return model, {"components": list(conv.sparse_components), "budget_mode": conv.budget_mode,
                       "poly_degree": conv.poly_degree, "poly_coefficients": conv.poly_coefficients,
                       "poly_domain_rule": conv.poly_domain_rule,
                       "poly_domain": model.config.poly_domain}  # per layer, fitted to the calibration pre-activations
    if method == "prune_ls":
        return baselines.prune_neurons(dense, calib, ratio, refit=True), {"selection": "importance"}
    if method == "prune_obs_ls":
        return baselines.prune_neurons(dense, calib, ratio, refit=True, selection="obs"), {"selection": "obs"}
    if method == "scratch":
        f = dense.config.n_inner or 4 * dense.config.n_embd
        config = GPT2Config(**{**dense.config.to_dict(), "n_inner": max(1, int(ratio * f))})
        return GPT2LMHeadModel(config).to(dense.device), {"init": "random (GPT-2 init)"}
    raise SystemExit(f"--methods: unknown method {method!r} (known: {', '.join(METHODS)})")


# --- one row: build or resume, heal with evaluations at the milestones ------------------------------------------

class MilestoneCallback(TrainerCallback):
    """At each milestone step: evaluate, record, save JSON, ask for a checkpoint; past the deadline: save and stop."""

    def __init__(self, row, milestones: dict, evaluate, save_json, deadline: float, tokens_per_step: int):
        self.row, self.milestones, self.evaluate, self.save_json = row, milestones, evaluate, save_json
        self.deadline, self.tokens_per_step = deadline, tokens_per_step

    def _sync_now(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        # train_s: wall time of the training steps only (evaluations and checkpoint writes left out)
        self.train_s_before, self.t_begin, self.excluded_s = self.row.get("train_s", 0.0), self._sync_now(), 0.0
        self.start_step = state.global_step  # restored from the checkpoint when resuming

    def _train_s(self):
        return round(self.train_s_before + self._sync_now() - self.t_begin - self.excluded_s, 2)

    def on_save(self, args, state, control, **kwargs):
        self.excluded_s += time.time() - self.t_save

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step in self.milestones:
            train_s = self._train_s()
            t = time.time()
            ppl = self.evaluate(model)
            self.excluded_s += time.time() - t
            self.row["curve"] = [p for p in self.row["curve"] if p["step"] != step] + [{
                "tokens": step * self.tokens_per_step, "step": step, "ppl": ppl, "train_s": train_s,
            }]
            self.row["train_s"] = train_s
            self.save_json()
            control.should_save = True
        if time.time() > self.deadline and not control.should_training_stop:
            self.row["train_s"] = self._train_s()
            control.should_save = control.should_training_stop = True
            self.row["stopped_at_step"] = step
        self.t_save = time.time()
        return control


def run_row(row, dense, dense_ppl, calib, train_windows, evaluate, args, save_json, deadline) -> bool:
    """Advance one row as far as the deadline allows; True when it reached its last milestone."""
    run_dir = os.path.join(args.out_dir, "runs", row["key"])
    initial = os.path.join(run_dir, "initial")
    if not os.path.isfile(os.path.join(initial, "config.json")):
        # built (again: a later sitting has not this one's checkpoints) from this call's reference; a run
        # abandoned with its checkpoints leaves nothing in the row (its train_s would add to this run's)
        restarts = row.get("restarts", 0) + bool(row.get("curve"))
        for k in [k for k in row if k not in ("key", "ratio", "method")]:
            del row[k]
        if restarts:
            row["restarts"] = restarts
        row["dense_ppl"] = dense_ppl
        t = time.time()
        model, row["build"] = build(row["method"], row["ratio"], dense, calib, args.seed)
        row["build_s"] = round(time.time() - t, 1)
        row["ffn_flops_ratio"] = baselines.ffn_flops_ratio_of(model, dense.config.n_inner or 4 * dense.config.n_embd)
        row["params_ffn"] = sum(p.numel() for b in model.transformer.h for p in b.mlp.parameters())
        row["curve"] = [{"tokens": 0, "step": 0, "ppl": evaluate(model), "train_s": 0.0}]
        model.save_pretrained(initial)
        save_json()
        del model
    model = AutoModelForCausalLM.from_pretrained(initial, dtype=torch.float32).to(dense.device).train()
    tokens_per_step = args.batch * train_windows.block
    milestones = {max(1, round(n / tokens_per_step)): n for n in args.tokens}
    max_steps = max(milestones)
    row["lr"] = args.scratch_lr if row["method"] == "scratch" else args.lr
    row["alpha_hidden"] = args.ablation_alpha_hidden if row["method"] == "sparse_gpt2_hidden" else 0.0
    training_args = TrainingArguments(
        output_dir=os.path.join(run_dir, "trainer"), max_steps=max_steps, per_device_train_batch_size=args.batch,
        learning_rate=row["lr"], lr_scheduler_type="constant_with_warmup" if args.schedule == "constant" else "cosine",
        warmup_steps=max(1, round(args.warmup_tokens / tokens_per_step)), weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=max(1, max_steps // 20), save_strategy="no", save_total_limit=1, report_to=[],
        bf16=torch.cuda.is_available(), seed=args.seed, data_seed=args.seed, disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
    )
    distill = DistillationArguments(loss_impl=args.loss_impl, alpha_hidden=row["alpha_hidden"])
    trainer = DistillationTrainer(model=model, args=training_args, train_dataset=train_windows, teacher_model=dense,
                                  distillation_args=distill)
    callback = MilestoneCallback(row, milestones, evaluate, save_json, deadline, tokens_per_step)
    trainer.add_callback(callback)
    row.update(status="running", loss_impl=trainer.loss_impl)
    if args.processes_per_gpu > 1:  # its tokens/s is then a share of the GPU, not a speed figure
        row["processes_per_gpu"] = args.processes_per_gpu
    resume = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    trainer.train(resume_from_checkpoint=resume)
    row.setdefault("segments", []).append([callback.start_step, trainer.state.global_step])  # steps run by each call
    finished = trainer.state.global_step >= max_steps
    if finished:
        row["status"] = "done"
        row.pop("stopped_at_step", None)
        row.pop("note", None)  # an error of an earlier try, retried from its checkpoints
        points = [p for p in row["curve"] if p["step"] > 0]
        if points:
            row["tokens_per_s"] = round(points[-1]["tokens"] / max(points[-1]["train_s"], 1e-9))
    save_json()
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    dense.eval()
    return finished


# --- reference, report ------------------------------------------------------------------------------------------

def dense_reference(args, result, device):
    if args.smoke:
        torch.manual_seed(args.seed)
        config = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config).to(device).eval()
    if args.dense_model is None:
        curve_file = os.path.join(args.work_dir, "training_curve.json")
        if not os.path.isfile(curve_file):
            print(f"training the dense reference into {args.work_dir} (docs/benchmarks.md §1)", flush=True)
            # §1's recipe with its schedule length fixed (5,933 steps there, fitted to 6 minutes) and run to
            # its end (no early stop: a rerun stopped by patience at step 5,600), so a later session retrains
            # the same reference whatever its step time; --reference_minutes only guards
            train_dense_reference(PretrainArguments(
                output_dir=args.work_dir, train_tokens=args.train_tokens, validation_tokens=args.validation_tokens,
                tokenizer_name_or_path=args.tokenizer_name_or_path, max_steps=args.reference_steps,
                fit_schedule_to_time=False, max_minutes=args.reference_minutes, patience=args.reference_steps, compile=True,
            ))
        with open(curve_file) as f:
            result["reference_training"] = {k: v for k, v in json.load(f).items() if k != "curve"}
        args.dense_model = args.work_dir
    if not os.path.isfile(os.path.join(args.dense_model, "config.json")):
        raise SystemExit(f"--dense_model: no config.json in {args.dense_model}")
    return AutoModelForCausalLM.from_pretrained(args.dense_model, dtype=torch.float32).to(device).eval()


def write_report(result, out_dir):
    """healing_curve.md (ppl / dense at each token count) and, with matplotlib, healing_curve.png."""
    dense = result["dense"]["perplexity"]
    steps = sorted({p["tokens"] for r in result["rows"] for p in r.get("curve", [])})
    lines = ["| FFN FLOPs | method | status | " + " | ".join(f"{t / 1e6:g} M" if t >= 1e5 else f"{t}" for t in steps) + " |",
             "|---|---|---|" + "---|" * len(steps)]
    for r in result["rows"]:
        by_tokens, ref = {p["tokens"]: p["ppl"] for p in r.get("curve", [])}, r.get("dense_ppl", dense)
        cells = [f"{by_tokens[t]:.3f} ({by_tokens[t] / ref:.3f}x)" if t in by_tokens else "" for t in steps]
        name = r["method"] + (" (default)" if r["method"] == DEFAULT_METHOD else "")
        lines.append(f"| {r['ratio']} | {name} | {r['status']} | " + " | ".join(cells) + " |")
    with open(os.path.join(out_dir, "healing_curve.md"), "w") as f:
        f.write(f"Dense reference perplexity {dense:.3f}; cells: perplexity (/ the dense reference the row healed from) "
                "after that many healing tokens.\n\n")
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ratios = sorted({r["ratio"] for r in result["rows"]}, reverse=True)
    fig, axes = plt.subplots(1, len(ratios), figsize=(6 * len(ratios), 4.5), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        others = 0  # rows drawn in the colour cycle so far (the default is drawn in black)
        for r in result["rows"]:
            points = [p for p in r.get("curve", []) if p["tokens"] > 0]
            if r["ratio"] == ratio and points:
                default = r["method"] == DEFAULT_METHOD
                i, others = others, others + (not default)
                ref = r.get("dense_ppl", dense)
                shown = [p for p in points if p["ppl"] / ref <= Y_TOP]  # a from-scratch row starts far above the rest
                label = r["method"] + (" (default)" if default else "") + ("" if len(shown) == len(points) else
                                       f" (off the scale before {shown[0]['tokens'] / 1e6:.3g} M)" if shown else
                                       f" (off the scale: {points[-1]['ppl'] / ref:.3g}x at {points[-1]['tokens'] / 1e6:.3g} M)")
                style = dict(color="k", lw=2.2, zorder=3) if default else dict(ls="-" if i < 10 else ":")  # 10 colours, then dotted
                ax.plot([p["tokens"] for p in shown], [p["ppl"] / ref for p in shown], marker="o", label=label, **style)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_ylim(top=Y_TOP)
        ax.set(xscale="log", xlabel="healing tokens", ylabel="validation ppl / dense", title=f"FFN FLOPs {ratio}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "healing_curve.png"), dpi=120)
    plt.close(fig)


def reference_drift(ppl: float, result: dict) -> float | None:
    """How far (relative) a reference's perplexity is from the one ``result``'s rows healed from, when
    beyond REFERENCE_TOLERANCE (None within it)."""
    drift = ppl / result["dense"]["perplexity"] - 1
    return drift if abs(drift) > REFERENCE_TOLERANCE else None


def progress(row) -> tuple:
    """How far a row got: finished first, then its furthest milestone, then the number of calls that ran it."""
    return (row.get("status") == "done", max((p["step"] for p in row.get("curve", [])), default=-1), len(row.get("segments", [])))


def reference_identity(reference: dict):
    """What tells two records of a reference evaluation apart: the id each call draws (two parallel calls can evaluate
    the same retrained reference within one second, so date and perplexity alone do not); records written
    before ids were drawn have only those."""
    return reference.get("id") or (reference["date"], reference["perplexity"])


def merge(out_dir: str, dirs: list) -> dict:
    """Rows healed in other folders (parallel processes) into out_dir's curve: per key the most advanced row."""
    path = os.path.join(out_dir, "healing_curve.json")
    if not os.path.isfile(path):
        raise SystemExit(f"--out_dir: no healing_curve.json in {out_dir} to merge into")
    with open(path) as f:
        result = json.load(f)
    rows = {r["key"]: r for r in result["rows"]}
    for d in dirs:
        other_path = os.path.join(d, "healing_curve.json")
        if not os.path.isfile(other_path):
            raise SystemExit(f"--merge: no healing_curve.json in {d}")
        with open(other_path) as f:
            other = json.load(f)
        drift = reference_drift(other["dense"]["perplexity"], result)
        if drift is not None:
            raise SystemExit(f"--merge: {other_path} healed from a reference {100 * drift:+.2f}% away from {path}'s")
        for row in other["rows"]:
            if row["key"] not in rows or progress(row) > progress(rows[row["key"]]):
                rows[row["key"]] = row
        seen = {reference_identity(r) for r in result.get("references", [])}
        result.setdefault("references", []).extend(r for r in other.get("references", []) if reference_identity(r) not in seen)
    order = {f"{m}@{r}": i for i, (r, m) in enumerate(PLAN)}
    result["rows"] = sorted(rows.values(), key=lambda r: order.get(r["key"], len(order)))
    result.setdefault("merged_from", []).extend(os.path.abspath(d) for d in dirs)
    write_json(path, result)
    write_report(result, out_dir)
    return result


# --- healing tokens/s and peak memory per loss implementation ----------------------------------------------------

SHAPES = {"gpt2": dict(n_embd=768, n_layer=12, n_head=12), "ref512": dict(n_embd=512, n_layer=8, n_head=8)}


class StepTimer(TrainerCallback):
    def __init__(self, warmup_steps):
        self.warmup_steps, self.t0, self.t1 = warmup_steps, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.warmup_steps, state.max_steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step == self.warmup_steps:
                self.t0 = time.perf_counter()
            else:
                self.t1 = time.perf_counter()


def measure_loss(args, device):
    """Tokens/s and peak memory of healing steps, the student converted at FFN FLOPs 0.4 (random weights)."""
    impls = ["plain", "chunked"] + (["liger"] if device.type == "cuda" and liger_available() else [])
    shapes = {"tiny": dict(n_embd=32, n_layer=2, n_head=2)} if args.smoke else SHAPES
    vocab, block = (128, 32) if args.smoke else (50257, 512)
    steps = (1, 3) if args.smoke else (args.measure_warmup_steps, args.measure_warmup_steps + args.measure_steps)
    result = {"environment": environment(), "batch": args.batch, "block": block, "vocab": vocab,
              "warmup_steps": steps[0], "timed_steps": steps[1] - steps[0], "rows": []}
    path = os.path.join(args.out_dir, "loss_speed.json")
    for shape, dims in shapes.items():
        torch.manual_seed(args.seed)
        dense = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=block, bos_token_id=0, eos_token_id=0, **dims)).to(device).eval()
        stream = torch.randint(0, vocab, (args.batch * block * 4,))
        windows = TokenWindows(stream, block, args.batch * steps[1], args.seed)
        for impl in impls:
            student = baselines.random_sparse(dense, 0.4).float().train()
            training_args = TrainingArguments(
                output_dir=os.path.join(args.out_dir, "measure_tmp"), max_steps=steps[1], per_device_train_batch_size=args.batch,
                learning_rate=args.lr, save_strategy="no", report_to=[], bf16=device.type == "cuda", disable_tqdm=True,
                dataloader_num_workers=0, use_cpu=device.type != "cuda", logging_steps=steps[1],
            )
            trainer = DistillationTrainer(model=student, args=training_args, train_dataset=windows, teacher_model=dense,
                                          distillation_args=DistillationArguments(loss_impl=impl))
            timer = StepTimer(steps[0])
            trainer.add_callback(timer)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            trainer.train()
            row = {"shape": shape, **dims, "loss_impl": impl,
                   "tokens_per_s": round(args.batch * block * (steps[1] - steps[0]) / (timer.t1 - timer.t0), 1),
                   "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None}
            plain = next((r for r in result["rows"] if r["shape"] == shape and r["loss_impl"] == "plain"), None)
            if plain is not None and impl != "plain":
                row["speedup_vs_plain"] = round(row["tokens_per_s"] / plain["tokens_per_s"], 3)
                if row["peak_memory_gib"] is not None:
                    row["memory_vs_plain"] = round(row["peak_memory_gib"] / plain["peak_memory_gib"], 3)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            write_json(path, result)
            del trainer, student
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


# --- main -------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train_tokens")
    p.add_argument("--validation_tokens")
    p.add_argument("--tokenizer_name_or_path", help="needed only to train the reference")
    p.add_argument("--dense_model", default=None, help="the dense reference (a GPT-2 folder); default: --work_dir, trained if absent")
    p.add_argument("--work_dir", default="/tmp/ref512")
    p.add_argument("--reference_steps", type=int, default=5933, help="schedule length when training the reference")
    p.add_argument("--reference_minutes", type=float, default=9.0, help="time guard when training the reference")
    p.add_argument("--out_dir", default="runs/healing_curve", help="state: healing_curve.json, runs/<row>/ checkpoints, table, plot")
    p.add_argument("--tokens", default="1M,4M,16M,32M", help="healing token counts to evaluate at (0 is always evaluated)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ratios", default="0.4,0.2")
    p.add_argument("--budget_s", "--budget-s", type=float, default=500.0, help="stop (with a checkpoint) after this many seconds")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--scratch_lr", type=float, default=1e-3)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--warmup_tokens", type=float, default=5e5)
    p.add_argument("--ablation_alpha_hidden", type=float, default=1.0, help="alpha_hidden of the sparse_gpt2_hidden row")
    p.add_argument("--loss_impl", default="auto", choices=("auto", "liger", "chunked", "plain"))
    p.add_argument("--calibration_samples", type=int, default=128)
    p.add_argument("--max_eval_tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure_loss", "--measure-loss", action="store_true", help="tokens/s and peak memory per loss_impl instead")
    p.add_argument("--measure_warmup_steps", type=int, default=5)
    p.add_argument("--measure_steps", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny random model and tokens on the CPU")
    p.add_argument("--merge", default=None, help="comma list of other --out_dir folders whose rows to take into --out_dir")
    p.add_argument("--processes_per_gpu", type=int, default=1, help="other curve processes sharing this GPU (recorded in the rows)")
    args = p.parse_args(argv)
    if args.smoke and args.tokens == p.get_default("tokens"):
        args.tokens = "64,128,256"
    if args.smoke and args.batch == p.get_default("batch"):
        args.batch = 2
    if args.smoke:
        args.calibration_samples = min(args.calibration_samples, 10)  # the conversion's floor at the tiny shape
        args.warmup_tokens = min(args.warmup_tokens, 64)
    args.tokens = parse_tokens(args.tokens)
    unknown = set(filter(None, args.methods.split(","))) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)} (known: {', '.join(METHODS)})")
    if args.processes_per_gpu < 1:
        p.error("--processes_per_gpu: give 1 or more")
    if not args.smoke and not args.measure_loss and not args.merge and not (args.train_tokens and args.validation_tokens):
        p.error("--train_tokens and --validation_tokens are needed (or --smoke)")
    return args


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.budget_s
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.merge:
        return merge(args.out_dir, [d for d in args.merge.split(",") if d])
    os.makedirs(args.out_dir, exist_ok=True)
    if args.measure_loss:
        return measure_loss(args, device)
    path = os.path.join(args.out_dir, "healing_curve.json")
    result = {"settings": {k: v for k, v in vars(args).items()}, "rows": []}
    if os.path.isfile(path):
        with open(path) as f:
            result = json.load(f)
    result["environment"] = environment()  # the latest call's
    result["settings"] = {k: v for k, v in vars(args).items()}
    dense = dense_reference(args, result, device)
    if args.smoke:
        g = torch.Generator().manual_seed(args.seed)
        train, val = torch.randint(0, 128, (20_000,), generator=g), torch.randint(0, 128, (2_000,), generator=g)
    else:
        train, val = load_tokens(args.train_tokens), load_tokens(args.validation_tokens)
    if args.max_eval_tokens:
        val = val[: args.max_eval_tokens]
    block = dense.config.n_positions

    def evaluate(model):
        return perplexity(model, val, block, batch_size=16)["perplexity"]

    def save_json():
        write_json(path, result)

    # the reference of this call: a later session retrains it with the same recipe (its weights cannot be
    # kept between device sittings), so every call checks it against the one the stored rows healed from
    dense_ppl = evaluate(dense)
    result.setdefault("references", []).append({"id": uuid.uuid4().hex, "date": environment()["date"], "perplexity": dense_ppl,
                                                 "training": result.get("reference_training")})
    if "dense" not in result:
        result["dense"] = {"perplexity": dense_ppl, "model": args.dense_model or "smoke"}
    drift = reference_drift(dense_ppl, result)
    if drift is not None:
        raise SystemExit(f"--dense_model/--work_dir: this reference's perplexity {dense_ppl:.3f} differs by {100 * drift:+.2f}% "
                         f"from the one the rows in {path} healed from ({result['dense']['perplexity']:.3f}); "
                         "use a new --out_dir for a new reference")
    result["windowing"] = f"validation split, {len(val)} tokens, non-overlapping windows of {block}"
    result["objective"] = "0.7 * T^2 KL(T=2) + 0.3 * CE (+ alpha_hidden * relative MSE of block outputs), teacher = dense"
    calib = TokenWindows(train, block, args.calibration_samples, args.seed)
    calib = torch.stack([calib[i]["input_ids"] for i in range(len(calib))])
    tokens_per_step = args.batch * block
    last_step = max(1, round(max(args.tokens) / tokens_per_step))
    train_windows = TokenWindows(train, block, args.batch * last_step, args.seed + 1)
    methods, ratios = set(args.methods.split(",")), {float(r) for r in args.ratios.split(",") if r}
    for r in result["rows"]:  # rows stored under a method name that now means something else
        if r["method"] in RENAMED:
            r["method"] = RENAMED[r["method"]]
            r["key"] = f"{r['method']}@{r['ratio']}"
    rows = {r["key"]: r for r in result["rows"]}
    advanced = False  # every call advances at least one row by one step, whatever the budget
    for ratio, method in PLAN:
        if method not in methods or ratio not in ratios:
            continue
        key = f"{method}@{ratio}"
        row = rows.setdefault(key, {"key": key, "ratio": ratio, "method": method, "status": "pending", "curve": []})
        row.setdefault("dense_ppl", dense_ppl)  # the reference this row is healed from
        if row not in result["rows"]:
            result["rows"].append(row)
        if row["status"] == "done" and max(p["step"] for p in row["curve"]) >= last_step:
            continue  # error rows are tried again: a later checkout may have the fix
        if time.time() > deadline and advanced:
            break
        try:
            advanced = True
            run_row(row, dense, dense_ppl, calib, train_windows, evaluate, args, save_json, deadline)
        except Exception as err:  # recorded; the other rows go on
            row.update(status="error", note=repr(err)[:1000])
            if args.smoke:
                raise
        print(json.dumps({k: v for k, v in row.items() if k != "build"}), flush=True)
        save_json()
    save_json()
    write_report(result, args.out_dir)
    pending = [r["key"] for r in result["rows"] if r["status"] in ("pending", "running")]
    print("all rows done" if not pending else f"budget reached, run the same command again for: {', '.join(pending)}", flush=True)
    return result


if __name__ == "__main__":
    main()

"""Healing (distillation) tokens/s: the sparse model against the pruned narrow GPT-2, same trainer.

    python -m benchmarks.bench_healing --output docs/benchmarks/results/healing_h200.json  # GPU: GPT-2 small
    python -m benchmarks.bench_healing --tiny --device cpu --output /tmp/healing.json      # smoke run, seconds

Teacher: dense GPT-2 (random weights, seed 0; the speed does not depend on them). Students at
each ``--ratios`` FFN FLOPs target: the sparse model (``harness.build_models``, the teacher's
non-MLP weights copied in) and the pruned baseline (``tooling.baselines.prune_neurons``: the
teacher with ``n_inner`` = the sparse FFN's fused width, neurons picked on random calibration
tokens, no refit). Both train under ``tooling.distillation.build_healing_trainer`` with the same
``TrainingArguments`` (``--steps`` steps of ``--batch`` x ``--block`` tokens, AdamW, bf16 on GPU).
A callback times every optimizer step (synchronised); the warm-up steps are those before the
step times settled (the harness's rule), and tokens/s = batch x block / median settled step time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import GPT2LMHeadModel, TrainerCallback, TrainingArguments

from . import harness as H

SECTION = "healing"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    H.add_common_args(p, output=f"{H.RESULTS_DIR}/healing.json")
    p.add_argument("--ratios", default=None, help="FFN FLOPs targets (default 0.4)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30; --tiny 4)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 16; --tiny 2)")
    p.add_argument("--block", type=int, default=None, help="tokens per sequence (default 1024; --tiny 16)")
    p.add_argument("--torch-compile", action="store_true", help="TrainingArguments(torch_compile=True) for both students")
    return p.parse_args(argv)


def settings(args) -> dict:
    S = H.common_settings(args, budget_s=540.0)
    S.update(model=H.TINY if args.tiny else H.GPT2_SMALL, ratios=H.csv(args.ratios, float) or [0.4],
             steps=args.steps or (4 if args.tiny else 30), batch=args.batch or (2 if args.tiny else 16),
             block=args.block or (16 if args.tiny else 1024), torch_compile=args.torch_compile,
             trainer="tooling.distillation.build_healing_trainer, DistillationArguments() defaults")
    if S["steps"] < 2:
        raise SystemExit(f"--steps must be >= 2, got {S['steps']}")
    return S


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, the device synchronised at both ends."""

    def __init__(self, S):
        self.S, self.ms, self.t0 = S, [], None

    def on_step_begin(self, args, state, control, **kwargs):
        H.sync(self.S)
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        H.sync(self.S)
        self.ms.append((time.perf_counter() - self.t0) * 1e3)


def students(teacher, target, S) -> dict:
    """The sparse student and the pruned narrow student of the same fused width."""
    from modeling_sparse_gpt2.tooling import baselines
    from modeling_sparse_gpt2.tooling.conversion import copy_shared_weights

    models, info = H.build_models(S["model"], target, S, kinds=("sparse",))
    sparse = models["sparse"]
    copy_shared_weights(teacher, sparse)
    width, f = info["sparse"]["inner"], 4 * S["model"]["n_embd"]
    g = torch.Generator().manual_seed(1)
    calibration = torch.randint(0, teacher.config.vocab_size, (4, S["block"]), generator=g).to(S["device"])
    pruned = baselines.prune_neurons(teacher, calibration, (width + 0.5) / f, refit=False)
    if pruned.config.n_inner != width:
        raise RuntimeError(f"pruned baseline has n_inner {pruned.config.n_inner}, expected {width}")
    return {"sparse": (sparse, info["sparse"]),
            "pruned": (pruned, dict(target=target, ffn_flops_ratio=width / f, inner=width, **H.param_counts(pruned)))}


def measure_healing(student, teacher, S) -> dict:
    from modeling_sparse_gpt2.tooling.distillation import DistillationArguments, build_healing_trainer

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, teacher.config.vocab_size, (S["steps"] * S["batch"], S["block"]), generator=g)
    timer = StepTimer(S)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=S["steps"], per_device_train_batch_size=S["batch"], learning_rate=1e-4,
            warmup_steps=0, weight_decay=0.0, logging_steps=S["steps"], save_strategy="no", report_to=[],
            bf16=S["gpu"] and S["dtype"] == "bf16", use_cpu=not S["gpu"], seed=0, disable_tqdm=True,
            dataloader_num_workers=0, torch_compile=S["torch_compile"],
        )
        trainer = build_healing_trainer(student.train(), teacher.eval(), blocks, None, args, DistillationArguments())
        trainer.add_callback(timer)
        trainer.train()
    n = H.settled_at(timer.ms, S["settle_tol"])
    timed = timer.ms[n:] if n is not None and n < len(timer.ms) else timer.ms[len(timer.ms) // 2 :]
    step_ms = statistics.median(timed)
    return dict(median_ms=step_ms, tokens_per_s=S["batch"] * S["block"] / step_ms * 1e3, settled=n is not None and n < len(timer.ms),
                warmup_samples=len(timer.ms) - len(timed), step_ms=[round(t, 3) for t in timer.ms],
                peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if S["gpu"] else None)


def bench(S: dict, results: H.Results, section: str = SECTION):
    rows = results.section(section, S)
    for target in S["ratios"]:
        torch.manual_seed(0)
        teacher = GPT2LMHeadModel(H.gpt2_config(S["model"])).to(S["device"]).eval()
        try:
            built = students(teacher, target, S)
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(kind="sparse", target=target, status="error", **H.error_record(exc)))
            continue
        for kind, (student, info) in built.items():
            row = dict(kind=kind, **info, steps=S["steps"], tokens_per_step=S["batch"] * S["block"])
            if S["gpu"]:
                torch.cuda.reset_peak_memory_stats()
            results.measure(rows, row, lambda s=student: measure_healing(s, teacher, S), label=f"{section} {kind}@{target}")
            H.free_memory(S)
        del built, teacher
        H.free_memory(S)
    H.add_ratios(rows, {"median_ms": lambda r: r["median_ms"]}, keys={"pruned": lambda r: r.get("target")})
    results.save()


def main(argv=None):
    return H.run_main(parse_args, settings, bench, argv, benchmark="bench_healing")


if __name__ == "__main__":
    main()

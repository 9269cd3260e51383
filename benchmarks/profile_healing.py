"""Where a healing step's time goes: ``torch.profiler`` over distillation steps of the project's trainer.

    python -m benchmarks.profile_healing --output docs/benchmarks/results/healing_profile_h200.json   # on a GPU

Shape ``--shape`` (``ref512``: the 512-wide, 8-layer reference of docs/benchmarks.md §1; ``gpt2``: GPT-2
small), vocabulary 50,257, batch ``--batch`` x ``--block`` tokens, random weights (the time does not
depend on them). Students, each distilled from the dense model of the shape by ``DistillationTrainer``
(bf16 autocast on CUDA, AdamW, the loss of ``--loss_impl``), exactly as in ``bench_healing_curve``:

* ``sparse``: the sparse model at FFN FLOPs ``--ratio`` (default components);
* ``narrow``: a plain GPT-2 whose MLP has the sparse FFN's fused width (what pruning + LS heals);
* ``dense``: the dense model itself (the trainer and loss at full MLP width).

Per student: wall time per step (CUDA-synchronised), GPU kernel time per step (the sum of the
profiled kernels; wall minus kernel time is what the host adds), that kernel time split into
GEMMs, the sparse FFN's middle-stage kernels and everything else, and the 15 costliest kernels.
``--smoke``: a tiny shape on the CPU (CPU operators instead of kernels).
"""

import argparse
import json
import os
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

from modeling_sparse_gpt2.tooling import baselines
from modeling_sparse_gpt2.tooling.distillation import DistillationArguments, DistillationTrainer

from .bench_healing_curve import TokenWindows, environment, write_json

SHAPES = {"ref512": dict(n_embd=512, n_layer=8, n_head=8), "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
          "tiny": dict(n_embd=32, n_layer=2, n_head=2)}
GEMM_MARKERS = ("gemm", "sm90", "cutlass", "nvjet", "cublas", "wgmma", "matmul")


def kernel_group(name: str) -> str:
    low = name.lower()
    if "_forward_kernel" in name or "_backward_kernel" in name:
        return "sparse middle stage"
    if any(m in low for m in GEMM_MARKERS):
        return "gemm"
    return "other"


class ProfilerStep(TrainerCallback):
    """Advance the profiler's schedule once per optimizer step; time the profiled (active) steps."""

    def __init__(self, prof, first_active: int, active: int):
        self.prof, self.first_active, self.last_active = prof, first_active, first_active + active - 1
        self.t0 = self.t1 = None

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.first_active:
            self.t0 = self._sync()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.last_active:
            self.t1 = self._sync()
        self.prof.step()


def student_for(kind: str, dense, ratio: float):
    if kind == "sparse":
        return baselines.random_sparse(dense, ratio).float()
    if kind == "narrow":  # the sparse FFN's fused width as a plain GELU MLP
        width = baselines.random_sparse(dense, ratio).transformer.h[0].mlp.c_fc.out_features
        config = GPT2Config(**{**dense.config.to_dict(), "n_inner": width})
        return GPT2LMHeadModel(config).to(dense.device)
    if kind == "dense":
        return GPT2LMHeadModel(dense.config).to(dense.device)
    raise SystemExit(f"--students: unknown student {kind!r} (known: sparse, narrow, dense)")


def profile_student(kind, dense, windows, args, device) -> dict:
    student = student_for(kind, dense, args.ratio).train()
    wait, warmup, active = 2, 2, args.steps
    training_args = TrainingArguments(
        output_dir=os.path.join(args.work_dir, kind), max_steps=wait + warmup + active, per_device_train_batch_size=args.batch,
        learning_rate=2e-4, save_strategy="no", report_to=[], bf16=device.type == "cuda", disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=device.type != "cuda", logging_steps=10**6,
    )
    trainer = DistillationTrainer(model=student, args=training_args, train_dataset=windows, teacher_model=dense,
                                  distillation_args=DistillationArguments(loss_impl=args.loss_impl))
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        timer = ProfilerStep(prof, wait + warmup + 1, active)
        trainer.add_callback(timer)
        trainer.train()
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [(e.key, e.device_time_total / 1e3 / active, e.count // active) for e in events if e.device_time_total > 0
                   and e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith("ProfilerStep")]
    else:  # CPU: self time of the operators
        kernels = [(e.key, e.self_cpu_time_total / 1e3 / active, e.count // active) for e in events if e.self_cpu_time_total > 0
                   and not e.key.startswith("ProfilerStep")]
    kernels.sort(key=lambda k: -k[1])
    groups = {}
    for name, ms, _ in kernels:
        groups[kernel_group(name)] = groups.get(kernel_group(name), 0.0) + ms
    step_ms = (timer.t1 - timer.t0) * 1e3 / active
    row = {
        "student": kind, "loss_impl": trainer.loss_impl, "step_ms": round(step_ms, 2),
        "tokens_per_s": round(args.batch * args.block / (step_ms / 1e3)),
        "kernel_ms_per_step": round(sum(groups.values()), 2), "groups_ms_per_step": {k: round(v, 2) for k, v in groups.items()},
        "top_kernels": [{"name": n[:160], "ms_per_step": round(ms, 3), "calls_per_step": c} for n, ms, c in kernels[:15]],
    }
    del trainer, student
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="ref512", choices=sorted(SHAPES))
    p.add_argument("--students", default="sparse,narrow,dense")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="profiled steps per student (after 2 skipped and 2 warm-up)")
    p.add_argument("--loss_impl", default="auto", choices=("auto", "liger", "chunked", "plain"))
    p.add_argument("--work_dir", default="/tmp/profile_healing")
    p.add_argument("--output", default=None, help="results JSON")
    p.add_argument("--smoke", action="store_true", help="the tiny shape on the CPU, 2 x 32 tokens")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    vocab = 50257
    if args.smoke:
        args.shape, args.batch, args.block, args.steps, vocab = "tiny", 2, 32, 1, 128
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=args.block, bos_token_id=0, eos_token_id=0, **SHAPES[args.shape])
    dense = GPT2LMHeadModel(config).to(device).eval()
    stream = torch.randint(0, vocab, (args.batch * args.block * 4,))
    windows = TokenWindows(stream, args.block, args.batch * (args.steps + 4), seed=0)
    result = {"environment": environment(), "settings": vars(args), "rows": []}
    for kind in filter(None, args.students.split(",")):
        row = profile_student(kind, dense, windows, args, device)
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
        for k in row["top_kernels"][:8]:
            print(f"    {k['ms_per_step']:8.3f} ms  x{k['calls_per_step']:<4d} {k['name'][:110]}", flush=True)
        if args.output:
            write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()

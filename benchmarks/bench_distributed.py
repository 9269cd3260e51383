"""Healing across GPUs with accelerate: DDP and FSDP against one GPU, the same steps and global batch.

    # on a machine with N >= 2 GPUs (GPT-2-medium shape: d=1024, 24 layers, 16 heads; bf16)
    python -m benchmarks.bench_distributed --num_gpus 2 --tokenizer_name_or_path path/to/gpt2-tokenizer \
        --output docs/benchmarks/results/distributed_h200x2.json
    # CPU smoke run of the same code path (gloo, a tiny model), about a minute
    python -m benchmarks.bench_distributed --cpu --tiny --output /tmp/distributed_cpu.json

Steps: (1) a dense GPT-2 teacher of the chosen shape (random init, seed 0: throughput and loss
parity do not need trained weights) and a sparse student at ``--ffn_flops_ratio`` built from it
(``baselines.random_sparse``: the converted architecture, the teacher's non-MLP weights); (2)
``scripts/heal_sparse_gpt2.py`` three times on the same text, steps and global batch: one process,
``accelerate launch`` DDP over N processes, and ``accelerate launch`` FSDP2 wrapping
``SparseGPT2Block``; (3) from each run's ``healing_log.json``: per-step losses, Trainer's training
time, tokens/s two ways: steady (the median of the callback's ``Throughput/tokens_per_s`` over the
logs after ``--warmup_steps``, the figure the speed-ups use) and whole-run (steps x global batch x
block / ``train_runtime``, start-up included); speed-up and scaling efficiency against one process
(strong scaling: the global batch is fixed, each device takes 1/N of it), and the largest relative
loss difference to one process.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from modeling_sparse_gpt2.tooling import baselines
from modeling_sparse_gpt2.tooling.checkpoints import DEFAULT_CALIBRATION, DEFAULT_MODEL, load_tokenizer
from modeling_sparse_gpt2.tooling.distillation import fsdp_accelerate_config

from . import harness as H

ROOT = str(H.REPO)


def build_models(args, work: str) -> dict:
    tok = load_tokenizer(args.tokenizer_name_or_path)
    shape = dict(n_embd=64, n_layer=2, n_head=4) if args.tiny else dict(n_embd=1024, n_layer=24, n_head=16)
    torch.manual_seed(0)
    dense = GPT2LMHeadModel(GPT2Config(**shape, vocab_size=len(tok), n_positions=args.block_size, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    sparse = baselines.random_sparse(dense, args.ffn_flops_ratio)
    paths = {"dense": os.path.join(work, "dense"), "sparse": os.path.join(work, "sparse")}
    for name, model in (("dense", dense), ("sparse", sparse)):
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return {"paths": paths, "shape": shape, "vocab_size": len(tok), "ffn_flops_ratio": sparse.flops_report(1, 1)["FLOPs/ffn_ratio"],
            "params": sum(p.numel() for p in sparse.parameters())}


def heal(args, models, out: str, launcher: list, per_device_batch: int) -> dict:
    cmd = launcher + [
        os.path.join(ROOT, "scripts", "heal_sparse_gpt2.py"), "--model_name_or_path", models["paths"]["sparse"],
        "--teacher_model_name_or_path", models["paths"]["dense"], "--train_file", args.train_file,
        "--block_size", str(args.block_size), "--per_device_train_batch_size", str(per_device_batch),
        "--max_steps", str(args.steps), "--learning_rate", "1e-4", "--warmup_steps", "0", "--logging_steps", "1",
        "--report_to", "none", "--save_strategy", "no", "--seed", "0", "--data_seed", "0", "--disable_tqdm", "true",
        "--dataloader_drop_last", "true", "--output_dir", out,
    ] + (["--use_cpu"] if args.cpu else ["--bf16"])
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    if args.cpu:
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.time()
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.run_timeout_s)
        returncode, error = res.returncode, res.stderr[-3000:] if res.returncode else None
    except subprocess.TimeoutExpired as err:  # its stderr comes back as bytes even in text mode
        returncode, error = None, f"timed out after {args.run_timeout_s} s; stderr tail: " + (err.stderr or b"")[-3000:].decode(errors="replace")
    run = {"command": " ".join(cmd), "returncode": returncode, "wall_s": round(time.time() - t0, 1)}
    if error is not None:
        run["error"] = error
        return run
    with open(os.path.join(out, "healing_log.json")) as f:
        log = json.load(f)
    final = next(e for e in reversed(log) if "train_runtime" in e)
    # tokens/s from the global batch: Trainer's own samples/s counts one process's samples under DDP
    windows = [(e["step"], e["Throughput/tokens_per_s"]) for e in log if "Throughput/tokens_per_s" in e]
    run.update(losses=[e["loss"] for e in log if "loss" in e], train_runtime_s=final["train_runtime"],
               tokens_per_s_whole_run=args.steps * args.global_batch * args.block_size / final["train_runtime"],
               tokens_per_s=statistics.median(rate for step, rate in windows if step > args.warmup_steps),
               tokens_per_s_windows=[round(rate) for _, rate in windows])
    return run


def compare_to_single(runs: dict, n: int):
    """Speed-up, scaling efficiency and loss parity of each multi-process run against one process."""
    single = runs.get("single", {})
    for name, run in runs.items():
        if name == "single" or "tokens_per_s" not in run or "tokens_per_s" not in single:
            continue
        run["speedup"] = run["tokens_per_s"] / single["tokens_per_s"]
        run["speedup_whole_run"] = run["tokens_per_s_whole_run"] / single["tokens_per_s_whole_run"]
        run["scaling_efficiency"] = run["speedup"] / n
        run["max_relative_loss_difference"] = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], single["losses"]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num_gpus", type=int, default=2, help="processes of the DDP and FSDP runs")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (gloo), for a smoke test")
    p.add_argument("--tiny", action="store_true", help="a tiny model instead of the GPT-2-medium shape")
    p.add_argument("--tokenizer_name_or_path", default=DEFAULT_MODEL)
    p.add_argument("--train_file", default=DEFAULT_CALIBRATION, help="text the healing runs on (it is repeated if short)")
    p.add_argument("--ffn_flops_ratio", type=float, default=0.4)
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--global_batch", type=int, default=16, help="sequences per optimizer step, in every run")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup_steps", type=int, default=5, help="steps left out of the steady tokens/s")
    p.add_argument("--run_timeout_s", type=float, default=600, help="a healing run still going after this is stopped and recorded as an error")
    p.add_argument("--work_dir", default=None)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    n = args.num_gpus
    if not 0 <= args.warmup_steps < args.steps:
        raise ValueError(f"--warmup_steps {args.warmup_steps} must be in [0, --steps {args.steps})")
    if args.global_batch % n:
        raise ValueError(f"--global_batch {args.global_batch} must be divisible by --num_gpus {n}")
    if not args.cpu and torch.cuda.device_count() < n:
        raise ValueError(f"--num_gpus {n} but this machine has {torch.cuda.device_count()} GPU(s)")
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_distributed_")
    models = build_models(args, work)
    environment = H.environment("cpu" if args.cpu else "cuda")
    H.warn_if_dirty(environment)
    result = {"environment": environment, "device": "cpu" if args.cpu else torch.cuda.get_device_name(),
              "settings": vars(args), "model": {k: v for k, v in models.items() if k != "paths"}, "runs": {}}
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    fsdp_config = os.path.join(work, "fsdp.yaml")
    with open(fsdp_config, "w") as f:
        f.write(fsdp_accelerate_config(n, use_cpu=args.cpu))
    plans = {
        "single": ([sys.executable], args.global_batch),
        f"ddp_x{n}": (launch + (["--cpu"] if args.cpu else ["--multi_gpu"]) + ["--num_processes", str(n), "--num_machines", "1",
                                                                            "--mixed_precision", "no", "--dynamo_backend", "no"], args.global_batch // n),
        f"fsdp_x{n}": (launch + ["--config_file", fsdp_config], args.global_batch // n),
    }
    for name, (launcher, batch) in plans.items():
        result["runs"][name] = heal(args, models, os.path.join(work, name), launcher, batch)
        print(name, json.dumps({k: v for k, v in result["runs"][name].items() if k not in ("command", "losses", "tokens_per_s_windows")}), flush=True)
        compare_to_single(result["runs"], n)
        H.write_json_atomic(args.output, result)  # after every run: a later run that hangs loses nothing

    def cell(run, key, fmt):  # a figure that was not measured prints as n/a, never as a default
        return format(run[key], fmt) if run.get(key) is not None else "n/a"

    for name, run in result["runs"].items():
        print(f"{name:10s} tokens/s {cell(run, 'tokens_per_s', '10.0f')} (whole run {cell(run, 'tokens_per_s_whole_run', '.0f')})  "
              f"speed-up {cell(run, 'speedup', '.2f')}  efficiency {cell(run, 'scaling_efficiency', '.2f')}  "
              f"max loss diff {cell(run, 'max_relative_loss_difference', '.2e')}"
              + (f"  ERROR {run['error'][-300:]}" if "error" in run else ""))


if __name__ == "__main__":
    main()

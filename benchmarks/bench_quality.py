"""Quality table: this project's conversion against pruning, low-rank and no-conversion baselines.

One command (H200: the reference's pre-training takes --pretrain_minutes, each row ~20 s):

    python -m benchmarks.bench_quality --train_tokens tokens/gpt2/train.npy --validation_tokens tokens/gpt2/validation.npy \
        --tokenizer_name_or_path path/to/gpt2-tokenizer --work_dir /tmp/ref512 --output docs/benchmarks/results/quality.json

Within a per-call time limit, split it: ``--deadline_minutes`` stops starting new rows, and the
same command with ``--resume`` reuses the reference saved in ``--work_dir`` and the rows already
in ``--output``.

Steps: (1) train the dense reference (GPT-2, n_embd 512, 8 layers, 512 positions, the real GPT-2
tokenizer) until validation loss stops improving or the time cap (the cosine schedule is fitted to
the time cap), unless --dense_model is given or --work_dir already holds one;
(2) for every FFN FLOPs ratio, build each method from the same calibration tokens, measure its
validation perplexity, heal it with the same distillation budget (same steps, batch, tokens, lr)
and measure again. Perplexity: exp(mean NLL) over the whole validation split in non-overlapping
windows of 512 tokens (stride 512). Results are written after every row.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from modeling_sparse_gpt2 import COMPONENTS
from modeling_sparse_gpt2.component_base import FFNContext
from modeling_sparse_gpt2.tooling import baselines
from modeling_sparse_gpt2.tooling.commands import healing_training_arguments
from modeling_sparse_gpt2.tooling.conversion import ConversionArguments, convert_gpt2_to_sparse
from modeling_sparse_gpt2.tooling.distillation import DistillationArguments, build_healing_trainer
from modeling_sparse_gpt2.tooling.evaluation import perplexity
from modeling_sparse_gpt2.modeling_sparse_gpt2 import sparse_ffns
from modeling_sparse_gpt2.tooling.pretraining import PretrainArguments, train_dense_reference

from . import harness as H


def windows(tokens, block, n, seed):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - block, (n,), generator=g)
    return torch.stack([tokens[s : s + block] for s in starts])


def heal(model, dense, train_blocks, steps, batch, lr, seed):
    """The main job's healing run (``commands.healing_training_arguments``), timed."""
    with tempfile.TemporaryDirectory() as tmp:
        args = healing_training_arguments(tmp, steps, batch, lr, seed)
        trainer = build_healing_trainer(model.float().train(), dense, train_blocks, None, args, DistillationArguments())
        t = time.time()
        trainer.train()
        return model.float().eval(), round(time.time() - t, 1)


def flop_agreement(model, seq_len):
    """Per component, analytic FLOPs of one sequence against FlopCounterMode (block 0); a GEMM
    component runs through its c_fc / c_proj slices, as ``reference_forward`` runs it."""
    ffn = sparse_ffns(model)[0]
    x = torch.randn(1, seq_len, model.config.n_embd, device=model.device)
    out = {}
    per_tok = ffn.flops_per_token()
    for name, comp in ffn.components.items():
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            if name in ffn.segments:
                h = F.linear(x, ffn.w_in(name), ffn.b_in(name))
                F.linear(comp.activate(h, FFNContext(layer_idx=0)), ffn.w_out(name))
            else:
                comp(x)
        out[name] = {"analytic": per_tok[name][0] * seq_len, "flop_counter": counter.get_total_flops()}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ffn(x)
    out["ffn_fused_total"] = {"analytic": sum(v[0] for v in per_tok.values()) * seq_len, "flop_counter": counter.get_total_flops()}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train_tokens", required=True)
    p.add_argument("--validation_tokens", required=True)
    p.add_argument("--tokenizer_name_or_path", required=True)
    p.add_argument("--dense_model", default=None, help="skip pre-training and use this dense GPT-2")
    p.add_argument("--work_dir", default="/tmp/ref512")
    p.add_argument("--output", default="docs/benchmarks/results/quality.json")
    p.add_argument("--ratios", default="0.5,0.4,0.3,0.2")
    p.add_argument("--methods", default="sparse_gpt2,prune_ls,svd,prune,random_sparse",
                   help="sparse_gpt2: the conversion's default components (CONVERSION_DEFAULTS; each row records them)")
    p.add_argument("--extra_methods", default="sparse_gpt2_all,sparse_gpt2_poly",
                   help="run after every ratio's --methods rows: sparse_gpt2_all (all five components), "
                        "sparse_gpt2_poly (polynomial only)")
    p.add_argument("--extra_ratios", default="0.4,0.2", help="FFN FLOPs ratios of the --extra_methods rows")
    p.add_argument("--calibration_samples", type=int, default=128)
    p.add_argument("--heal_steps", type=int, default=200)
    p.add_argument("--heal_batch", type=int, default=16)
    p.add_argument("--heal_lr", type=float, default=2e-4)
    p.add_argument("--pretrain_minutes", type=float, default=7.0)
    p.add_argument("--pretrain_max_steps", type=int, default=20000)
    p.add_argument("--pretrain_compile", action="store_true")
    p.add_argument("--deadline_minutes", type=float, default=None, help="start no new row after this many minutes")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --output (those without an error)")
    p.add_argument("--max_eval_tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t_start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    environment = H.environment(device)
    H.warn_if_dirty(environment)
    result = {"environment": environment, "date": environment["date_utc"], "settings": vars(args), "rows": []}
    done = {}
    if args.resume and os.path.isfile(args.output):
        with open(args.output) as f:
            previous = json.load(f)
        for key in ("reference_training", "dense", "flop_agreement"):
            if key in previous:
                result[key] = previous[key]
        result["resumed_from"] = previous.get("date")
        done = {(r["ffn_flops_ratio_target"], r["method"]): r for r in previous.get("rows", []) if "error" not in r and "ppl_healed" in r}

    def save():
        H.write_json_atomic(args.output, result)

    curve_file = os.path.join(args.work_dir, "training_curve.json")
    if args.dense_model is None and os.path.isfile(curve_file):  # a reference trained by an earlier call
        with open(curve_file) as f:
            result["reference_training"] = json.load(f)
        print(f"reusing the dense reference in {args.work_dir}", flush=True)
        args.dense_model = args.work_dir
    if args.dense_model is None:
        summary = train_dense_reference(PretrainArguments(
            output_dir=args.work_dir, train_tokens=args.train_tokens, validation_tokens=args.validation_tokens,
            tokenizer_name_or_path=args.tokenizer_name_or_path, max_minutes=args.pretrain_minutes,
            max_steps=args.pretrain_max_steps, save_dtype="float32", compile=args.pretrain_compile,
        ))
        result["reference_training"] = summary
        result.pop("dense", None)
        done = {}  # rows of another reference do not belong to this one
        save()
        args.dense_model = args.work_dir
    dense = AutoModelForCausalLM.from_pretrained(args.dense_model, dtype=torch.float32).to(device).eval()
    train = torch.from_numpy(np.load(args.train_tokens).astype(np.int64))
    val = torch.from_numpy(np.load(args.validation_tokens).astype(np.int64))
    if args.max_eval_tokens:
        val = val[: args.max_eval_tokens]
    block = dense.config.n_positions
    calib = windows(train, block, args.calibration_samples, args.seed)
    heal_blocks = windows(train, block, args.heal_steps * args.heal_batch, args.seed + 1)
    result["windowing"] = f"validation split, {len(val)} tokens, non-overlapping windows of {block} (stride {block})"
    result["healing_budget"] = {"steps": args.heal_steps, "batch": args.heal_batch, "block": block,
                                "tokens": args.heal_steps * args.heal_batch * block, "lr": args.heal_lr,
                                "objective": "0.7 * T^2 KL(T=2) + 0.3 * CE, teacher = dense reference"}
    t = time.time()
    dense_ppl = perplexity(dense, val, block, batch_size=16)
    result["dense"] = {"perplexity": dense_ppl["perplexity"], "eval_s": round(time.time() - t, 1)}
    print("dense", dense_ppl["perplexity"], flush=True)
    save()
    f = dense.config.n_inner or 4 * dense.config.n_embd
    ratios = [float(r) for r in args.ratios.split(",")]
    plan = [(r, m) for r in ratios for m in args.methods.split(",") if m]
    plan += [(float(r), m) for r in args.extra_ratios.split(",") if r for m in args.extra_methods.split(",") if m]
    for ratio, method in plan:
        if (ratio, method) in done:
            result["rows"].append(done[(ratio, method)])
            continue
        if args.deadline_minutes is not None and (time.time() - t_start) / 60 >= args.deadline_minutes:
            print(f"deadline: not starting {method} at {ratio}", flush=True)
            result["rows"].append({"ffn_flops_ratio_target": ratio, "method": method, "status": "skipped",
                                   "reason": f"deadline ({args.deadline_minutes} min) passed"})
            continue
        t = time.time()
        torch.manual_seed(args.seed)
        model = None
        row = {"ffn_flops_ratio_target": ratio, "method": method}
        try:
            if method in ("sparse_gpt2", "sparse_gpt2_all", "sparse_gpt2_poly"):
                conv = ConversionArguments(ffn_flops_ratio=ratio)
                if method == "sparse_gpt2_all":
                    conv.sparse_components = list(COMPONENTS)
                elif method == "sparse_gpt2_poly":
                    conv.sparse_components = ["polynomial"]
                row["components"] = list(conv.sparse_components)
                model, report = convert_gpt2_to_sparse(dense, calib, conv)
                row["layers"] = report["layers"]
                if ratio == 0.4 and method == "sparse_gpt2_all":
                    result["flop_agreement"] = flop_agreement(model, block)
            elif method == "prune":
                model = baselines.prune_neurons(dense, calib, ratio, refit=False)
            elif method == "prune_ls":
                model = baselines.prune_neurons(dense, calib, ratio, refit=True)
            elif method == "svd":
                model = baselines.svd_low_rank(dense, ratio)
            elif method == "random_sparse":
                model = baselines.random_sparse(dense, ratio)
            else:
                raise ValueError(f"unknown method {method}")
            row["ffn_flops_ratio"] = baselines.ffn_flops_ratio_of(model, f)
            row["build_s"] = round(time.time() - t, 1)
            row["ppl_calibration_only"] = perplexity(model, val, block, batch_size=16)["perplexity"]
            model, row["heal_s"] = heal(model, dense, heal_blocks, args.heal_steps, args.heal_batch, args.heal_lr, args.seed)
            row["ppl_healed"] = perplexity(model, val, block, batch_size=16)["perplexity"]
            row["params_ffn"] = sum(p.numel() for b in model.transformer.h for p in b.mlp.parameters())
            row["status"] = "ok"
        except Exception as err:  # record and go on: one failure must not hide the other rows
            row.update(status="error", error=repr(err)[:1000])
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
        save()
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    save()


if __name__ == "__main__":
    main()

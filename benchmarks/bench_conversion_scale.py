"""Scale of the conversion: wall time and peak memory of converting GPT-2 small / medium / large / xl shapes.

    python benchmarks/bench_conversion_scale.py --calibration_file corpus.jsonl --tokenizer_name_or_path gpt2-tokenizer \\
        --shapes gpt2@cpu,gpt2-medium@cuda,gpt2-large@cuda,gpt2-xl@cuda --output docs/benchmarks/results/conversion_scale.json

Random weights (the time and memory of the conversion do not depend on them); calibration on the
text file's first --calibration_samples windows of --block tokens, or random tokens without one.
Each shape runs in its own process, so each peak is its own: on CUDA ``torch.cuda.max_memory_allocated``
during ``convert_gpt2_to_sparse`` (the dense model, already on the device, included and reported
apart); on the CPU the process's peak resident set (``getrusage`` ru_maxrss), before and after.
``--smoke``: a tiny shape on the CPU (seconds).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from modeling_sparse_gpt2.tooling.conversion import ConversionArguments, convert_gpt2_to_sparse

SHAPES = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
}
GIB = 2**30


# --- small local helpers (benchmarks/harness.py will hold the shared ones) ---------------------------------------

def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "machine": platform.node(), "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
    }


def write_json(path: str, obj) -> None:
    """Write-then-rename, so a run killed mid-write leaves the previous file whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: kilobytes


# --- one shape (in its own process) -----------------------------------------------------------------------------

def calibration_ids(spec, vocab: int) -> torch.Tensor:
    if spec["calibration_file"]:
        from transformers import AutoTokenizer

        from modeling_sparse_gpt2.tooling.data import load_split, tokenize_blocks

        tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_name_or_path"])
        texts = load_split(spec["calibration_file"], None, None, "train")
        return tokenize_blocks(texts, tokenizer, spec["block"], spec["calibration_samples"], source=spec["calibration_file"])
    g = torch.Generator().manual_seed(spec["seed"])
    return torch.randint(0, vocab, (spec["calibration_samples"], spec["block"]), generator=g)


def convert_one(spec) -> dict:
    dims = {"vocab_size": 50257, "n_positions": 1024, **SHAPES[spec["shape"]]}
    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    config = GPT2Config(**dims, bos_token_id=0, eos_token_id=0)
    t = time.perf_counter()
    with device:
        dense = GPT2LMHeadModel(config).eval()
    build_s = time.perf_counter() - t
    calib = calibration_ids(spec, dims["vocab_size"])
    row = {**spec, **dims, "dense_params": sum(p.numel() for p in dense.parameters()), "build_dense_s": round(build_s, 1),
           "calibration_tokens": calib.numel()}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        row["dense_model_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)
    else:
        row["rss_before_gib"] = round(_rss_gib(), 3)
    t = time.perf_counter()
    sparse, report = convert_gpt2_to_sparse(dense, calib, ConversionArguments(ffn_flops_ratio=spec["ratio"]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    row["convert_s"] = round(time.perf_counter() - t, 2)
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        row["peak_over_dense_gib"] = round(row["peak_memory_gib"] - row["dense_model_gib"], 3)
    else:
        row["peak_rss_gib"] = round(_rss_gib(), 3)
        row["peak_over_before_gib"] = round(row["peak_rss_gib"] - row["rss_before_gib"], 3)
    row["sparse_params"] = sum(p.numel() for p in sparse.parameters())
    row["ffn_flops_ratio"] = sparse.flops_report(1, spec["block"])["FLOPs/ffn_ratio"]
    return row


# --- main -------------------------------------------------------------------------------------------------------

def parse_shapes(text: str, smoke: bool) -> list[tuple[str, str]]:
    out = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        shape, _, device = entry.partition("@")
        if shape not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {shape!r} (known: {', '.join(SHAPES)})")
        if device not in ("", "cpu", "cuda"):
            raise SystemExit(f"--shapes: device of {entry!r} must be cpu or cuda")
        out.append((shape, device or ("cpu" if smoke else "cuda")))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="gpt2@cpu,gpt2-medium@cuda,gpt2-large@cuda,gpt2-xl@cuda",
                   help=f"comma list of shape[@cpu|@cuda]; shapes: {', '.join(SHAPES)}")
    p.add_argument("--calibration_file", default=None, help="text/JSONL corpus; default: random tokens")
    p.add_argument("--tokenizer_name_or_path", default=None)
    p.add_argument("--calibration_samples", type=int, default=64, help="windows of --block tokens (the conversion script's default)")
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--ratio", type=float, default=0.4, help="FFN FLOPs ratio of the conversion")
    p.add_argument("--output", default="docs/benchmarks/results/conversion_scale.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="the tiny shape on the CPU, 20 windows of 32 tokens (above the conversion's calibration floor)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one shape's spec as JSON: run it here, print the row
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(convert_one(json.loads(args.child))), flush=True)
        return None
    if args.calibration_file and not args.tokenizer_name_or_path:
        p.error("--calibration_file needs --tokenizer_name_or_path")
    if args.calibration_file and not os.path.isfile(args.calibration_file):
        p.error(f"--calibration_file: file not found: {args.calibration_file}")
    if args.smoke:
        args.shapes = "tiny@cpu" if args.shapes == p.get_default("shapes") else args.shapes
        args.calibration_samples, args.block = 20, min(args.block, 32)
    result = {"environment": environment(), "settings": vars(args), "rows": []}
    for shape, device in parse_shapes(args.shapes, args.smoke):
        spec = {"shape": shape, "device": device, "ratio": args.ratio, "block": args.block, "seed": args.seed,
                "calibration_samples": args.calibration_samples, "calibration_file": args.calibration_file,
                "tokenizer_name_or_path": args.tokenizer_name_or_path}
        if device == "cuda" and not torch.cuda.is_available():
            row = {**spec, "status": "skipped: no CUDA device"}
        else:
            child = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                   capture_output=True, text=True)
            if child.returncode == 0:
                row = {**json.loads(child.stdout.strip().splitlines()[-1]), "status": "ok"}
            else:
                row = {**spec, "status": "error", "stderr_tail": child.stderr[-2000:]}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()

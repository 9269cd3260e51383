"""Speed of the sparse FFN against dense GPT-2, side by side in one run, written as raw JSON.

What it measures (every figure also as a ratio to the dense model measured in the same run;
each figure is the median of >= 5 timed repetitions after warm-up; CUDA events on GPU,
``time.perf_counter`` on CPU):

1. ``ffn``: the FFN alone on ``batch x seq`` tokens (GPU: 8 x 1,024, bf16) at widths
   d = 768 / 1024 / 1280 / 1600, forward and forward+backward, for
     * ``dense``:  GPT-2's MLP (``GPT2MLP``, inner width 4d);
     * ``sparse``: ``UltraEfficientSparseFFN`` on its fused path with the conversion's default
       components (``FUSED_COMPONENTS``: polynomial, spectral, feedback), ``poly_keep_ratio``
       bisected so that ``flops_report()["FLOPs/ffn_ratio"]`` is just at or under each target
       (0.5 / 0.4 / 0.2 at the first width, ``--width-ratios`` (0.4) at the others);
     * ``sparse_all``: the same with all five components (at ``--all-components-ratios``, 0.4);
     * ``ideal``:  a plain ``GPT2MLP`` of equal FLOPs (inner = round(achieved ratio * 4d)).
   Modes (``--ffn-modes`` at the first width, ``--width-modes`` (graphs) at the others): ``eager``,
   ``compile`` (``torch.compile(module)``) and ``graphs``
   (``torch.compile(mode="reduce-overhead")``: CUDA graphs, so the figure is the GPU's time without
   the host's launch cost; its "forward" is the no-grad inference forward). In the other modes
   "forward" is the training forward (autograd on). Each timed sample runs the call back to back
   for ~10 ms (mean per call); ``gpu_kernel_ms`` beside it is the kernel time under the profiler:
   wall time well above kernel time means the host, not the GPU, bounds that path.
   By default (``--align 64``) the sparse FFN's fused GEMM width (kept neurons + spectral rows +
   feedback rank) is rounded down, and the ideal inner width to the nearest, multiple of 64, so the
   FLOPs ratio lands a little under the target (the exact achieved ratio is what is reported and used):
   unaligned bf16 GEMM widths (e.g. 1,228) ran ~1.8x slower than aligned ones (1,216) on an H200,
   which would blur the comparison. ``--align 1`` gives the exact bisected budgets.
   Reported: time ratio to dense, and time ratio / FLOPs ratio.
2. ``e2e``: GPT-2 small (d=768, 12 layers, 12 heads, vocab 50257, 1,024 positions) dense, sparse
   (default components) at FFN FLOPs ratio 0.4 (then 0.5 if the time budget allows) and the ideal
   narrower dense GPT-2:
     * training step tokens/s (16 x 1,024 tokens, AdamW, fp32 master weights under bf16 autocast
       by default: ``--train-precision``), eager and ``torch.compile``d (each transformer block,
       i.e. regional compilation, by default: ``--compile-scope model`` compiles the whole model,
       ~6x longer to compile); peak GPU memory of it;
     * prefill latency (8 x 1,024 tokens, bf16 weights, no grad, no KV cache kept, logits of the
       last position only), eager and compiled (same scope);
     * ``generate`` decode tokens/s at batch 1 and 32 (greedy, 16-token prompt, 128 new tokens,
       EOS suppressed), eager (dynamic cache) and with CUDA graphs (static cache +
       ``CompileConfig(mode="reduce-overhead")``, transformers' own compiled decoding); the sparse
       model's fused FFN weights are computed once (``freeze_ffn_for_inference()``); on GPU each
       model's decode runs in a fresh process (``--decode-isolation``), as the in-process CUDA-graph
       figures of models measured one after another depended on their order;
     * parameter counts (all, FFN only, FFN buffers).
   Random weights: speed does not depend on them. Every sub-benchmark is wrapped: a failure is
   recorded as an error string in the JSON and the rest still runs. Sections run in order of
   importance and are skipped (recorded as such) once ``--budget-s`` seconds have passed; the JSON
   is rewritten after every sub-benchmark, so a killed run still leaves what it measured.

Commands (from the repository root):

    # GPU (H200, bf16): everything in one run. It stops starting new measurements after
    # --budget-s (default 330 s; ~6 minutes in all): on an H200 the FFN section takes ~3.5 minutes
    # (28 compiles), so the last decode measurements (CUDA graphs) may fall to the budget.
    python benchmarks/bench_speed.py --output docs/benchmarks/results/speed.json

    # GPU, complete coverage within two ~8-minute windows: one section per run
    python benchmarks/bench_speed.py --sections ffn --output docs/benchmarks/results/speed_ffn.json
    python benchmarks/bench_speed.py --sections e2e --budget-s 420 --output docs/benchmarks/results/speed_e2e.json

    # GPU smoke test (one width, one ratio, short decode)
    python benchmarks/bench_speed.py --quick --output /tmp/speed_quick.json

    # CPU (fp32, d=768, FFN alone, eager; sizes shrink automatically; add --compile for the
    # compiled paths, minutes to compile on a small CPU)
    python benchmarks/bench_speed.py --device cpu --output docs/benchmarks/results/speed_cpu.json

    # CPU smoke test of every eager path (a tiny end-to-end model too, generate included), < 1 minute
    python benchmarks/bench_speed.py --device cpu --quick --output /tmp/speed_smoke.json

``--help`` lists the flags that shrink or select parts (``--sections``, ``--widths``, ``--ratios``,
``--e2e-ratios``, ``--reps``, ``--budget-s``, ``--no-compile``, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from modeling_sparse_gpt2 import COMPONENTS, FUSED_COMPONENTS, SparseGPT2Config, SparseGPT2LMHeadModel  # noqa: E402
from modeling_sparse_gpt2.modeling_sparse_gpt2 import sparse_ffns  # noqa: E402

try:  # transformers 5.x: build models without running (slow, here useless) weight init
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover
    no_init_weights = contextlib.nullcontext

MIN_REPS = 5
SMALL_TOKEN_IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)


# ============================================================================ settings
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="docs/benchmarks/results/speed.json", help="where the raw JSON goes")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="shrink everything (smoke test)")
    p.add_argument("--sections", default=None, help="comma list of ffn,e2e (default: GPU ffn,e2e; CPU ffn; --quick ffn,e2e)")
    p.add_argument("--widths", default=None, help="FFN widths d, e.g. 768,1024,1280,1600")
    p.add_argument("--ratios", default=None, help="FFN FLOPs-ratio targets at the first width, e.g. 0.5,0.4,0.2")
    p.add_argument("--width-ratios", default=None, help="FFN FLOPs-ratio targets at the other widths (default 0.4)")
    p.add_argument("--all-components-ratios", default=None,
                   help="targets at which the FFN with all five components is timed too (default 0.4)")
    p.add_argument("--ffn-modes", default=None, help="modes at the first width, comma list of eager,compile,graphs "
                   "(default GPU: all three; CPU: eager)")
    p.add_argument("--width-modes", default=None, help="modes at the other widths (default GPU: graphs; CPU: eager)")
    p.add_argument("--e2e-ratios", default=None, help="end-to-end FLOPs-ratio targets, in priority order (default 0.4,0.5)")
    p.add_argument("--ffn-tokens", default=None, help="FFN batch x seq, e.g. 8x1024")
    p.add_argument("--reps", type=int, default=None, help=f"timed repetitions (>= {MIN_REPS})")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls (after the compiling call)")
    p.add_argument("--budget-s", type=float, default=None, help="skip remaining sub-benchmarks after this many seconds")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="run the torch.compile / CUDA-graph paths (default on GPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip every torch.compile / CUDA-graph path (default on CPU: slow to compile there)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--train-precision", default="autocast", choices=["autocast", "weights"],
                   help="training step: fp32 weights under autocast (default) or weights in --dtype")
    p.add_argument("--align", type=int, default=64,
                   help="round the sparse FFN's fused GEMM width and the ideal inner width down to a multiple of "
                        "this (default 64: unaligned bf16 GEMM widths run up to ~2x slower on an H200; 1 = exact)")
    p.add_argument("--compile-scope", default="blocks", choices=["blocks", "model"],
                   help="end-to-end train/prefill compile: each transformer block (regional, default: ~6x faster "
                        "to compile) or the whole model (also fuses the LM head and loss)")
    p.add_argument("--e2e-stages", default=None, help=f"end-to-end stages to run, comma list of {','.join(E2E_STAGES)} (default all)")
    p.add_argument("--gen-batches", default=None, help="decode batch sizes, e.g. 1,32")
    p.add_argument("--decode-isolation", default=None, choices=["process", "none"],
                   help="measure each model's decode in a fresh process (default on GPU) or in this one")
    p.add_argument("--new-tokens", type=int, default=None, help="decode: new tokens per generate call")
    p.add_argument("--sparse-kwargs", default="{}", help="JSON dict of extra SparseGPT2Config knobs (e.g. components)")
    return p.parse_args(argv)


def _csv(value, cast):
    return [cast(v) for v in value.split(",") if v.strip()] if value else None


def resolve_settings(args) -> dict:
    """Every size and switch of the run, from the flags, the device and --quick (all go in the JSON)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    quick = args.quick
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    if gpu:
        e2e = dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
        shapes = dict(ffn_tokens=(8, 1024), train_tokens=(16, 1024), prefill_tokens=(8, 1024), prompt_len=16,
                      new_tokens=32 if quick else 128, gen_batches=[1, 32])
        widths = [768] if quick else [768, 1024, 1280, 1600]
        ratios = [0.4] if quick else [0.5, 0.4, 0.2]
        e2e_ratios = [0.4] if quick else [0.4, 0.5]
        ffn_modes, width_modes = ["eager", "compile", "graphs"], ["graphs"]
        reps, warmup, budget = 10, 3, (150.0 if quick else 330.0)
        sections = ["ffn", "e2e"]
    else:  # CPU: sizes shrink so a run takes seconds to minutes
        e2e = dict(n_embd=256, n_layer=2, n_head=4, vocab_size=2048, n_positions=256, **SMALL_TOKEN_IDS)
        shapes = dict(ffn_tokens=(1, 256) if quick else (2, 512), train_tokens=(2, 128), prefill_tokens=(2, 128),
                      prompt_len=8, new_tokens=16, gen_batches=[1, 4])
        widths = [768]
        ratios = [0.4] if quick else [0.5, 0.4, 0.2]
        e2e_ratios = [0.4]
        ffn_modes, width_modes = ["eager"], ["eager"]
        reps, warmup, budget = MIN_REPS, 1, (300.0 if quick else 600.0)
        sections = ["ffn", "e2e"] if quick else ["ffn"]
    if args.ffn_tokens:
        shapes["ffn_tokens"] = tuple(int(v) for v in args.ffn_tokens.lower().split("x"))
    if args.gen_batches:
        shapes["gen_batches"] = _csv(args.gen_batches, int)
    if args.new_tokens:
        shapes["new_tokens"] = args.new_tokens
    return dict(
        device=device,
        gpu=gpu,
        quick=quick,
        dtype=dtype,
        sections=_csv(args.sections, str) or sections,
        widths=_csv(args.widths, int) or widths,
        ratios=_csv(args.ratios, float) or ratios,
        width_ratios=_csv(args.width_ratios, float) or [0.4],
        all_components_ratios=_csv(args.all_components_ratios, float) or [0.4],
        ffn_modes=_csv(args.ffn_modes, str) or ffn_modes,
        width_modes=_csv(args.width_modes, str) or width_modes,
        decode_isolation=(args.decode_isolation or ("process" if gpu else "none")) == "process",
        e2e_ratios=_csv(args.e2e_ratios, float) or e2e_ratios,
        e2e_stages=_e2e_stages(args.e2e_stages),
        reps=max(MIN_REPS, args.reps or reps),
        warmup=args.warmup if args.warmup is not None else warmup,
        budget_s=args.budget_s or budget,
        compile=gpu if args.compile is None else args.compile,
        compile_mode="default (torch.compile(module)); decode: CompileConfig(mode='reduce-overhead') + static cache",
        compile_scope=args.compile_scope,
        train_precision=args.train_precision,
        train_optimizer="torch.optim.AdamW(lr=1e-4, fused=True on CUDA)",
        align=max(1, args.align),
        sparse_kwargs=json.loads(args.sparse_kwargs),
        e2e_model=e2e,
        dropout=0.0,
        ffn_sample_ms=10.0 if gpu else 0.0,
        **shapes,
    )


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ============================================================================ environment
def environment(S) -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return None

    env = dict(
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=platform.node(),
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        cuda=torch.version.cuda,
        git_commit=git("rev-parse", "HEAD"),
        git_dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        gpu_name=None,
    )
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if S["gpu"]:
        props = torch.cuda.get_device_properties(torch.device(S["device"]))
        env.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_sm_count=props.multi_processor_count, gpu_capability=f"{props.major}.{props.minor}")
    return env


# ============================================================================ timing
def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn, S, warmup=None, reps=None, min_sample_ms=0.0) -> dict:
    """Median (and every repetition) in milliseconds of one ``fn()`` call, after ``warmup`` untimed calls.

    With ``min_sample_ms`` each timed sample runs ``fn`` back to back ``inner`` times (enough for
    ``min_sample_ms``) and reports the mean per call: the host queues work ahead of the GPU, so a
    sub-millisecond kernel sequence is timed by the GPU, not by the host's launch latency per call
    (that latency is what single-call samples of a short function measure).
    """
    warmup = S["warmup"] if warmup is None else warmup
    reps = max(MIN_REPS, reps or S["reps"])
    for _ in range(warmup):
        fn()
    sync(S["device"])
    inner = 1
    if min_sample_ms:
        t0 = time.perf_counter()
        fn()
        sync(S["device"])
        once_ms = (time.perf_counter() - t0) * 1e3
        inner = int(max(1, min(200, math.ceil(min_sample_ms / max(once_ms, 1e-3)))))
    times = []
    for _ in range(reps):
        if S["gpu"]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    return dict(median_ms=statistics.median(times), min_ms=min(times), calls_per_sample=inner,
                reps_ms=[round(t, 4) for t in times])


def gpu_kernel_ms(fn, S, calls: int = 3):
    """Mean GPU kernel time per ``fn()`` call (sum of kernel durations under ``torch.profiler``).

    Beside the wall time of back-to-back calls this tells whether a path is bound by the GPU
    (the two agree) or by the host launching kernels (wall time well above kernel time).
    """
    if not S["gpu"]:
        return None
    sync(S["device"])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(S["device"])
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / calls / 1e3


def warm_gpu(S, seconds=1.0):
    """Raise the GPU's clocks from idle before the first measurement (a second of bf16 matmuls)."""
    if not S["gpu"]:
        return
    a = torch.randn(8192, 8192, device=S["device"], dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
    del a


def first_call_s(fn, S) -> float:
    """Seconds of the first call (it compiles, for a compiled callable)."""
    sync(S["device"])
    t0 = time.perf_counter()
    fn()
    sync(S["device"])
    return time.perf_counter() - t0


def error_record(exc: BaseException) -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return dict(error=f"{type(exc).__name__}: {exc}"[:2000], traceback="".join(tb[-3:])[-3000:])


def reset_compiler():
    torch._dynamo.reset()


def free_memory(S):
    import gc

    gc.collect()
    if S["gpu"]:
        torch.cuda.empty_cache()


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def exhausted(self) -> bool:
        return self.elapsed() > self.seconds


# ============================================================================ model building
def sparse_config_kwargs(d: int, S: dict, **overrides) -> dict:
    """SparseGPT2Config knobs of an FFN-alone (or end-to-end) model of width d: the conversion's default
    components (``FUSED_COMPONENTS``) unless ``--sparse-kwargs`` or ``overrides`` name others."""
    kw = dict(n_embd=d, n_head=max(1, d // 64), resid_pdrop=S["dropout"], embd_pdrop=S["dropout"],
              attn_pdrop=S["dropout"], sparse_components=list(FUSED_COMPONENTS))
    kw.update(S["sparse_kwargs"])
    kw.update(overrides)
    return kw


def _budget_probe(config_kwargs: dict, keep: float) -> dict:
    """FLOPs ratio and fused GEMM width of a one-layer sparse FFN built with ``poly_keep_ratio=keep``."""
    kw = dict(config_kwargs, n_layer=1, vocab_size=8, poly_keep_ratio=keep, **SMALL_TOKEN_IDS)
    kw["n_positions"] = max(kw.get("n_positions", 1024), 16)
    with no_init_weights():
        model = SparseGPT2LMHeadModel(SparseGPT2Config(**kw))
    ffn = sparse_ffns(model)[0]
    width = sum(c.down()[0].shape[0] for _, c in ffn._gemm_items()) + (len(ffn.gates.names) if ffn.gates.token else 0)
    return dict(ratio=model.flops_report(batch_size=1, seq_len=1)["FLOPs/ffn_ratio"], fused_width=width,
                poly_neurons=ffn.spec.poly_neurons, inner=ffn.spec.f)


def keep_ratio_for_budget(config_kwargs: dict, target: float, align: int = 1) -> float:
    """The largest ``poly_keep_ratio`` whose ``FLOPs/ffn_ratio`` is at or under ``target``.

    Bisects on ``poly_keep_ratio`` with every other knob of ``config_kwargs`` fixed (the small
    components' FLOPs are paid first, the kept neurons fill the rest of the budget). With
    ``align > 1`` the kept neurons are then reduced until the fused down-projection width (kept
    neurons + spectral rows + feedback rank + token gates) is a multiple of ``align``.
    Raises ``ValueError`` when the small components alone exceed the target.
    """
    f = config_kwargs.get("n_inner") or 4 * config_kwargs["n_embd"]
    lo, hi = 0.5 / f, 1.0  # poly_neurons = max(1, round(keep * f)): lo keeps one neuron
    if _budget_probe(config_kwargs, hi)["ratio"] <= target:
        lo = hi
    elif _budget_probe(config_kwargs, lo)["ratio"] > target:
        raise ValueError(f"FFN FLOPs ratio {target} is below what the small components alone cost")
    else:
        while (hi - lo) * f > 0.25:  # resolution: a quarter of one neuron
            mid = (lo + hi) / 2
            if _budget_probe(config_kwargs, mid)["ratio"] <= target:
                lo = mid
            else:
                hi = mid
    probe = _budget_probe(config_kwargs, lo)
    m = probe["poly_neurons"]
    if align > 1:
        m = max(1, m - probe["fused_width"] % align)
    return m / f


def budget_info(config_kwargs: dict, keep: float) -> dict:
    probe = _budget_probe(config_kwargs, keep)
    return dict(poly_keep_ratio=keep, flops_ratio=probe["ratio"], fused_width=probe["fused_width"],
                poly_neurons=probe["poly_neurons"])


def ideal_inner(d: int, ratio: float, align: int) -> int:
    """Inner width of the plain dense MLP with the FLOPs ``ratio`` of GPT-2's (nearest multiple of ``align``)."""
    inner = max(1, round(ratio * 4 * d))
    return max(align, round(inner / align) * align) if align > 1 else inner


def _init_dense_mlp(mlp: GPT2MLP, n_layer: int = 1):
    with torch.no_grad():
        mlp.c_fc.weight.normal_(std=0.02)
        mlp.c_fc.bias.zero_()
        mlp.c_proj.weight.normal_(std=0.02 / math.sqrt(2 * n_layer))
        mlp.c_proj.bias.zero_()
    return mlp


def build_dense_mlp(d: int, inner: int, S: dict) -> GPT2MLP:
    cfg = GPT2Config(n_embd=d, n_head=max(1, d // 64), resid_pdrop=S["dropout"], **SMALL_TOKEN_IDS, vocab_size=8)
    return _init_dense_mlp(GPT2MLP(inner, cfg)).to(S["device"], DTYPES[S["dtype"]])


def build_sparse_ffn(config_kwargs: dict, keep: float, S: dict):
    """The first (only) block's UltraEfficientSparseFFN of a one-layer SparseGPT2LMHeadModel (weights initialised)."""
    cfg = SparseGPT2Config(**dict(config_kwargs, n_layer=1, vocab_size=8, poly_keep_ratio=keep, **SMALL_TOKEN_IDS))
    model = SparseGPT2LMHeadModel(cfg)
    ffn = model.transformer.h[0].mlp
    assert ffn.use_fused, "the benchmark times the fused path"
    return ffn.to(S["device"], DTYPES[S["dtype"]]), model.flops_report(batch_size=1, seq_len=1)["FLOPs/ffn_ratio"]


def matmul_flops_per_token(module) -> int:
    """Forward matmul FLOPs per token (multiply-add = 2) of a GPT2MLP or an UltraEfficientSparseFFN."""
    if isinstance(module, GPT2MLP):
        d, f = module.c_fc.weight.shape
        return 4 * d * f
    return sum(mm for mm, _ in module.flops_per_token().values())


# ============================================================================ 1. FFN alone
def bench_ffn(S: dict, results: dict, budget: Budget, save):
    rows = results.setdefault("ffn", [])
    device, dtype = S["device"], DTYPES[S["dtype"]]
    batch, seq = S["ffn_tokens"]
    for i, d in enumerate(S["widths"]):
        modes = [m for m in (S["ffn_modes"] if i == 0 else S["width_modes"]) if m == "eager" or S["compile"]]
        torch.manual_seed(0)
        variants = [dict(d=d, kind="dense", target=None, flops_ratio=1.0, inner=4 * d,
                         module=build_dense_mlp(d, 4 * d, S))]
        for target in S["ratios"] if i == 0 else S["width_ratios"]:
            kinds = [("sparse", None)] + ([("sparse_all", list(COMPONENTS))] if target in S["all_components_ratios"] else [])
            for kind, components in kinds:
                kw = sparse_config_kwargs(d, S, **({"sparse_components": components} if components else {}))
                try:
                    keep = keep_ratio_for_budget(kw, target, S["align"])
                    info = budget_info(kw, keep)
                    sparse, ratio = build_sparse_ffn(kw, keep, S)
                    assert abs(ratio - info["flops_ratio"]) < 1e-12
                    variants.append(dict(d=d, kind=kind, target=target, module=sparse, components=kw["sparse_components"], **info))
                    if kind == "sparse":
                        inner = ideal_inner(d, info["flops_ratio"], S["align"])
                        variants.append(dict(d=d, kind="ideal", target=target, flops_ratio=inner / (4 * d), inner=inner,
                                             module=build_dense_mlp(d, inner, S)))
                except Exception as exc:  # noqa: BLE001
                    rows.append(dict(d=d, kind=kind, target=target, **error_record(exc)))
        x = torch.randn(batch, seq, d, device=device, dtype=dtype, requires_grad=True)
        gy = torch.randn(batch, seq, d, device=device, dtype=dtype)
        for mode in modes:
            for v in variants:
                row = {k: val for k, val in v.items() if k != "module"}
                row.update(mode=mode, tokens=batch * seq, dtype=S["dtype"])
                if budget.exhausted():
                    row["skipped"] = "time budget"
                    rows.append(row)
                    continue
                module = v["module"].train()
                row["matmul_flops_per_token"] = matmul_flops_per_token(module)
                try:
                    fn = module
                    if mode != "eager":
                        reset_compiler()
                        fn = torch.compile(module, mode="reduce-overhead" if mode == "graphs" else None)

                    def fwd():
                        if mode == "graphs":  # CUDA graphs: the inference forward (its own graph, no autograd)
                            torch.compiler.cudagraph_mark_step_begin()
                            with torch.no_grad():
                                return fn(x)
                        return fn(x)

                    def fwd_bwd():
                        if mode == "graphs":
                            torch.compiler.cudagraph_mark_step_begin()
                        x.grad = None
                        module.zero_grad(set_to_none=True)
                        fn(x).backward(gy)

                    row["first_call_s"] = round(first_call_s(fwd_bwd, S), 3)
                    row["fwd"] = time_fn(fwd, S, min_sample_ms=S["ffn_sample_ms"])
                    row["fwd_bwd"] = time_fn(fwd_bwd, S, min_sample_ms=S["ffn_sample_ms"])
                    row["fwd"]["gpu_kernel_ms"] = gpu_kernel_ms(fwd, S)
                    row["fwd_bwd"]["gpu_kernel_ms"] = gpu_kernel_ms(fwd_bwd, S)
                    flops = row["matmul_flops_per_token"] * batch * seq
                    row["fwd"]["tflops"] = flops / row["fwd"]["median_ms"] / 1e9
                    row["fwd_bwd"]["tflops"] = 3 * flops / row["fwd_bwd"]["median_ms"] / 1e9
                except Exception as exc:  # noqa: BLE001
                    row.update(error_record(exc))
                    reset_compiler()
                rows.append(row)
                print(f"  [{budget.elapsed():4.0f}s] ffn d={d} {v['kind']:6s} target={v['target']} {mode:7s} "
                      + (f"fwd {row['fwd']['median_ms']:.3f} ms  fwd+bwd {row['fwd_bwd']['median_ms']:.3f} ms"
                         if "fwd_bwd" in row else row.get("error", row.get("skipped", ""))[:200]), flush=True)
                save()
        del variants, x, gy
        reset_compiler()
        free_memory(S)
    _ffn_ratios(rows)
    save()


def _ffn_ratios(rows):
    """Add time ratios to the dense row of the same width and mode, and time ratio / FLOPs ratio."""
    dense = {(r["d"], r["mode"]): r for r in rows if r["kind"] == "dense" and "fwd_bwd" in r}
    for r in rows:
        ref = dense.get((r.get("d"), r.get("mode")))
        if ref is None or "fwd_bwd" not in r:
            continue
        for key in ("fwd", "fwd_bwd"):
            t = r[key]["median_ms"] / ref[key]["median_ms"]
            r[f"{key}_time_ratio"] = t
            r[f"{key}_time_over_flops"] = t / r["flops_ratio"]


# ============================================================================ 2./3. end to end
def _count(module_list, what="parameters"):
    seen, total = set(), 0
    for m in module_list:
        for t in getattr(m, what)():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
    return total


def param_counts(model) -> dict:
    mlps = [blk.mlp for blk in model.transformer.h]
    return dict(params=_count([model]), ffn_params=_count(mlps), ffn_buffers=_count(mlps, "buffers"),
                non_ffn_params=_count([model]) - _count(mlps))


def build_e2e_models(S: dict, target: float, with_dense: bool, only: str | None = None) -> dict:
    """dense (if ``with_dense``), ``sparse@target`` and ``ideal@target`` GPT-2s (or just the one named ``only``)."""
    base = dict(S["e2e_model"], resid_pdrop=S["dropout"], embd_pdrop=S["dropout"], attn_pdrop=S["dropout"])
    models, info = {}, {}
    torch.manual_seed(0)
    if with_dense and only in (None, "dense"):
        models["dense"] = GPT2LMHeadModel(GPT2Config(**base))
        info["dense"] = dict(flops_ratio=1.0, inner=4 * base["n_embd"])
    kw = sparse_config_kwargs(base["n_embd"], S, **base)
    keep = keep_ratio_for_budget(kw, target, S["align"])
    sp = budget_info(kw, keep)
    if only in (None, f"sparse@{target}"):
        sparse = SparseGPT2LMHeadModel(SparseGPT2Config(**dict(kw, poly_keep_ratio=keep)))
        sp["flops_ratio_model"] = sparse.flops_report(batch_size=1, seq_len=1)["FLOPs/ffn_ratio"]
        models[f"sparse@{target}"], info[f"sparse@{target}"] = sparse, sp
    inner = ideal_inner(base["n_embd"], sp["flops_ratio"], S["align"])
    if only in (None, f"ideal@{target}"):
        models[f"ideal@{target}"] = GPT2LMHeadModel(GPT2Config(**base, n_inner=inner))
        info[f"ideal@{target}"] = dict(flops_ratio=inner / (4 * base["n_embd"]), inner=inner)
    for name, m in models.items():
        m.to(S["device"]).train()
        info[name].update(param_counts(m), target=None if name == "dense" else target,
                          attn_implementation=getattr(m.config, "_attn_implementation", None))
    return models, info


def _autocast(S):
    if S["train_precision"] == "autocast" and S["dtype"] != "fp32":
        return torch.autocast(device_type=torch.device(S["device"]).type, dtype=DTYPES[S["dtype"]])
    return contextlib.nullcontext()


@contextlib.contextmanager
def compiled_model(model, S):
    """The model's forward under ``torch.compile``: whole model, or each block (regional compilation)."""
    reset_compiler()
    if S["compile_scope"] == "model":
        yield torch.compile(model)
        return
    blocks = list(model.transformer.h)
    for block in blocks:
        block.compile()
    try:
        yield model
    finally:
        for block in blocks:
            block._compiled_call_impl = None


def measure_train(model, S, compiled: bool) -> dict:
    """Training step (forward, loss, backward, AdamW step) tokens/s and peak memory."""
    batch, seq = S["train_tokens"]
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=S["device"])
    if S["train_precision"] == "weights":
        model.to(DTYPES[S["dtype"]])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=S["gpu"] or None)
    with compiled_model(model, S) if compiled else contextlib.nullcontext(model) as fwd:
        out = _time_train(model, fwd, opt, ids, S)
    del opt
    model.zero_grad(set_to_none=True)
    return out


def _time_train(model, fwd, opt, ids, S) -> dict:
    batch, seq = ids.shape

    def step():
        with _autocast(S):
            loss = fwd(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = dict(first_call_s=round(first_call_s(step, S), 3))
    if S["gpu"]:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    out.update(time_fn(step, S))
    out["tokens_per_s"] = batch * seq / out["median_ms"] * 1e3
    out["gpu_kernel_ms"] = gpu_kernel_ms(step, S, calls=2)
    if S["gpu"]:
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["mem_before_step_gib"] = before / 2**30
        out["peak_over_before_gib"] = out["peak_mem_gib"] - out["mem_before_step_gib"]
    return out


def measure_prefill(model, S, compiled: bool) -> dict:
    batch, seq = S["prefill_tokens"]
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=S["device"])
    with compiled_model(model, S) if compiled else contextlib.nullcontext(model) as fwd:

        @torch.no_grad()
        def prefill():
            return fwd(input_ids=ids, use_cache=False, logits_to_keep=1).logits

        out = dict(first_call_s=round(first_call_s(prefill, S), 3))
        out.update(time_fn(prefill, S))
        out["gpu_kernel_ms"] = gpu_kernel_ms(prefill, S)
    out["tokens_per_s"] = batch * seq / out["median_ms"] * 1e3
    return out


def measure_generate(model, S, batch: int, graphs: bool) -> dict:
    """Greedy ``generate`` decode tokens/s: eager dynamic cache, or static cache + reduce-overhead compile."""
    from transformers import CompileConfig

    n_new = S["new_tokens"]
    ids = torch.randint(1, model.config.vocab_size, (batch, S["prompt_len"]), device=S["device"])
    kwargs = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                  pad_token_id=model.config.eos_token_id, attention_mask=torch.ones_like(ids))
    if graphs:
        cc = CompileConfig(mode="reduce-overhead")
        if not S["gpu"]:
            cc._compile_all_devices = True
        kwargs.update(cache_implementation="static", compile_config=cc)
        reset_compiler()
        if hasattr(model, "_compiled_call"):  # a fresh compiled call for this batch size
            del model._compiled_call
    else:
        kwargs.update(disable_compile=True)

    @torch.no_grad()
    def gen():
        out = model.generate(ids, **kwargs)
        assert out.shape[1] == ids.shape[1] + n_new, out.shape
        return out

    out = dict(first_call_s=round(first_call_s(gen, S), 3))
    # decode is slower to time: a smaller warm-up (the first call above already warmed up)
    out.update(time_fn(gen, S, warmup=2 if graphs else 0, reps=MIN_REPS))
    out["tokens_per_s"] = batch * n_new / out["median_ms"] * 1e3
    out["batch"], out["new_tokens"], out["prompt_len"] = batch, n_new, S["prompt_len"]
    return out


def inference_copy(model, S):
    """The model as it is served: bf16 on GPU, eval mode, fused FFN weights computed once."""
    m = copy.deepcopy(model).to(DTYPES[S["dtype"]]).eval()
    if hasattr(m, "freeze_ffn_for_inference"):
        m.freeze_ffn_for_inference()
    return m


def _decode_worker(S, target, name, batch, graphs):
    configure_torch(S)
    models, _ = build_e2e_models(S, target, with_dense=True, only=name)
    model = inference_copy(models[name].to(S["device"]), S)
    return measure_generate(model, S, batch, graphs)


def measure_generate_isolated(S, target, name, batch, graphs) -> dict:
    """``measure_generate`` in a fresh process: no compiled code, CUDA graph pool or allocator state
    left over from the models measured before (the in-process figures depended on the order)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        out = pool.apply(_decode_worker, (S, target, name, batch, graphs))
    out["isolated_process"] = True
    return out


E2E_STAGES = ("train", "decode_graphs", "prefill", "decode_eager")  # the order they run in


def _e2e_stages(text: str | None) -> list:
    stages = _csv(text, str) or list(E2E_STAGES)
    unknown = sorted(set(stages) - set(E2E_STAGES))
    if unknown:
        raise SystemExit(f"--e2e-stages: unknown {unknown}; choose from {','.join(E2E_STAGES)}")
    return stages


def bench_e2e(S: dict, results: dict, budget: Budget, save):
    res = results.setdefault("e2e", {"models": {}, "rows": []})
    rows = res["rows"]
    comp = S["compile"]

    failed = {}  # (model, stage, mode) -> error: a path that failed at one batch size is not retried at the next

    def run(stage, models, fn, **tags):
        for name, model in models.items():
            row = dict(model=name, stage=stage, **tags)
            earlier = failed.get((name, stage, tags.get("mode")))
            if budget.exhausted():
                row["skipped"] = "time budget"
            elif earlier:
                row["skipped"] = f"failed at an earlier batch size: {earlier}"[:300]
            else:
                try:
                    row.update(fn(model))
                except Exception as exc:  # noqa: BLE001
                    row.update(error_record(exc))
                    failed[(name, stage, tags.get("mode"))] = row["error"]
                    reset_compiler()
                free_memory(S)
            rows.append(row)
            msg = (f"{row['median_ms']:.2f} ms" + (f", {row['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in row else "")
                   if "median_ms" in row else (row.get("error") or row.get("skipped", ""))[:200])
            print(f"  [{budget.elapsed():4.0f}s] e2e {stage:8s} {str(tags or ''):22s} {name:10s} {msg}", flush=True)
            save()

    for i, target in enumerate(S["e2e_ratios"]):
        if budget.exhausted():
            res.setdefault("skipped_targets", []).append(target)
            continue
        try:
            models, info = build_e2e_models(S, target, with_dense=(i == 0))
        except Exception as exc:  # noqa: BLE001
            res.setdefault("errors", []).append(dict(target=target, **error_record(exc)))
            continue
        res["models"].update(info)
        save()
        # in order of importance (the last ones are the first to fall to the time budget)
        stages = S["e2e_stages"]
        if "train" in stages:
            run("train", models, lambda m: measure_train(m, S, compiled=False), mode="eager")
            if comp:
                run("train", models, lambda m: measure_train(m, S, compiled=True), mode="compile")
        infer = {name: inference_copy(m, S) for name, m in models.items()}

        def decode(graphs, b):
            if S["decode_isolation"]:
                names = {id(m): n for n, m in infer.items()}
                return lambda m: measure_generate_isolated(S, target, names[id(m)], b, graphs)
            return lambda m: measure_generate(m, S, b, graphs=graphs)

        if comp and "decode_graphs" in stages:
            for b in S["gen_batches"]:
                run("decode", infer, decode(True, b), mode="cuda_graphs", batch=b)
        if "prefill" in stages:
            run("prefill", infer, lambda m: measure_prefill(m, S, compiled=False), mode="eager")
            if comp:
                run("prefill", infer, lambda m: measure_prefill(m, S, compiled=True), mode="compile")
        if "decode_eager" in stages:
            for b in S["gen_batches"]:
                run("decode", infer, decode(False, b), mode="eager", batch=b)
        del infer
        for m in models.values():
            m.to("cpu")
        del models
        reset_compiler()
        free_memory(S)
    _e2e_ratios(rows)
    save()


def _e2e_ratios(rows):
    """Time ratio and throughput speed-up of each row against dense in the same stage/mode/batch."""
    key = lambda r: (r["stage"], r.get("mode"), r.get("batch"))  # noqa: E731
    dense = {key(r): r for r in rows if r["model"] == "dense" and "median_ms" in r}
    for r in rows:
        ref = dense.get(key(r))
        if ref is not None and "median_ms" in r:
            r["time_ratio"] = r["median_ms"] / ref["median_ms"]
            r["speedup"] = ref["median_ms"] / r["median_ms"]
            if "peak_over_before_gib" in r and ref.get("peak_over_before_gib"):
                r["activation_mem_ratio"] = r["peak_over_before_gib"] / ref["peak_over_before_gib"]
                r["peak_mem_ratio"] = r["peak_mem_gib"] / ref["peak_mem_gib"]


# ============================================================================ report
def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def print_tables(results: dict):
    S = results["settings"]
    rows = results.get("ffn", [])
    out = []
    if rows:
        b, s = S["ffn_tokens"]
        out.append(f"\nFFN alone ({S['dtype']}, {b}x{s} tokens, {S['device']}): time ratio to dense of the same width "
                   f"(<1 is faster); t/F = time ratio / FLOPs ratio; dense row: absolute ms")
        hdr = f"{'mode':7s} {'d':>5s} {'kind':>10s} {'target':>6s} {'FLOPs':>6s} | {'fwd':>7s} {'f+b':>7s} | {'t/F fwd':>7s} {'t/F f+b':>7s}"
        out.append(hdr)
        out.append("-" * len(hdr))
        for mode in ("eager", "compile", "graphs"):
            for d in S["widths"]:
                for r in (r for r in rows if r.get("d") == d and r.get("mode") == mode):
                    head = f"{mode:7s} {d:5d} {r['kind']:>10s} {_f(r.get('target'), '{:6.2f}'):>6s} {_f(r.get('flops_ratio'), '{:6.3f}'):>6s} | "
                    if "fwd_bwd" not in r:
                        out.append(head + (r.get("error") or r.get("skipped", ""))[:80])
                    elif r["kind"] == "dense":
                        out.append(head + f"{r['fwd']['median_ms']:5.3f}ms {r['fwd_bwd']['median_ms']:5.3f}ms | (absolute)")
                    else:
                        out.append(head + f"{_f(r.get('fwd_time_ratio')):>7s} {_f(r.get('fwd_bwd_time_ratio')):>7s} | "
                                   f"{_f(r.get('fwd_time_over_flops')):>7s} {_f(r.get('fwd_bwd_time_over_flops')):>7s}")
    e2e = results.get("e2e")
    if e2e and e2e.get("rows"):
        m = S["e2e_model"]
        out.append(f"\nEnd to end: GPT-2 d={m['n_embd']} L={m['n_layer']} vocab={m['vocab_size']} ({S['device']}); "
                   f"train {S['train_tokens'][0]}x{S['train_tokens'][1]} "
                   f"({S['train_precision'] if S['dtype'] != 'fp32' else 'fp32'}), prefill "
                   f"{S['prefill_tokens'][0]}x{S['prefill_tokens'][1]} ({S['dtype']}), decode {S['new_tokens']} new tokens")
        names = list(e2e["models"])
        out.append("each cell: value (speed-up vs dense, >1 is faster; for memory: ratio to dense)")
        out.append(f"{'measure':28s} {'unit':6s} " + " ".join(f"{n:>18s}" for n in names))
        for label, unit, key in (("params", "M", "params"), ("FFN params", "M", "ffn_params"),
                                 ("FFN FLOPs ratio", "", "flops_ratio")):
            vals = [e2e["models"][n].get(key) for n in names]
            vals = [f"{v / 1e6:.2f}" if unit == "M" else f"{v:.3f}" for v in vals]
            out.append(f"{label:28s} {unit:6s} " + " ".join(f"{v:>18s}" for v in vals))
        measures = [("train", "eager", None), ("train", "compile", None), ("prefill", "eager", None),
                    ("prefill", "compile", None)]
        measures += [("decode", mode, b) for mode in ("eager", "cuda_graphs") for b in S["gen_batches"]]
        for st, mode, b in measures:
            found = [next((r for r in e2e["rows"] if r["model"] == n and r["stage"] == st and r.get("mode") == mode
                           and r.get("batch") == b), None) for n in names]
            if not any(found):
                continue
            unit = "ms" if st == "prefill" else "tok/s"
            cells = []
            for r in found:
                if r is None:
                    cells.append("-")
                elif "median_ms" in r:
                    v = f"{r['median_ms']:.2f}" if unit == "ms" else f"{r['tokens_per_s']:.0f}"
                    cells.append(f"{v} ({_f(r.get('speedup'))})")
                else:
                    cells.append("ERROR" if "error" in r else "skipped")
            label = f"{st} {mode}" + (f" batch {b}" if b else "")
            out.append(f"{label:28s} {unit:6s} " + " ".join(f"{c:>18s}" for c in cells))
            if st == "train":
                mem = [f"{r['peak_mem_gib']:.2f} ({_f(r.get('peak_mem_ratio'))})" if r and "peak_mem_gib" in r else "-"
                       for r in found]
                if any(m != "-" for m in mem):
                    out.append(f"{'  peak GPU memory':28s} {'GiB':6s} " + " ".join(f"{m:>18s}" for m in mem))
        errors = [r for r in e2e["rows"] if "error" in r]
        for r in errors:
            out.append(f"  error {r['model']} {r['stage']} {r.get('mode')} b={r.get('batch')}: {r['error'][:160]}")
        for e in e2e.get("errors", []):
            out.append(f"  error building models for {e['target']}: {e['error'][:160]}")
    out.append(f"\nelapsed {results.get('elapsed_s', 0):.0f} s (budget {S['budget_s']:.0f} s); JSON: {results.get('output')}")
    print("\n".join(out), flush=True)


# ============================================================================ main
def configure_torch(S):
    if S["gpu"]:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Many modules of one class are compiled one after another: never fall back to eager for that.
    for name, value in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)
    transformers.logging.set_verbosity_error()


def main(argv=None):
    args = parse_args(argv)
    S = resolve_settings(args)
    configure_torch(S)
    output = Path(args.output)
    if not output.is_absolute():
        output = Path.cwd() / output
    results = dict(environment=environment(S), settings=S, output=str(output))
    budget = Budget(S["budget_s"])

    def save():
        results["elapsed_s"] = round(budget.elapsed(), 1)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_suffix(output.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        os.replace(tmp, output)

    print(f"bench_speed: {S['device']} {results['environment'].get('gpu_name') or ''} torch {torch.__version__} "
          f"transformers {transformers.__version__}; sections {S['sections']}; budget {S['budget_s']:.0f} s", flush=True)
    warm_gpu(S)
    save()
    for section, fn in (("ffn", bench_ffn), ("e2e", bench_e2e)):
        if section in S["sections"]:
            print(f"[{section}] t={budget.elapsed():.0f}s", flush=True)
            try:
                fn(S, results, budget, save)
            except Exception as exc:  # noqa: BLE001 -- keep what was measured
                results.setdefault("section_errors", {})[section] = error_record(exc)
                print(f"[{section}] failed: {exc}", flush=True)
            save()
    save()
    print_tables(results)
    return results


if __name__ == "__main__":
    main()

"""Host time of GPT-2 blocks on the eager CUDA path: sparse-gpt2, the ideal, dense (CPU with the launch stubbed, or a GPU).

    python -m benchmarks.profile_host --output docs/benchmarks/results/host_cost_cpu_launch_stubbed.json
    python -m benchmarks.profile_host --baseline-rev main     # + the sparse rows of the code at main, interleaved
    python -m benchmarks.profile_host --smoke                 # a check of this script (seconds)
    python -m benchmarks.profile_host --device cuda --baseline-rev main --output docs/benchmarks/results/host_cost_h200.json
    python -m benchmarks.profile_host --device cuda --compile --output docs/benchmarks/results/host_cost_compiled_h200.json
    python -m benchmarks.profile_host --models ideal,sparse_poly --call-kinds prefill   # a subset of the rows

Eager prefill and ``generate`` of GPT-2 small on a GPU wait on the host: the sparse model's kernels
take less GPU time than the ideal's, but its blocks take longer to dispatch. This measures that
host time where there is no GPU. The models are tiny GPT-2s (d = 64, 4 heads, vocabulary 256, fp32:
bf16 matmuls on a CPU without bf16 units would time arithmetic, not dispatch), run on one thread
with Triton's launcher stubbed: ``ffn_kernels.use_kernel`` is forced on and the kernels' ``run``
does nothing (as ``kernel_microbench.host_cost``), so the sparse FFN runs the exact Python of its
CUDA path on CPU tensors; every other op runs its CPU kernel, which at these sizes costs about what
dispatching it costs. Triton's own launcher (argument binding, the driver call) is not in these
figures: it comes on top, once per block. With ``--device cuda`` (bf16) nothing is stubbed: the
same calls on a GPU, each after a ``synchronize`` (untimed), so the thread's CPU time is the host
work of real launches, Triton's launcher and CUDA's included.

Models (random weights, seed 0): ``dense`` GPT-2; ``ideal`` (plain GPT-2, ``n_inner`` = the fused
width of ``sparse_psf``); ``sparse_poly`` (polynomial only) and ``sparse_psf`` (polynomial +
spectral + feedback) at FFN FLOPs 0.4; each at ``--layers`` (2 and 12) blocks. Calls, all under
``no_grad``:

* ``prefill``: ``model(input_ids (1, 16), use_cache=False, logits_to_keep=1)``, as ``bench_e2e``.
* ``decode_dynamic``: one step of ``generate``'s loop with a ``DynamicCache``
  (``prepare_inputs_for_generation``, then the forward), with the arguments recorded from a real
  ``generate`` call; the cache is cropped back to the prompt (untimed) before each call. An all-ones
  ``attention_mask`` is dropped by ``generate``, as in ``bench_decode``.
* ``decode_static``: the same with ``cache_implementation="static"`` (eager).
* ``decode_dynamic_padded``: ``decode_dynamic`` with the prompt's first position padded, so the
  mask reaches the model (and the feedback's token mask).

Clock: the CPU time of this thread (``time.thread_time_ns``), so time spent descheduled on a shared
machine does not count. Every variant is timed in turn, ``--rounds`` rounds of ``--calls`` calls
each. Per block: each round's slope over the layer counts, ``(t(L2) - t(L1)) / (L2 - L1)``; the
intercept is the per-call work outside the blocks (embeddings, head, input preparation); the rows
give the medians over rounds, and of each round's difference to the ideal's (paired samples), and
the slope of each variant's fastest round ("of min": on a shared machine interference only adds).
Beside the times, two counts that have no noise: the Python (and builtin) function calls per block
(``cProfile``) and the ops dispatched per block (``torch.profiler`` on the CPU: the top-level
``aten::`` ops, every ``aten::`` op, the stubbed Triton launches), with the top-level ops the sparse
blocks dispatch beyond the ideal's. ``cProfile`` of the sparse decode step lists each function's
own time per call.

``--models`` and ``--call-kinds`` choose a subset of the rows (the ideal is always measured: every row is
also given as its difference to the ideal's). ``--compile`` (GPU only) times the same calls with each
block under ``torch.compile`` (regional, as ``bench_e2e``'s compiled rows), for the host work of
compiled blocks; there every (model, blocks, call) variant is compiled once on its first call (all
32 took 132 s on the H200 machine), so with ``--compile`` the default subset is the question it
answers, ``--models ideal,sparse_poly --call-kinds prefill,decode_static`` (8 variants), unless the flags
are given. A ``cProfile`` of the default (polynomial-only) prefill is listed as well, of the
``sparse_psf`` decode step where those are measured.

``--baseline-rev REV`` adds the sparse models built from the package's remote-code files at git
revision REV (``git archive``), imported under another package name, so one command compares the
code before and after a change in the same process, interleaved.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import gc
import importlib
import io
import pstats
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from . import harness as H
from .harness import LaunchStub

SHAPE = dict(n_embd=64, n_head=4, vocab_size=256, n_positions=128)
PROMPT = 16
SPARSE = {"sparse_poly": ["polynomial"], "sparse_psf": ["polynomial", "spectral", "feedback"]}
CALLS = ("prefill", "decode_dynamic", "decode_static", "decode_dynamic_padded")
MODELS = ("dense", "ideal", *SPARSE)
COMPILE_DEFAULT = (("ideal", "sparse_poly"), ("prefill", "decode_static"))  # --compile's rows unless --models / --call-kinds


# ---------------------------------------------------------------------------- models
def load_baseline(rev: str):
    """``(modeling module, ffn_kernels module, commit)`` of the package's remote-code files at ``rev``,
    imported as a package of another name (as transformers imports a checkpoint's code)."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=H.REPO, capture_output=True, text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "modeling_sparse_gpt2"], cwd=H.REPO, capture_output=True,
                             check=True).stdout
    root = Path(tempfile.mkdtemp(prefix="profile_host_"))
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(root, filter="data")
    name = f"sparse_gpt2_at_{commit[:12]}"
    package = types.ModuleType(name)
    package.__path__ = [str(root / "modeling_sparse_gpt2")]
    sys.modules[name] = package
    modeling = importlib.import_module(f"{name}.modeling_sparse_gpt2")
    # as the package's __init__ does (and transformers for remote code): generate's input preparation
    # asks is_remote_code() on every step and then inspects the forward's signature
    modeling.SparseGPT2LMHeadModel.register_for_auto_class("AutoModelForCausalLM")
    return modeling, importlib.import_module(f"{name}.ffn_kernels"), commit


def build(n_layer: int, dtype, baseline=None, device="cpu", kinds=MODELS) -> dict:
    """``{kind: model}`` (eval, ``dtype``, on ``device``) at ``n_layer`` blocks for ``kinds``; their sparse
    kinds of ``baseline`` as ``kind@rev`` too."""
    from modeling_sparse_gpt2 import SparseGPT2LMHeadModel

    shape = dict(SHAPE, n_layer=n_layer)
    dense_config = H.gpt2_config(shape)
    configs = {kind: H.solve_sparse_config(dense_config, 0.4, 1, sparse_components=comps) for kind, comps in SPARSE.items()}
    width = H.fused_width(H._meta_ffn(configs["sparse_psf"]))
    builders = {"dense": (GPT2LMHeadModel, dense_config), "ideal": (GPT2LMHeadModel, H.gpt2_config(shape, n_inner=width))}
    builders.update({kind: (SparseGPT2LMHeadModel, cfg) for kind, cfg in configs.items()})
    builders = {kind: b for kind, b in builders.items() if kind in kinds}
    if baseline is not None:
        modeling, _, commit = baseline
        builders.update({f"{kind}@{commit[:8]}": (modeling.SparseGPT2LMHeadModel, cfg) for kind, cfg in configs.items()
                         if kind in kinds})
    models = {}
    for kind, (cls, cfg) in builders.items():
        torch.manual_seed(0)
        models[kind] = cls(cfg).to(device, dtype).eval()
    return models


def inner_width(model) -> int:
    mlp = model.transformer.h[0].mlp
    return mlp.c_fc.out_features if hasattr(mlp, "act_width") else mlp.c_fc.nf  # GPT-2's c_fc is a Conv1D


# ---------------------------------------------------------------------------- the calls
def calls_of(model, calls=CALLS) -> dict:
    """``{call: (setup, step)}`` for ``calls``: ``setup`` runs untimed before each timed ``step``."""
    ids = torch.randint(1, SHAPE["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(0)).to(model.device)

    def prefill():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)

    out = {"prefill": (lambda: None, prefill)} if "prefill" in calls else {}
    padded = torch.ones_like(ids)
    padded[:, 0] = 0
    for call, cache_implementation, mask in (("decode_dynamic", None, None), ("decode_static", "static", None),
                                             ("decode_dynamic_padded", None, padded)):
        if call not in calls:
            continue
        args, kwargs = recorded_decode_step(model, ids, cache_implementation, mask)
        cache = next(v for k, v in kwargs.items() if k in ("cache", "past_key_values"))

        def step(args=args, kwargs=kwargs):
            model(**model.prepare_inputs_for_generation(*args, **kwargs), return_dict=True)

        step.cache = cache
        out[call] = (lambda cache=cache: cache.crop(-1), step)  # back to the prompt: each step writes position 16
    return out


def recorded_decode_step(model, ids, cache_implementation, mask=None):
    """The arguments ``generate`` gives ``prepare_inputs_for_generation`` at its first decode step
    (``generate`` drops an all-ones ``attention_mask``; ``mask`` with a padded position stays)."""
    recorded = []
    prepare = model.prepare_inputs_for_generation

    def recording(*args, **kwargs):
        recorded.append((args, dict(kwargs)))
        return prepare(*args, **kwargs)

    model.prepare_inputs_for_generation = recording
    try:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                           pad_token_id=0, disable_compile=True, cache_implementation=cache_implementation)
    finally:
        del model.prepare_inputs_for_generation
    return recorded[-1]


def timed_us(setup, step, calls: int, sync=None) -> float:
    """Mean microseconds per ``step()`` over ``calls`` calls, each after an untimed ``setup()`` (and,
    on a GPU, an untimed ``sync()``, so no launch waits on a full queue): the CPU time of this
    thread (torch runs one thread here), so time spent descheduled on a shared machine does not count."""
    total = 0
    for _ in range(calls):
        setup()
        if sync is not None:
            sync()
        t0 = time.thread_time_ns()
        step()
        total += time.thread_time_ns() - t0
    return total / calls / 1e3


# ---------------------------------------------------------------------------- op counts
def dispatched_ops(setup, step, stub: LaunchStub) -> dict:
    """Ops of one call: ``top_level`` (aten ops called from Python, by name), ``aten`` (every aten
    op, nested ones included) and ``triton`` (stubbed kernel launches)."""
    setup()
    launches = stub.launches
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]

    def nested(e):
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return True
            p = p.cpu_parent
        return False

    top = collections.Counter(e.name for e in events if not nested(e))
    return dict(top_level=dict(top), top_level_total=sum(top.values()), aten_total=len(events),
                triton=stub.launches - launches)


def per_block_ops(low: dict, high: dict, blocks: int) -> dict:
    names = set(low["top_level"]) | set(high["top_level"])
    by_name = {n: (high["top_level"].get(n, 0) - low["top_level"].get(n, 0)) / blocks for n in names}
    return dict(top_level_total=(high["top_level_total"] - low["top_level_total"]) / blocks,
                aten_total=(high["aten_total"] - low["aten_total"]) / blocks,
                triton=(high["triton"] - low["triton"]) / blocks,
                top_level={n: v for n, v in sorted(by_name.items()) if v})


def python_calls(setup, step) -> int:
    """Python and builtin function calls of one ``step()`` (cProfile's count): a noise-free measure of host work."""
    setup()
    prof = cProfile.Profile()
    prof.runcall(step)
    return pstats.Stats(prof).total_calls


def profile_functions(setup, step, calls: int, top: int) -> list:
    """cProfile of ``calls`` calls: the ``top`` functions by own time, per call."""
    prof = cProfile.Profile()
    for _ in range(calls):
        setup()
        prof.runcall(step)
    rows = []
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in pstats.Stats(prof).stats.items():
        where = re.sub(r".*/(site-packages|modeling_sparse_gpt2|benchmarks)/", r"\1/", file).replace("site-packages/", "")
        rows.append(dict(function=f"{where}:{line}({fn})", calls=ncalls / calls, own_us=tottime / calls * 1e6,
                         cumulative_us=cumtime / calls * 1e6))
    return sorted(rows, key=lambda r: -r["own_us"])[:top]


# ---------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=None, help="results JSON")
    p.add_argument("--layers", default="2,12", help="two block counts; the per-block time is the slope between them")
    p.add_argument("--device", default="cpu", help="cpu (Triton's launcher stubbed) or cuda (real launches)")
    p.add_argument("--dtype", default=None, choices=sorted(H.DTYPES), help="default fp32 on the CPU, bf16 on a GPU")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds (every variant once per round)")
    p.add_argument("--calls", type=int, default=20, help="calls per variant and round")
    p.add_argument("--baseline-rev", default=None, help="also the sparse models of the package at this git revision")
    p.add_argument("--profile-calls", type=int, default=50, help="calls under cProfile (the sparse_psf decode step)")
    p.add_argument("--smoke", action="store_true", help="a check of this script: 1 and 2 blocks, 2 rounds of 2 calls")
    p.add_argument("--compile", action="store_true",
                   help="each block under torch.compile (regional, as bench_e2e's compiled rows); --device cuda only")
    p.add_argument("--models", default=None,
                   help=f"comma list of {','.join(MODELS)} (default: all; with --compile {','.join(COMPILE_DEFAULT[0])})")
    p.add_argument("--call-kinds", default=None,
                   help=f"comma list of {','.join(CALLS)} (default: all; with --compile {','.join(COMPILE_DEFAULT[1])})")
    args = p.parse_args(argv)
    if args.compile and not args.device.startswith("cuda"):
        p.error("--compile: needs --device cuda (the compiled blocks launch the kernels themselves: nothing to stub)")
    for flag, known, compiled in (("models", MODELS, COMPILE_DEFAULT[0]), ("call_kinds", CALLS, COMPILE_DEFAULT[1])):
        given = getattr(args, flag)
        chosen = (H.csv(given) or []) if given is not None else list(compiled if args.compile else known)
        unknown = [v for v in chosen if v not in known]
        name = "--" + flag.replace("_", "-")
        if unknown or not chosen:
            p.error(f"{name}: unknown {unknown}; choose from {','.join(known)}" if unknown else f"{name}: none given")
        setattr(args, flag, [v for v in known if v in chosen])  # in the table's order
    if "ideal" not in args.models:
        p.error("--models: the ideal is always measured (every row is also its difference to the ideal's); add ideal")
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    if args.smoke:
        args.layers, args.rounds, args.calls, args.profile_calls = "1,2", 2, 2, 2
    return args


def summarise(samples: dict, counts: dict, kinds, layers, calls=CALLS) -> list:
    """Rows per (model, call): medians over rounds of the per-round slope and intercept, and of
    the per-round difference to the ideal's (each round's samples are paired)."""
    lo, hi = layers
    rounds = len(next(iter(samples.values())))

    def slope(kind, call, r):
        return (samples[(kind, hi, call)][r] - samples[(kind, lo, call)][r]) / (hi - lo)

    def outside(kind, call, r):
        return samples[(kind, lo, call)][r] - lo * slope(kind, call, r)

    def slope_of_minima(kind, call):  # the least disturbed sample of each variant (a shared machine only adds time)
        return (min(samples[(kind, hi, call)]) - min(samples[(kind, lo, call)])) / (hi - lo)

    med = statistics.median
    rows = []
    for kind in kinds:
        for call in calls:
            low, high = counts[(kind, lo, call)], counts[(kind, hi, call)]
            ideal_low, ideal_high = counts[("ideal", lo, call)], counts[("ideal", hi, call)]
            per_block = {n: (high["top_level"].get(n, 0) - low["top_level"].get(n, 0)) / (hi - lo)
                         for n in set(low["top_level"]) | set(high["top_level"])}
            ideal_block = {n: (ideal_high["top_level"].get(n, 0) - ideal_low["top_level"].get(n, 0)) / (hi - lo)
                           for n in set(ideal_low["top_level"]) | set(ideal_high["top_level"])}
            blk = lambda key, c=(low, high): (c[1][key] - c[0][key]) / (hi - lo)  # noqa: E731
            rows.append(dict(
                model=kind, call=call,
                us_per_call={str(n): med(samples[(kind, n, call)]) for n in layers},
                us_per_block=med(slope(kind, call, r) for r in range(rounds)),
                us_per_block_min_max=[min(slope(kind, call, r) for r in range(rounds)),
                                      max(slope(kind, call, r) for r in range(rounds))],
                us_per_block_minus_ideal=med(slope(kind, call, r) - slope("ideal", call, r) for r in range(rounds)),
                us_per_block_of_minima=slope_of_minima(kind, call),
                us_per_block_of_minima_minus_ideal=slope_of_minima(kind, call) - slope_of_minima("ideal", call),
                us_outside_blocks=med(outside(kind, call, r) for r in range(rounds)),
                us_outside_blocks_minus_ideal=med(outside(kind, call, r) - outside("ideal", call, r) for r in range(rounds)),
                python_calls_per_block=blk("python_calls"),
                python_calls_outside_blocks=low["python_calls"] - lo * blk("python_calls"),
                aten_top_level_per_block=blk("top_level_total"), aten_all_per_block=blk("aten_total"),
                triton_launches_per_block=blk("triton"),
                aten_per_block_beyond_ideal={n: v - ideal_block.get(n, 0) for n, v in sorted(per_block.items())
                                             if v != ideal_block.get(n, 0)},
            ))  # fmt: skip
    return rows


def main(argv=None):
    args = parse_args(argv)
    with H.one_thread(flush_denormal=True):  # the stubbed kernels leave their outputs uninitialised
        return measure(args)


def measure(args) -> dict:
    t0 = time.perf_counter()
    gpu = args.device.startswith("cuda")
    H.configure_torch(dict(gpu=gpu))
    from modeling_sparse_gpt2 import ffn_kernels

    if ffn_kernels.triton is None or (gpu and not torch.cuda.is_available()):
        sys.exit("profile_host: needs triton (its launcher is what gets stubbed), and CUDA for --device cuda")
    layers = [int(v) for v in args.layers.split(",")]
    if len(layers) != 2 or layers[0] >= layers[1]:
        sys.exit(f"--layers: two increasing block counts, got {args.layers!r}")
    baseline = load_baseline(args.baseline_rev) if args.baseline_rev else None
    env = H.environment(args.device)
    H.warn_if_dirty(env)
    launch = "real launches (Triton and CUDA), a synchronize before each call" if gpu else "triton launcher stubbed (run is a no-op)"
    settings = dict(device=args.device, compile=args.compile, shape=SHAPE, prompt=PROMPT, layers=layers, dtype=args.dtype, rounds=args.rounds,
                    calls=args.calls, models=args.models, call_kinds=args.call_kinds, threads=1, ffn_flops_ratio=0.4, launch=launch,
                    clock="time.thread_time_ns (CPU time of the calling thread)",
                    baseline=dict(rev=args.baseline_rev, commit=baseline[2]) if baseline else None)
    result = dict(benchmark="profile_host", environment=env, settings=settings)
    stub = LaunchStub([ffn_kernels] + ([baseline[1]] if baseline else []), stub=not gpu)
    sync = torch.cuda.synchronize if gpu else None
    with stub, torch.no_grad():
        models = {n: build(n, H.DTYPES[args.dtype], baseline, args.device, args.models) for n in layers}
        if args.compile:  # compiled on the first (warm-up) call of each variant
            H.reset_compiler()
            for model in (m for by_kind in models.values() for m in by_kind.values()):
                for block in model.transformer.h:
                    block.compile()
        kinds = list(models[layers[0]])
        result["models"] = {k: dict(inner=inner_width(m), components=getattr(m.config, "sparse_components", None))
                            for k, m in models[layers[0]].items()}
        variants = {(k, n, c): fns for n in layers for k in kinds for c, fns in calls_of(models[n][k], args.call_kinds).items()}
        print(f"{len(variants)} variants built in {time.perf_counter() - t0:.1f} s", flush=True)
        counts = {key: dict(dispatched_ops(*fns, stub), python_calls=python_calls(*fns)) for key, fns in variants.items()}
        for fns in variants.values():  # warm-up
            timed_us(*fns, args.calls, sync)
        samples = collections.defaultdict(list)
        for r in range(args.rounds):
            for key, fns in variants.items():
                gc.collect()
                samples[key].append(timed_us(*fns, args.calls, sync))
            print(f"round {r + 1}/{args.rounds} done at {time.perf_counter() - t0:.0f} s", flush=True)
        result["rows"] = summarise(samples, counts, kinds, layers, args.call_kinds)
        result["samples_us_per_call"] = {f"{k}/{n}/{c}": v for (k, n, c), v in samples.items()}
        # the default's prefill (where compiled prefill loses) and the feedback model's decode step, where measured
        for kind, call in (("sparse_psf", "decode_dynamic"), ("sparse_poly", "prefill")):
            if (kind, layers[1], call) in variants:
                result[f"cprofile_{kind}_{call}"] = dict(layers=layers[1], calls=args.profile_calls, functions=profile_functions(
                    *variants[(kind, layers[1], call)], args.profile_calls, 40))
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print_table(result["rows"], layers, launch)
    for key in (k for k in result if k.startswith("cprofile_")):
        print(f"\ncProfile, {key[9:]} at {layers[1]} blocks: own us per call")
        for f in result[key]["functions"][:25]:
            print(f"  {f['own_us']:8.1f}  x{f['calls']:<5g} {f['function']}")
    if args.output:
        H.write_json_atomic(args.output, result)
        print(f"wrote {args.output}")
    return result


def print_table(rows, layers, launch):
    print(f"\nhost us per block (slope {layers[0]} -> {layers[1]} blocks; medians of per-round values; 'of min': the "
          f"slope of each variant's fastest round), one thread, {launch}")
    heads = ("model", "call", "us/block", "-ideal", "of min", "-ideal", "outside", "-ideal", "py calls", "aten", "triton")
    print(f"{heads[0]:>21} {heads[1]:>22}" + "".join(f"{h:>9}" for h in heads[2:]))
    for r in rows:
        cells = (r["us_per_block"], r["us_per_block_minus_ideal"], r["us_per_block_of_minima"],
                 r["us_per_block_of_minima_minus_ideal"], r["us_outside_blocks"], r["us_outside_blocks_minus_ideal"],
                 r["python_calls_per_block"], r["aten_top_level_per_block"], r["triton_launches_per_block"])
        print(f"{r['model']:>21} {r['call']:>22}" + "".join(f"{c:9.1f}" for c in cells))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()

"""What every benchmark shares: the run record, timing, kernel time, rows with a status, model builders.

Rules every benchmark follows through this module (docs/benchmarks.md states them for readers):

* **Environment**: each results file names the commit it measured (``git rev-parse HEAD``) and
  whether the tree was clean (``git status --porcelain``, results folder excepted). A dirty tree is
  recorded as ``dirty: true`` with the sha256 of ``git diff HEAD`` and the changed files, and a
  warning goes to stderr. ``source_sha256`` (the package's and the benchmarks' Python files) names
  the code also where the tree has no ``.git``.
* **Warm-up settles before timing**: ``settle`` repeats the timed sample until the median of the
  last ``SETTLE_WINDOW`` (3) samples moves by less than ``--settle-tol`` (2%) against the median of
  the window one sample earlier, or ``--warmup-max`` samples have run. Every timing records
  ``warmup_samples`` and ``settled``; the timed samples' own drift (median of the second half over
  the first, minus one) is recorded as ``drift``.
* **Kernel time counted once**: ``kernel_ms_of_events`` sums the durations of device-side events
  (kernels, memcpy, memset) of ``prof.events()``. The CPU operators that launched them carry the same
  time again in their ``device_time_total`` and are left out.
* **Every row has a status**: ``ok`` (measured), ``skipped`` (with ``reason``: the time budget, a
  missing device) or ``error`` (with the message). A value that was not measured is ``None`` in the
  JSON, and so is any ratio computed from it; nothing defaults to 1.
* **Atomic JSON**: ``Results.save`` writes a temporary file beside the output and renames it, after
  every row, so a killed run leaves every row it finished.
* **Models**: dense = GPT-2 as configured; sparse = ``SparseGPT2LMHeadModel`` with the config the
  conversion's budget solver picks for the FLOPs target (``solve_sparse_config``, the one place
  the benchmarks call the solver); ideal = plain GPT-2 with ``n_inner`` = the sparse FFN's fused
  down-projection width (``fused_width``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import re
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

from modeling_sparse_gpt2 import SparseGPT2LMHeadModel, ffn_kernels
from modeling_sparse_gpt2.modeling_sparse_gpt2 import sparse_ffns

try:  # transformers 5.x: build models without running (slow, here useless) weight init
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover
    no_init_weights = contextlib.nullcontext

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = "docs/benchmarks/results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMALL_TOKEN_IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
SETTLE_WINDOW = 3
# GPT-2 small (124M) and the tiny model of the CPU smoke runs
GPT2_SMALL = dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
TINY = dict(n_embd=64, n_layer=2, n_head=2, vocab_size=256, n_positions=64)


# ============================================================================ settings
def add_common_args(p: argparse.ArgumentParser, output: str):
    """Flags every speed benchmark takes."""
    p.add_argument("--output", default=output, help=f"results JSON (default {output})")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--tiny", action="store_true", help="smoke run: a tiny model, 2 timed samples, no budget search")
    p.add_argument("--reps", type=int, default=None, help="timed samples per measurement (default 10 on GPU, 5 on CPU)")
    p.add_argument("--warmup-max", type=int, default=None, help="most warm-up samples before timing (default 30 GPU, 8 CPU)")
    p.add_argument("--settle-tol", type=float, default=0.02,
                   help="warm-up ends once the median of the last 3 samples moves less than this (relative)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new measurement after this many seconds")
    p.add_argument("--align", type=int, default=64,
                   help="round the sparse FFN's fused width down to a multiple of this (1: the solver's exact budget)")
    p.add_argument("--sparse-kwargs", default="{}", help="JSON dict of extra conversion knobs, e.g. '{\"sparse_components\": [\"polynomial\"]}'")
    p.add_argument("--backward-tile", default=None,
                   help="time with this backward kernel tile instead of ffn_kernels.BACKWARD_TILE, as "
                        "TOKENSxCOLUMNSxWARPS[r][f][pPROGRAMS] (parse_tiles), e.g. 4x128x4rf")
    p.add_argument("--forward-tile", default=None,
                   help="time with this forward kernel tile instead of ffn_kernels.FORWARD_TILE, as "
                        "TOKENSxCOLUMNSxWARPS (parse_forward_tiles), e.g. 16x128x4")
    p.add_argument("--flat-tile", default=None,
                   help="time with these flat-kernel settings instead of ffn_kernels.FLAT_TILE (the polynomial-only "
                        "FFN): 'off' (the tiled kernels) or fwd:BLOCKxWARPSxPER_SM[h]+bwd:BLOCKxWARPSxPER_SM[p], "
                        "either side 'fwd:off' / 'bwd:off' for the tiled kernel there (parse_flat_tile)")
    return p


def parse_tiles(spec: str, flag: str = "--sweep") -> list[dict]:
    """Backward kernel tiles, comma-separated, each ``TOKENSxCOLUMNSxWARPS`` optionally followed by
    ``r`` (the coefficient sums in registers), ``f`` (the next tile's loads issued before this one's
    arithmetic), ``pPROGRAMS`` (token programs per column tile) and ``sPROGRAMS`` (token programs per SM,
    where ``p`` is not given; without it the default's), as ``ffn_kernels.BACKWARD_TILE`` updates."""
    tiles = []
    for c in (c.strip() for c in spec.split(",")):
        if not c:
            continue
        found = re.fullmatch(r"(\d+)x(\d+)x(\d+)(r?)(f?)(?:p(\d+))?(?:s(\d+))?", c)
        if not found or 0 in [int(n) for n in found.groups() if n and n.isdigit()]:
            raise SystemExit(f"{flag}: {c!r} is not TOKENSxCOLUMNSxWARPS[r][f][pPROGRAMS][sPER_SM], such as "
                             "64x128x8 or 4x128x4rfs5")
        tile = dict(tokens=int(found[1]), columns=int(found[2]), warps=int(found[3]),
                    in_registers=found[4] == "r", prefetch=found[5] == "f",
                    token_programs=int(found[6]) if found[6] else None)
        if found[7]:
            tile["programs_per_sm"] = int(found[7])
        tiles.append(tile)
    return tiles


def tile_name(tile: dict) -> str:
    """The ``parse_tiles`` spelling of a backward tile."""
    return (f"{tile['tokens']}x{tile['columns']}x{tile['warps']}{'r' if tile.get('in_registers') else ''}"
            + ("f" if tile.get("prefetch") else "")
            + (f"p{tile['token_programs']}" if tile.get("token_programs") else "")
            + (f"s{tile['programs_per_sm']}" if tile.get("programs_per_sm") else ""))


@contextlib.contextmanager
def _kernel_tile(name: str, tile: dict):
    """``ffn_kernels.<name>`` updated by ``tile`` inside the block, as it was after it."""
    table = getattr(ffn_kernels, name)
    saved = dict(table)
    table.update(tile)
    try:
        yield table
    finally:
        table.clear()
        table.update(saved)


def backward_tile(tile: dict):
    """``ffn_kernels.BACKWARD_TILE`` updated by ``tile`` inside the block, as it was after it."""
    return _kernel_tile("BACKWARD_TILE", tile)


def forward_tile(tile: dict):
    """``ffn_kernels.FORWARD_TILE`` updated by ``tile`` inside the block, as it was after it."""
    return _kernel_tile("FORWARD_TILE", tile)


def parse_forward_tiles(spec: str, flag: str = "--forward-sweep") -> list[dict]:
    """Forward kernel tiles, comma-separated, each ``TOKENSxCOLUMNSxWARPS``, as ``ffn_kernels.FORWARD_TILE`` updates."""
    tiles = []
    for c in (c.strip() for c in spec.split(",")):
        if not c:
            continue
        found = re.fullmatch(r"(\d+)x(\d+)x(\d+)", c)
        if not found or 0 in [int(n) for n in found.groups()]:
            raise SystemExit(f"{flag}: {c!r} is not TOKENSxCOLUMNSxWARPS, such as 32x64x4")
        tiles.append(dict(tokens=int(found[1]), columns=int(found[2]), warps=int(found[3])))
    return tiles


def flat_tile(tile: dict):
    """``ffn_kernels.FLAT_TILE`` updated by ``tile`` inside the block, as it was after it."""
    return _kernel_tile("FLAT_TILE", tile)


FLAT_SIDES = (("forward", "fwd", "horner", "h"), ("backward", "bwd", "prefetch", "p"))  # side, prefix, option, flag
FLAT_PREFIXES = {prefix: (side, option, letter) for side, prefix, option, letter in FLAT_SIDES}


def parse_flat_tile_items(spec: str, flag: str = "--flat-sweep") -> list[dict]:
    """Flat-kernel settings, comma-separated: ``fwd:BLOCKxWARPSxPER_SM[h]`` (the flat forward on: elements a block,
    warps and programs per SM; ``h``: Horner's rule), ``bwd:BLOCKxWARPSxPER_SM[p]`` (the flat backward on; ``p``:
    prefetched loads), ``fwd:off`` / ``bwd:off`` (that side on the tiled kernels), or ``off`` (both sides tiled),
    each as an ``ffn_kernels.FLAT_TILE`` update."""
    items = []
    for c in (c.strip() for c in spec.split(",")):
        if not c:
            continue
        if c == "off":
            items.append(dict(forward_on=False, backward_on=False))
            continue
        found = re.fullmatch(r"(fwd|bwd):(?:(off)|(\d+)x(\d+)x(\d+)([hp]?))", c)
        side, option, letter = FLAT_PREFIXES[found.group(1)] if found else (None, None, None)
        sizes = [int(n) for n in found.groups()[2:5] if n] if found else []
        if not found or 0 in sizes or (found.group(6) and found.group(6) != letter):
            raise SystemExit(f"{flag}: {c!r} is not fwd:BLOCKxWARPSxPER_SM[h], bwd:BLOCKxWARPSxPER_SM[p], fwd:off, "
                             "bwd:off or off, such as fwd:1024x4x16h or bwd:1024x4x4p")
        if found.group(2):
            items.append({f"{side}_on": False})
            continue
        block, warps, per_sm = sizes
        if block & (block - 1):
            raise SystemExit(f"{flag}: {c!r}: BLOCK must be a power of two")
        items.append({f"{side}_on": True, f"{side}_block": block, f"{side}_warps": warps, f"{side}_per_sm": per_sm,
                      option: found.group(6) == letter})
    return items


def flat_item_name(item: dict) -> str:
    """The ``parse_flat_tile_items`` spelling of one item."""
    for side, prefix, option, letter in FLAT_SIDES:
        if f"{side}_block" in item:
            flag = letter if item.get(option) else ""
            return f"{prefix}:{item[side + '_block']}x{item[side + '_warps']}x{item[side + '_per_sm']}{flag}"
    if item == {"forward_on": False} or item == {"backward_on": False}:
        return ("fwd" if "forward_on" in item else "bwd") + ":off"
    return "off"


def flat_item_side(item: dict):
    """The side (forward / backward) one ``parse_flat_tile_items`` item sets, or None for ``off`` (both)."""
    sides = [side for side, *_ in FLAT_SIDES if f"{side}_on" in item]
    return sides[0] if len(sides) == 1 else None


def parse_flat_tile(spec: str, flag: str = "--flat-tile") -> list[dict]:
    """``--flat-tile``: ``off``, or a forward and / or a backward item of ``parse_flat_tile_items`` joined by
    ``+`` (``fwd:1024x4x16h+bwd:1024x4x4p``, ``fwd:1024x4x16h+bwd:off``), as one ``ffn_kernels.FLAT_TILE`` update
    (in a list of one)."""
    update = {}
    for part in spec.split("+"):
        for item in parse_flat_tile_items(part, flag):
            update.update(item)
    return [update]


# the kernel tiles a run may set: (flag and settings key, ffn_kernels table, parser of the flag)
KERNEL_TILES = (("backward_tile", "BACKWARD_TILE", parse_tiles), ("forward_tile", "FORWARD_TILE", parse_forward_tiles),
                ("flat_tile", "FLAT_TILE", parse_flat_tile))


def csv(value, cast=str):
    return [cast(v) for v in value.split(",") if v.strip()] if value else None


def common_settings(args, budget_s: float) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine")
    try:
        knobs = json.loads(args.sparse_kwargs)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--sparse-kwargs: not a JSON dict: {err}") from None
    if args.reps is not None and args.reps < 1:
        raise SystemExit(f"--reps must be >= 1, got {args.reps}")
    for key, table, parse in KERNEL_TILES:
        spec = getattr(args, key, None)
        if spec:
            flag = "--" + key.replace("_", "-")
            tiles = parse(spec, flag=flag)
            if len(tiles) != 1:
                raise SystemExit(f"{flag}: one tile, got {spec!r}")
            getattr(ffn_kernels, table).update(tiles[0])
    return dict(
        device=device, gpu=gpu, tiny=args.tiny,
        dtype=args.dtype or ("bf16" if gpu else "fp32"),
        reps=args.reps or (2 if args.tiny else 10 if gpu else 5),
        warmup_min=1 if args.tiny else 3 if gpu else 2,
        warmup_max=args.warmup_max if args.warmup_max is not None else (2 if args.tiny else 30 if gpu else 8),
        settle_tol=args.settle_tol,
        budget_s=args.budget_s or budget_s,
        align=1 if args.tiny else max(1, args.align),
        sparse_kwargs=knobs,
        sample_ms=10.0 if gpu else 0.0,
        **{key: dict(getattr(ffn_kernels, table)) for key, table, _ in KERNEL_TILES},
    )


def configure_torch(S):
    if S["gpu"]:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # many modules of one class are compiled one after another: never fall back to eager for that
    for name, value in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)
    transformers.logging.set_verbosity_error()
    for key, table, _ in KERNEL_TILES:  # a fresh (spawned) process starts from the default tiles: the run's, as in its parent
        if S.get(key):
            getattr(ffn_kernels, table).update(S[key])


# ============================================================================ environment
def _git(repo, *cmd) -> str:
    res = subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, timeout=30)
    if res.returncode:
        raise RuntimeError(res.stderr.strip() or f"git {' '.join(cmd)} failed")
    return res.stdout


def git_state(repo=REPO, ignore=(RESULTS_DIR,)) -> dict:
    """``commit`` of HEAD and whether the tree is clean; a dirty tree adds ``diff_sha256`` and the files.

    Paths under ``ignore`` (the results folder the benchmarks write to) do not make the tree dirty.
    """
    try:
        commit = _git(repo, "rev-parse", "HEAD").strip()
        lines = [ln for ln in _git(repo, "status", "--porcelain", "--untracked-files=all").splitlines() if ln.strip()]
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        return dict(commit=None, dirty=None, git_error=str(err)[:300])
    changed = [ln[3:] for ln in lines if not any(ln[3:].startswith(p) for p in ignore)]
    state = dict(commit=commit, dirty=bool(changed))
    if changed:
        diff = _git(repo, "diff", "HEAD", "--", ".", *[f":(exclude){p}" for p in ignore])
        untracked = [p for ln, p in zip(lines, [ln[3:] for ln in lines]) if ln.startswith("??") and p in changed]
        h = hashlib.sha256(diff.encode())
        for path in untracked:
            full = Path(repo) / path
            if full.is_file():
                h.update(path.encode() + b"\0" + full.read_bytes())
        state.update(diff_sha256=h.hexdigest(), dirty_files=changed[:50])
    return state


def source_sha256(root=REPO, folders=("modeling_sparse_gpt2", "benchmarks")) -> str:
    """sha256 over the paths and bytes of the ``.py`` files of ``folders``: names the code measured
    even where no ``.git`` travels with the tree (recompute it at a commit to check a results file)."""
    h = hashlib.sha256()
    for path in sorted(p for f in folders for p in Path(root, f).rglob("*.py") if "__pycache__" not in p.parts):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def warn_if_dirty(state: dict):
    if state.get("commit") is None:
        print(f"\n!!! WARNING: no git commit recorded ({state.get('git_error')}); these results name no code version.\n",
              file=sys.stderr, flush=True)
    elif state["dirty"]:
        print(f"\n!!! WARNING: the tree has uncommitted changes ({len(state['dirty_files'])} files, diff sha256 "
              f"{state['diff_sha256'][:12]}); the results record commit {state['commit'][:12]} + dirty: true.\n"
              "!!! Commit first for results that name the code they measured.\n", file=sys.stderr, flush=True)


def environment(device: str) -> dict:
    """Date, machine, versions, the command, the git state (``git_state``) and the GPU, if any."""
    env = dict(
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=platform.node(), platform=platform.platform(), cpu_count=os.cpu_count(),
        python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
        cuda=torch.version.cuda, command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        torch_threads=torch.get_num_threads(), gpu_name=None, triton=None,
    )
    env.update(git_state(), source_sha256=source_sha256())
    with contextlib.suppress(ImportError):
        import triton

        env["triton"] = triton.__version__
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_sm_count=props.multi_processor_count)
    return env


# ============================================================================ results and rows
def write_json_atomic(path, obj):
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


@contextlib.contextmanager
def one_thread(flush_denormal: bool = False):
    """One intra-op thread (and, with ``flush_denormal``, denormals flushed to zero) inside the block; the
    process's thread count and denormal mode are given back afterwards (a test run shares them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if flush_denormal:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flush_denormal:
            torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


class LaunchStub:
    """Count Triton's kernel launches; with ``stub`` (the CPU) force the kernels path of each
    ``ffn_kernels`` module and make the launches no-ops, so the op's host work can be timed where
    there is no GPU (``profile_host``, ``kernel_microbench --host``)."""

    def __init__(self, kernel_modules, stub: bool = True):
        self.modules, self.stub = kernel_modules, stub
        self.launches = 0

    def __enter__(self):
        self.kernel_type = type(self.modules[0]._forward_kernel)  # JITFunction (or the interpreter's)
        self.saved = self.kernel_type.run, [m.use_kernel for m in self.modules]
        launch = self.saved[0]

        def run(*args, **kwargs):
            self.launches += 1
            return None if self.stub else launch(*args, **kwargs)

        self.kernel_type.run = run
        if self.stub:
            for m in self.modules:
                m.use_kernel = lambda h: True
        return self

    def __exit__(self, *exc):
        self.kernel_type.run = self.saved[0]
        for m, fn in zip(self.modules, self.saved[1]):
            m.use_kernel = fn


class Budget:
    """Wall-clock budget of a run: measurements not started before it ends are recorded as skipped."""

    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def exhausted(self) -> bool:
        return self.elapsed() > self.seconds


class Results:
    """The results file of one run: ``environment``, ``settings``, then one entry per section."""

    def __init__(self, path, S: dict, benchmark: str):
        self.path = Path(path).absolute()
        self.budget = Budget(S["budget_s"])
        env = environment(S["device"])
        warn_if_dirty(env)
        self.data = dict(benchmark=benchmark, environment=env, settings=S)

    def section(self, name: str, S: dict) -> list:
        """The rows of section ``name`` (created with its settings ``S``)."""
        entry = self.data.setdefault(name, {"settings": S, "rows": []})
        return entry["rows"]

    def save(self):
        self.data["elapsed_s"] = round(self.budget.elapsed(), 1)
        write_json_atomic(self.path, self.data)

    def measure(self, rows: list, row: dict, fn, label: str = "") -> dict:
        """Run ``fn() -> dict`` into ``row`` (status ok / error), or skip it when the budget is spent.

        The row is appended to ``rows`` and the file saved whatever happens.
        """
        if self.budget.exhausted():
            row.update(status="skipped", reason=f"time budget ({self.budget.seconds:.0f} s) spent")
        else:
            try:
                row.update(fn())
                row["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 -- one failure must not hide the other rows
                row.update(status="error", **error_record(exc))
                reset_compiler()
        rows.append(row)
        self.save()
        print(f"  [{self.budget.elapsed():5.0f}s] {label:40s} {row_summary(row)}", flush=True)
        return row


def skip(rows: list, row: dict, reason: str, results: Results | None = None) -> dict:
    row.update(status="skipped", reason=reason)
    rows.append(row)
    if results is not None:
        results.save()
    return row


def row_summary(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('reason') or row.get('error', '')}"[:200]
    parts = [f"{k} {row[k]['median_ms']:.3f} ms" for k in ("fwd", "fwd_bwd") if isinstance(row.get(k), dict)]
    if "median_ms" in row:
        parts.append(f"{row['median_ms']:.3f} ms")
    if row.get("tokens_per_s"):
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    return ", ".join(parts)


def error_record(exc: BaseException) -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return dict(error=f"{type(exc).__name__}: {exc}"[:2000], traceback="".join(tb[-3:])[-3000:])


def model_name(kind: str, target) -> str:
    """How rows and tables name a model: ``dense``, ``sparse@0.4``, ``ideal@0.4``, ``pruned@0.4``."""
    return kind if kind == "dense" or target is None else f"{kind}@{target}"


def ratio(a, b):
    """a / b, or None when either was not measured."""
    return None if a is None or b is None or b == 0 else a / b


def add_ratios(rows: list, values: dict, keys: dict):
    """Beside each row, ``values[name](row) / values[name](reference)`` for the reference row of each
    kind in ``keys`` (``{"dense": key_fn, "ideal": key_fn}``, matched on ``key_fn(row)``): fields
    ``<name>_vs_<kind>``, ``None`` where the row or its reference was not measured."""
    for ref_kind, key in keys.items():
        refs = {key(r): r for r in rows if r.get("kind") == ref_kind and r.get("status") == "ok"}
        for r in rows:
            ref = refs.get(key(r))
            for name, get in values.items():
                mine = get(r) if r.get("status") == "ok" else None
                r[f"{name}_vs_{ref_kind}"] = ratio(mine, get(ref) if ref is not None else None)


def add_stage_ratios(rows: list):
    """Time (and kernel time) over dense's and the ideal's of the same stage, mode, batch (and target)."""
    values = {"median_ms": lambda r: r["median_ms"], "gpu_kernel_ms": lambda r: r.get("gpu_kernel_ms")}
    add_ratios(rows, values, keys={"dense": lambda r: (r.get("stage"), r.get("mode"), r.get("batch")),
                                   "ideal": lambda r: (r.get("stage"), r.get("mode"), r.get("batch"), r.get("target"))})


def run_main(parse_args, settings, bench, argv, benchmark: str) -> dict:
    """A benchmark's ``main``: flags -> settings -> results file -> ``bench`` -> the results."""
    args = parse_args(argv)
    S = settings(args)
    configure_torch(S)
    results = Results(args.output, S, benchmark=benchmark)
    warm_gpu(S)
    bench(S, results)
    return results.data


# ============================================================================ timing
def sync(S):
    if S["gpu"]:
        torch.cuda.synchronize()


def _sampler(fn, S, inner: int):
    """One timed sample: ``inner`` back-to-back calls of ``fn``, mean ms per call (CUDA events on GPU)."""

    def sample() -> float:
        if S["gpu"]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) * 1e3 / inner

    return sample


def settled_at(times: list, tol: float, window: int = SETTLE_WINDOW) -> int | None:
    """The first count n of samples after which the median of the last ``window`` moved by less than
    ``tol`` (relative) against the median of the window one sample earlier; None if it never did."""
    for n in range(window + 1, len(times) + 1):
        now, before = statistics.median(times[n - window : n]), statistics.median(times[n - window - 1 : n - 1])
        if abs(now - before) <= tol * before:
            return n
    return None


def settle(sample, min_samples: int, max_samples: int, tol: float) -> dict:
    """Warm up: call ``sample() -> ms`` until ``settled_at`` the samples so far and at least
    ``min_samples`` ran; stop at ``max_samples`` (then ``settled`` is False)."""
    times = []
    settled = False
    while len(times) < max_samples and not settled:
        times.append(sample())
        settled = len(times) >= min_samples and settled_at(times[-SETTLE_WINDOW - 1 :], tol) is not None
    return dict(warmup_samples=len(times), settled=settled, warmup_ms=[round(t, 4) for t in times])


def time_fn(fn, S, reps: int | None = None, min_sample_ms: float | None = None) -> dict:
    """Median ms of ``fn()`` after a settled warm-up (``settle``), with every sample recorded.

    With ``min_sample_ms`` a sample runs ``fn`` back to back often enough to last that long and
    reports the mean per call: the host queues work ahead of the GPU, so a sub-millisecond kernel
    sequence is timed by the GPU, not by the host's launch latency per call.
    """
    reps = reps or S["reps"]
    min_sample_ms = S["sample_ms"] if min_sample_ms is None else min_sample_ms
    sync(S)
    t0 = time.perf_counter()
    fn()
    sync(S)
    once_ms = (time.perf_counter() - t0) * 1e3
    inner = int(max(1, min(200, math.ceil(min_sample_ms / max(once_ms, 1e-3))))) if min_sample_ms else 1
    sample = _sampler(fn, S, inner)
    out = settle(sample, S["warmup_min"], S["warmup_max"], S["settle_tol"])
    times = [sample() for _ in range(reps)]
    half = len(times) // 2
    drift = statistics.median(times[half:]) / statistics.median(times[:half]) - 1 if half else None
    out.update(median_ms=statistics.median(times), min_ms=min(times), calls_per_sample=inner,
               reps_ms=[round(t, 4) for t in times], drift=drift)
    return out


def first_call_s(fn, S) -> float:
    """Seconds of the first call (it compiles, for a compiled callable)."""
    sync(S)
    t0 = time.perf_counter()
    fn()
    sync(S)
    return round(time.perf_counter() - t0, 3)


def kernel_ms_of_events(events) -> float:
    """Total ms of the device-side events (kernels, memcpy, memset) of ``prof.events()``, each once.

    A CPU operator's ``device_time_total`` holds the time of the kernels it launched, which are
    also events of their own: summing every row (as ``key_averages()`` does) counts them twice.
    """
    return sum(e.device_time_total for e in _device_events(events)) / 1e3


def _device_events(events):
    """Kernels, memcpy and memset of ``prof.events()``: device-side, and not a range annotation (a compiled
    graph's ``## Call CompiledFxGraph ... ##`` spans its kernels on the device timeline too)."""
    from torch.autograd import DeviceType

    return [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]


def kernel_breakdown(events, calls: int) -> list[dict]:
    """The device-side events of ``prof.events()`` grouped by kernel name, slowest first: ``name``,
    ``ms`` (total per call) and ``launches`` per call; their ``ms`` add up to ``kernel_ms_of_events``."""
    by_name: dict = {}
    for e in _device_events(events):
        ms, n = by_name.get(e.name, (0.0, 0))
        by_name[e.name] = (ms + e.device_time_total / 1e3, n + 1)
    rows = [dict(name=name, ms=ms / calls, launches=n / calls) for name, (ms, n) in by_name.items()]
    return sorted(rows, key=lambda row: -row["ms"])


def gpu_kernel_ms(fn, S, calls: int = 3):
    """Mean GPU kernel ms per ``fn()`` call under ``torch.profiler`` (None on the CPU).

    Beside the wall time of back-to-back calls this tells whether a path is bound by the GPU
    (the two agree) or by the host launching kernels (wall time well above kernel time).
    """
    if not S["gpu"]:
        return None
    sync(S)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        sync(S)
    return kernel_ms_of_events(prof.events()) / calls


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


def reset_compiler():
    torch._dynamo.reset()


def add_isolation_arg(p, what: str):
    """--isolation, one declaration for the sections that can measure each model in its own process."""
    p.add_argument("--isolation", default=None, choices=["process", "none"],
                   help=f"{what} each model in a fresh process (default on GPU) or in this one")


def isolation(args, S) -> bool:
    return (args.isolation or ("process" if S["gpu"] else "none")) == "process"


def model_in_fresh_process(S, target, kind):
    """The one model an isolated worker times, built as the parent builds it."""
    configure_torch(S)
    models, _ = build_models(S["model"], target, S, kinds=(kind,))
    return models[kind]


def in_fresh_process(fn, *args) -> dict:
    """``fn(*args)`` (a module-level function) in a fresh, spawned process: no compiled code, CUDA graph
    pool, allocator or host state left over from the models measured before it. On the H200 the
    host-bound rows (prefill, ``generate``) of models measured one after another in one process
    depended on their order (docs/benchmarks.md §3.9)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        out = pool.apply(fn, args)
    out["isolated_process"] = True
    return out


def free_memory(S):
    gc.collect()
    if S["gpu"]:
        torch.cuda.empty_cache()


# ============================================================================ model builders
def gpt2_config(shape: dict, **extra) -> GPT2Config:
    """A dropout-free GPT-2 config of ``shape`` (speed does not depend on dropout's randomness)."""
    kw = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **SMALL_TOKEN_IDS)
    kw.update(shape)
    kw.update(extra)
    return GPT2Config(**kw)


def solve_sparse_config(dense_config: GPT2Config, target: float, align: int = 1, **knobs):
    """The sparse config of ``dense_config`` at FFN FLOPs ``target``: the conversion's budget solver.

    The one place the benchmarks call the solver (point this import at its new home when it moves).
    ``knobs`` are conversion arguments (``sparse_components``, ``k_freq``, ...). With ``align > 1``
    the kept neurons are then reduced until the fused down-projection width is a multiple of
    ``align`` (unaligned bf16 GEMM widths ran up to ~2x slower on an H200), so the FLOPs ratio lands
    a little under the target; the achieved ratio is what the rows report.
    """
    from modeling_sparse_gpt2.tooling.conversion import ConversionArguments, sparse_config_for_budget

    config = sparse_config_for_budget(dense_config, ConversionArguments(ffn_flops_ratio=target, **knobs))
    if align > 1:
        f = dense_config.n_inner or 4 * dense_config.n_embd
        keep = config.poly_keep_ratio
        keeps = keep if isinstance(keep, list) else [keep] * dense_config.n_layer
        excess = fused_width(_meta_ffn(config)) % align
        config.poly_keep_ratio = [max(1, round(k * f) - excess) / f for k in keeps]
    return config


def _meta_ffn(config):
    one_layer = copy.deepcopy(config)
    one_layer.n_layer = 1
    if isinstance(one_layer.poly_keep_ratio, list):
        one_layer.poly_keep_ratio = one_layer.poly_keep_ratio[:1]
    with torch.device("meta"), no_init_weights():
        return sparse_ffns(SparseGPT2LMHeadModel(one_layer))[0]


def fused_width(ffn) -> int:
    """Rows of the sparse FFN's fused down-projection (its ``c_fc`` width): the ideal's ``n_inner``."""
    return ffn.c_fc.out_features


def ffn_flops_ratio(model) -> float:
    return model.flops_report(batch_size=1, seq_len=1)["FLOPs/ffn_ratio"]


def _count(modules, what="parameters") -> int:
    seen, total = set(), 0
    for m in modules:
        for t in getattr(m, what)():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
    return total


def param_counts(model) -> dict:
    mlps = [blk.mlp for blk in model.transformer.h]
    return dict(params=_count([model]), ffn_params=_count(mlps), ffn_buffers=_count(mlps, "buffers"))


def build_models(shape: dict, target: float, S: dict, kinds=("dense", "sparse", "ideal")):
    """``{kind: model}`` and ``{kind: info}`` for GPT-2s of ``shape``: dense, sparse at FFN FLOPs
    ``target`` (built by the package from the solver's config) and the ideal (plain GPT-2 with
    ``n_inner`` = the sparse FFN's fused width). Random weights, seed 0, on ``S["device"]``, fp32."""
    dense_config = gpt2_config(shape)
    sparse_config = solve_sparse_config(dense_config, target, S["align"], **S["sparse_kwargs"])
    width = fused_width(_meta_ffn(sparse_config))
    configs = dict(dense=dense_config, sparse=sparse_config, ideal=gpt2_config(shape, n_inner=width))
    models, info = {}, {}
    for kind in kinds:
        torch.manual_seed(0)
        model = (SparseGPT2LMHeadModel if kind == "sparse" else GPT2LMHeadModel)(configs[kind])
        model.to(S["device"]).train()
        f_dense = 4 * shape["n_embd"]
        inner = width if kind != "dense" else f_dense
        flops = ffn_flops_ratio(model) if kind == "sparse" else inner / f_dense
        models[kind] = model
        info[kind] = dict(target=None if kind == "dense" else target, ffn_flops_ratio=flops, inner=inner,
                          **param_counts(model))
        if kind == "sparse":
            info[kind].update(components=list(sparse_config.sparse_components),
                              poly_keep_ratio=sparse_config.poly_keep_ratio[0])
    return models, info


def models_per_target(S: dict, results: Results, section: str):
    """For each FFN FLOPs target of ``S["ratios"]``: ``(target, kinds, models, info)`` from
    ``build_models`` (dense for the first target only: one reference for every target); a build
    that fails is an error row of ``section``; compiled code and memory are freed after each."""
    rows = results.section(section, S)
    models_info = results.data[section].setdefault("models", {})
    for i, target in enumerate(S["ratios"]):
        kinds = ("dense", "sparse", "ideal") if i == 0 else ("sparse", "ideal")
        try:
            models, info = build_models(S["model"], target, S, kinds=kinds)
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(kind="sparse", target=target, status="error", **error_record(exc)))
            results.save()
            continue
        models_info.update({model_name(kind, v["target"]): v for kind, v in info.items()})
        yield target, kinds, models, info
        del models
        reset_compiler()
        free_memory(S)


def build_ffns(d: int, target: float, S: dict):
    """``{kind: module}`` and ``{kind: info}`` of the FFN alone at width ``d`` (inner 4d): GPT-2's
    MLP (dense), the sparse FFN of a one-block sparse GPT-2 at FFN FLOPs ``target`` and the ideal
    ``GPT2MLP`` of the sparse FFN's fused width; in ``S["dtype"]`` on ``S["device"]``."""
    shape = dict(n_embd=d, n_layer=1, n_head=max(1, d // 64), vocab_size=8, n_positions=1024)
    models, info = build_models(shape, target, S, kinds=("sparse",))
    ffns = dict(sparse=models["sparse"].transformer.h[0].mlp)
    config = gpt2_config(shape)
    torch.manual_seed(0)
    ffns["dense"] = _init_dense_mlp(GPT2MLP(4 * d, config))
    ffns["ideal"] = _init_dense_mlp(GPT2MLP(info["sparse"]["inner"], config))
    info["dense"] = dict(target=None, ffn_flops_ratio=1.0, inner=4 * d)
    info["ideal"] = dict(target=target, ffn_flops_ratio=info["sparse"]["inner"] / (4 * d), inner=info["sparse"]["inner"])
    info["sparse"] = {k: v for k, v in info["sparse"].items() if not k.endswith("params") and k != "ffn_buffers"}
    for kind, m in ffns.items():
        m.to(S["device"], DTYPES[S["dtype"]]).train()
        info[kind]["params"] = _count([m])
    return {k: ffns[k] for k in ("dense", "sparse", "ideal")}, {k: info[k] for k in ("dense", "sparse", "ideal")}


def _init_dense_mlp(mlp: GPT2MLP) -> GPT2MLP:
    with torch.no_grad():
        mlp.c_fc.weight.normal_(std=0.02)
        mlp.c_fc.bias.zero_()
        mlp.c_proj.weight.normal_(std=0.02 / math.sqrt(2))
        mlp.c_proj.bias.zero_()
    return mlp


def inference_copy(model, S):
    """The model as it is served: ``S["dtype"]``, eval mode."""
    return copy.deepcopy(model).to(DTYPES[S["dtype"]]).eval()


def matmul_flops_per_token(module) -> int:
    """Forward matmul FLOPs per token (multiply-add = 2) of a GPT2MLP or an UltraEfficientSparseFFN."""
    if isinstance(module, GPT2MLP):
        d, f = module.c_fc.weight.shape
        return 4 * d * f
    return sum(mm for mm, _ in module.flops_per_token().values())

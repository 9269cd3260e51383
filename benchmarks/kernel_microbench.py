"""The sparse FFN's activation kernel between two GEMMs, against the dense MLP and the ideal.

    python -m benchmarks.kernel_microbench --output kernel_microbench.json   # on a CUDA GPU, bf16 (< 2 min on an H200)
    python -m benchmarks.kernel_microbench --smoke                           # CPU check of this script
    TRITON_INTERPRET=1 python -m benchmarks.kernel_microbench --smoke        # ... with the kernels interpreted
    python -m benchmarks.kernel_microbench --smoke --host                    # + the op's host time per call

For each width d (768, 1024, 1280, 1600) and 8,192 tokens, at FFN FLOPs ratio 0.4 (activation width
n = 0.4 * 4d rounded to 64; spectral k = d // 16, feedback r = d // 48, polynomial m = n - k - r), it
times forward and forward+backward (medians of CUDA-event timings after a warm-up that runs until
the timings settle), eager for every width first, then under ``torch.compile``, of:

* dense: GPT-2's MLP, Linear(d, 4d) -> gelu_tanh -> Linear(4d, d) (eager only);
* ideal: the same MLP with inner width n;
* sparse: c_fc = Linear(d, n + n_gates) -> ``sparse_ffn_activation`` -> c_proj = Linear(n, d).

After the eager rows it times the op's backward by itself at each width (``_backward``: both
kernels, the partial sums and their reduction into the parameters' gradients), against
``gelu_backward`` of the ideal's width, with each kernel's GPU time from ``torch.profiler``, and
at the first width under each backward tile of ``--sweep`` (wall time of ``_backward`` and each
kernel's GPU time; ``r``: the coefficient gradients summed in registers, ``BACKWARD_TILE["in_registers"]``;
``f``: the next tile's loads issued before this one's arithmetic; ``pN``: N token programs per
column tile). Before them, at the first width, the op's forward (``_forward``, one kernel) under each
forward tile of ``--forward-sweep`` (TOKENSxCOLUMNSxWARPS), against the ideal's ``gelu``. ``--fastest-of FILE`` prints
the tile whose polynomial backward kernel was fastest, for ``bench_* --backward-tile``. Rows past ``--budget-s`` seconds are
skipped and listed (``skipped``). ``--host`` adds the op's host time per call on the CPU with
Triton's launcher stubbed out (``host_cost``).

Before timing it checks the kernels against ``sparse_ffn_activation_reference`` on the device (max
|diff| of the output and of every gradient, fp32 and bf16), runs ``torch.library.opcheck`` on the
ops, and compiles a forward+backward step through the op with ``torch.compile(fullgraph=True)``.
Needs torch, triton and the package (``modeling_sparse_gpt2.ffn_kernels``).
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import (FLAT_SIDES, backward_tile, flat_item_name, flat_item_side, flat_tile,  # noqa: E402
                                forward_tile, parse_flat_tile_items, parse_forward_tiles, parse_tiles, tile_name)
from modeling_sparse_gpt2 import ffn_kernels as fk  # noqa: E402

DEGREE, DOMAIN, WINDOW = 8, 4.0, 4


def widths(d: int, ratio: float, polynomial_only: bool = False):
    """(m, k, r): the activation width n = ratio * 4d (a multiple of 64), all polynomial, or less the
    spectral k = d // 16 and feedback r = d // 48 columns."""
    n = max(64, 64 * round(ratio * 4 * d / 64))
    if polynomial_only:
        return n, 0, 0
    k, r = max(1, d // 16), max(1, d // 48)
    return n - k - r, k, r


class DenseMLP(nn.Module):
    def __init__(self, d, inner):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(d, inner), nn.Linear(inner, d)

    def to_dtype(self, dtype):
        return self.to(dtype)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class SparseMLP(nn.Module):
    """c_fc -> sparse_ffn_activation -> c_proj, the op's small parameters in fp32; the coefficient mask
    is the conversion's (T_0, T_1 and the even terms: the kernels' half-degree path)."""

    def __init__(self, d, m, k, r, token_gates=False, per_neuron=False):
        super().__init__()
        n_seg = (m > 0) + (k > 0) + (r > 0)
        self.meta = dict(m=m, k=k, r=r, n_gates=n_seg if token_gates else 0, domain=DOMAIN, degree=DEGREE)
        self.c_fc, self.c_proj = nn.Linear(d, m + k + r + self.meta["n_gates"]), nn.Linear(m + k + r, d)
        coeffs = gelu_chebyshev(DEGREE, DOMAIN)
        self.coeffs = nn.Parameter(coeffs.repeat(m, 1) if per_neuron else coeffs)
        self.register_buffer("coeff_mask", torch.tensor([float(i < 2 or i % 2 == 0) for i in range(DEGREE + 1)]))
        self.gates = nn.Parameter(torch.ones(n_seg))
        self.fb_kernel = nn.Parameter(torch.randn(r, WINDOW) * 0.3) if r else None  # no feedback: no taps

    def to_dtype(self, dtype):
        self.c_fc.to(dtype)
        self.c_proj.to(dtype)
        return self

    def forward(self, x, token_mask=None):
        h = self.c_fc(x)
        a = fk.sparse_ffn_activation(h, self.coeffs, self.coeff_mask, self.gates, self.fb_kernel, None, token_mask,
                                     **self.meta)
        return self.c_proj(a)


def gelu_chebyshev(degree, domain):
    """Least-squares Chebyshev coefficients of gelu - relu(h - s) on [-s, s] (what conversion fits)."""
    n = 64
    h = torch.cos(math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n) * domain
    t = h / domain
    basis = [torch.ones_like(t), t]
    for _ in range(2, degree + 1):
        basis.append(2 * t * basis[-1] - basis[-2])
    b = torch.stack(basis[: degree + 1], -1)
    target = F.gelu(h, approximate="tanh") - F.relu(h - domain)
    return torch.linalg.lstsq(b, target[:, None]).solution[:, 0].float()


TIMING = dict(inner=5, reps=25, max_warmup=200)  # --smoke: a few calls only


def cuda_time(fn):
    """Median ms per call: calls are timed ``inner`` at a time (CUDA events on a GPU, the wall
    clock on the CPU), after a warm-up that ends when the median of the last 5 timings is within 2%
    of the 5 before (or ``max_warmup`` timings)."""
    inner, reps, max_warmup = TIMING["inner"], TIMING["reps"], TIMING["max_warmup"]
    gpu = torch.cuda.is_available()

    def once():
        if not gpu:
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            return (time.perf_counter() - start) * 1e3 / inner
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / inner

    history = [once() for _ in range(min(10, max_warmup))]
    while len(history) < max_warmup:
        a, b = statistics.median(history[-10:-5]), statistics.median(history[-5:])
        if abs(a - b) <= 0.02 * b:
            break
        history.append(once())
    return statistics.median([once() for _ in range(reps)])


def time_model(model, x, gy, compiled):
    fn = torch.compile(model) if compiled else model
    params = [p for p in model.parameters() if p.requires_grad]

    def fwd():
        with torch.no_grad():
            fn(x)

    def fwd_bwd():
        torch.autograd.grad(fn(x), [x] + params, gy)

    return cuda_time(fwd), cuda_time(fwd_bwd)


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def check_correctness(device, tokens, d=768, m=300, k=48, r=16):
    """Kernel vs reference on the device: output and gradients, fp32 and bf16, three layouts: all three
    segments with and without token gates and per-neuron coefficients (the tiled kernels), and the
    polynomial-only FFN with one series (the flat kernels)."""
    out = []
    g = torch.Generator(device="cpu").manual_seed(0)
    layouts = ((k, r, False, False, False), (k, r, True, True, True), (0, 0, False, False, False))
    for dtype in (torch.float32, torch.bfloat16):
        for k, r, token_gates, per_neuron, padded in layouts:
            mod = SparseMLP(d, m, k, r, token_gates, per_neuron).to(device)
            meta = mod.meta
            batch, seq = 4, tokens // 4
            h = (torch.randn(batch, seq, m + k + r + meta["n_gates"], generator=g) * 3).to(device, dtype)
            with torch.no_grad():
                h[0, 0, :m] = torch.linspace(-1e4, 1e4, m)  # the linear tail
            mask = None
            if padded:
                mask = torch.ones(batch, seq, dtype=torch.long, device=device)
                mask[-1, : seq // 3] = 0
            leaves = [h.requires_grad_(), mod.coeffs, mod.gates] + ([mod.fb_kernel] if r else [])
            args = (mod.coeffs, mod.coeff_mask, mod.gates, mod.fb_kernel, None, mask)
            want = fk.sparse_ffn_activation_reference(h, *args, **meta)
            gy = torch.randn_like(want)
            want_g = torch.autograd.grad(want, leaves, gy)
            got = fk.sparse_ffn_activation(h, *args, **meta)
            got_g = torch.autograd.grad(got, leaves, gy)
            row = dict(dtype=str(dtype).split(".")[-1], k=k, r=r, token_gates=token_gates, per_neuron=per_neuron,
                       padded=padded, finite=bool(torch.isfinite(got).all()), act=max_err(got, want))
            for name, a, b in zip(("grad_h", "grad_coeffs", "grad_gates", "grad_fb_kernel"), got_g, want_g):
                row[name] = max_err(a, b)
                row[name + "_scale"] = b.float().abs().max().item()
            out.append(row)
    return out


def check_opcheck(device):
    mod = SparseMLP(64, 20, 4, 3, token_gates=True, per_neuron=True).to(device)
    meta = mod.meta
    h = torch.randn(2, 9, 27 + meta["n_gates"], device=device, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.long, device=device)
    tail = tuple(meta[n] for n in ("m", "k", "r", "n_gates", "domain", "degree"))
    res = {"functional": torch.library.opcheck(
        torch.ops.sparse_gpt2.ffn_activation, (h, mod.coeffs, mod.coeff_mask, mod.gates, mod.fb_kernel, None, mask,
                                               *tail))}
    state = torch.randn(2, WINDOW - 1, 3, device=device)
    args = (h.detach()[:, :1], mod.coeffs.detach(), mod.coeff_mask, mod.gates.detach(), mod.fb_kernel.detach(), state,
            mask, *tail)
    res["stateful"] = torch.library.opcheck(torch.ops.sparse_gpt2.ffn_activation_stateful, args)
    return res


def check_fullgraph(device, d, tokens):
    """torch.compile(fullgraph=True) of the sparse FFN, forward and backward, equals eager."""
    m, k, r = widths(d, 0.4)
    mod = SparseMLP(d, m, k, r, token_gates=True).to(device).to_dtype(torch.bfloat16)
    x = torch.randn(4, tokens // 4, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    params = [x] + list(mod.parameters())
    eager = mod(x)
    gy = torch.randn_like(eager)
    eager_g = torch.autograd.grad(eager, params, gy)
    try:
        compiled = torch.compile(mod, fullgraph=True)
        got = compiled(x)
        got_g = torch.autograd.grad(got, params, gy)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    return {"ok": True, "act": max_err(got, eager), "grads": [max_err(a, b) for a, b in zip(got_g, eager_g)]}


def op_inputs(device, dtype, d, tokens, ratio, token_gates, polynomial_only=False):
    """The op's inputs at width d: ((m, k, r), h (sequences of 1,024 tokens, |h| ~ 3), the parameters
    (coeffs, coeff_mask, gates, taps or None), the op's trailing arguments (m, k, r, n_gates, domain, degree))."""
    m, k, r = widths(d, ratio, polynomial_only)
    mod = SparseMLP(d, m, k, r, token_gates).to(device)
    meta = mod.meta
    batch = max(1, tokens // 1024)
    h = torch.randn(batch, tokens // batch, m + k + r + meta["n_gates"], device=device, dtype=dtype) * 3
    par = (mod.coeffs.detach(), mod.coeff_mask, mod.gates.detach(), mod.fb_kernel.detach() if r else None)
    return (m, k, r), h, par, tuple(meta[n] for n in ("m", "k", "r", "n_gates", "domain", "degree"))


def backward_alone(device, dtype, d, tokens, ratio, token_gates, sweep=(), polynomial_only=False):
    """The op's backward by itself at width d: ms per call of ``_backward`` (its kernels, the partial
    sums' reduction into the parameters' gradients, the token-gate row sums), against
    ``gelu_backward`` of the ideal's width; each kernel's own GPU time from ``torch.profiler``; then
    ``_backward`` under each backward tile of ``sweep`` (``BACKWARD_TILE`` updates, ``harness.parse_tiles``),
    its wall time and its kernels' GPU times."""
    (m, k, r), h, par, tail = op_inputs(device, dtype, d, tokens, ratio, token_gates, polynomial_only)
    grad = torch.randn(*h.shape[:2], m + k + r, device=device, dtype=dtype)

    def bwd():
        return fk._backward(grad, h, *par, None, None, *tail)

    row = dict(d=d, m=m, k=k, r=r, backward_ms=cuda_time(bwd))
    gelu_h, gelu_g = h[..., : m + k + r].contiguous(), grad.contiguous()
    row["gelu_backward_ms"] = cuda_time(lambda: torch.ops.aten.gelu_backward(gelu_g, gelu_h, approximate="tanh"))
    row["backward_vs_gelu"] = row["backward_ms"] / row["gelu_backward_ms"]
    if torch.cuda.is_available():
        row["kernel_ms"] = kernel_ms(bwd)
    row["sweep"] = timed_tiles(backward_tile, sweep, bwd, "backward_ms")
    return row


def timed_tiles(tile_context, tiles, fn, key):
    """Under each tile (``tile_context``: ``harness.backward_tile`` or ``forward_tile``), ``fn``'s time per
    call as ``key`` and, on a GPU, each kernel's GPU time (``kernel_ms``)."""
    entries = []
    for tile in tiles:
        with tile_context(tile):
            entry = dict(tile, **{key: cuda_time(fn)})
            if torch.cuda.is_available():
                entry["kernel_ms"] = kernel_ms(fn)
        entries.append(entry)
    return entries


def forward_alone(device, dtype, d, tokens, ratio, token_gates, sweep, polynomial_only=False):
    """The op's forward by itself at width d (``_forward``, one kernel) under each forward tile of
    ``sweep`` (``FORWARD_TILE`` updates), its wall time and its kernel's GPU time, against the ideal's
    ``gelu`` (tanh) of the same width."""
    (m, k, r), h, par, tail = op_inputs(device, dtype, d, tokens, ratio, token_gates, polynomial_only)

    def fwd():
        return fk._forward(h, *par, None, None, *tail, False, direct=True)

    gelu_h = h[..., : m + k + r].contiguous()
    row = dict(d=d, m=m, k=k, r=r, gelu_ms=cuda_time(lambda: F.gelu(gelu_h, approximate="tanh")))
    if torch.cuda.is_available():
        row["gelu_kernel_ms"] = sum(kernel_ms(lambda: F.gelu(gelu_h, approximate="tanh")).values())
    row["sweep"] = timed_tiles(forward_tile, sweep, fwd, "forward_ms")
    return row


def flat_alone(device, dtype, d, tokens, ratio, sweep):
    """The polynomial-only FFN's op by itself at width d: forward (``_forward``) and backward (``_backward``,
    the reduction included) on the tiled kernels (``off``) and on the flat kernels under each item of ``sweep``
    (``harness.parse_flat_tile_items``: a ``fwd:`` item times the forward, a ``bwd:`` item the backward), their
    wall time per call and each kernel's GPU time, against the ideal's ``gelu`` and ``gelu_backward`` (tanh) of
    the same width."""
    (m, k, r), h, par, tail = op_inputs(device, dtype, d, tokens, ratio, False, polynomial_only=True)
    grad = torch.randn_like(h)
    gelu_h = h.contiguous()

    def fwd():
        return fk._forward(h, *par, None, None, *tail, False, direct=True)

    def bwd():
        return fk._backward(grad, h, *par, None, None, *tail, direct=True)

    def gelu():
        return F.gelu(gelu_h, approximate="tanh")

    def gelu_backward():
        return torch.ops.aten.gelu_backward(grad, gelu_h, approximate="tanh")

    gpu = torch.cuda.is_available()
    row = dict(d=d, m=m, gelu_ms=cuda_time(gelu), gelu_backward_ms=cuda_time(gelu_backward))
    if gpu:
        row["gelu_kernel_ms"], row["gelu_backward_kernel_ms"] = kernel_ms(gelu), kernel_ms(gelu_backward)
    entries = []
    for item in parse_flat_tile_items("off") + list(sweep):
        with flat_tile(item):
            for side, fn in (("forward", fwd), ("backward", bwd)):
                if flat_item_side(item) not in (None, side):
                    continue  # an item times its own side; the tiled kernels ('off') both
                entry = dict(item=flat_item_name(item), side=side, ms=cuda_time(fn))
                if gpu:
                    entry["kernel_ms"] = kernel_ms(fn)
                    entry["kernels_ms"] = sum(entry["kernel_ms"].values())
                entries.append(entry)
    row["sweep"] = entries
    return row


def fastest_flat(result: dict) -> str:
    """The sweep's fastest forward and backward, each the flat item or the tiled kernels (``off``) whose kernels
    took the least GPU time, as ``--flat-tile``: ``fwd:...+bwd:...``, ``fwd:off`` / ``bwd:off`` for a side where
    the tiled kernels were faster, ``off`` where they were on both."""
    best = {}
    for row in result.get("flat", []):
        for entry in row.get("sweep", []):
            if entry.get("kernels_ms") is not None:
                side = entry["side"]
                if side not in best or entry["kernels_ms"] < best[side]["kernels_ms"]:
                    best[side] = entry
    if not best:
        raise SystemExit("kernel_microbench --fastest-flat-of: no flat sweep entry with a GPU time")
    items = [best[side]["item"] if best[side]["item"] != "off" else f"{prefix}:off"
             for side, prefix, *_ in FLAT_SIDES if side in best]
    return "off" if all(item.endswith(":off") for item in items) else "+".join(items)


def kernel_ms(fn, calls=10) -> dict:
    """GPU time per call of each kernel ``fn`` launches (``torch.profiler``, mean of ``calls`` calls)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if us:
            kernels[e.key] = us / calls / 1e3
    return kernels


# The backward tiles --sweep times by default: the default tile (2x64, one warp, 20 per SM), the former ones
# (4x128, 4 warps, 8 per SM; 64x128, 8 warps, per-tile sums), then tiles of one to eight elements per thread with
# the coefficient sums in registers and prefetched loads, at programs per SM around what an SM holds at once
# (`kernel_registers`' resident/SM on sm_90: 5 for 4x128x4rf, 10 for 2x128x2rf and 4x64x2rf, 20 for 2x64x1rf,
# 32 for 1x64x1rf and 2x32x1rf).
SWEEP = ("1x512x2rf,1x256x1rfs12,1x256x1rfs6,2x128x1rfs12,4x64x1rfs12,2x64x1rfs21,2x64x1rfs42,1x128x1rfs21,2x32x1rfs28,"
         "2x256x2rfs6,4x128x4rfs4,64x128x8s8")


# The forward tiles --forward-sweep times by default: the default (32 x 64, 4 warps: 16 elements a thread), and
# tiles of 4 to 16 elements a thread, wider rows (longer contiguous loads) and more warps.
FORWARD_SWEEP = "32x64x4,16x64x4,16x128x4,8x128x4,8x256x4,32x128x8,16x256x8,64x64x8,8x64x2,4x256x4"


# The flat-kernel settings --flat-sweep times by default: the default forward (1,024 elements a block, 4 warps, 16
# programs per SM, Horner) and backward (1,024, 4 warps, 4 per SM, prefetched), each against other programs per SM,
# elements per thread (4 to 16) and warps, Clenshaw's recurrence, loads not prefetched (each one's registers, spills
# and loop instructions on sm_90: `kernel_registers --flat`, docs/benchmarks.md §3.17).
FLAT_SWEEP = ("fwd:1024x4x16h,fwd:1024x4x8h,fwd:1024x4x4h,fwd:2048x4x8h,fwd:2048x8x4h,fwd:512x4x16h,fwd:4096x8x4h,"
              "fwd:1024x4x16,bwd:1024x4x4p,bwd:1024x4x2p,bwd:512x4x6p,bwd:512x4x4p,bwd:512x2x8p,bwd:1024x8x3p,"
              "bwd:256x1x16p,bwd:1024x4x4,bwd:2048x8x2p")


def fastest_tile(result: dict) -> str:
    """The sweep's tile whose polynomial backward kernel took the least GPU time, spelled for
    ``--backward-tile`` (``harness.tile_name``); from a results file of this script."""
    timed = [c for row in result.get("backward", []) for c in row.get("sweep", [])
             if c.get("kernel_ms", {}).get("_backward_kernel") is not None]
    if not timed:
        raise SystemExit("kernel_microbench --fastest-of: no sweep entry with a _backward_kernel GPU time")
    return tile_name(min(timed, key=lambda c: c["kernel_ms"]["_backward_kernel"]))


def host_us(fn, n=1000, reps=5):
    """Median wall-clock microseconds per call (CPU), after n // 10 warm-up calls."""
    for _ in range(n // 10):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(samples)


def host_cost(n=1000):
    """Host (CPU) time per call of the op's Python path with Triton's launcher stubbed out.

    ``use_kernel`` is forced on and the kernels' ``run`` (Triton's launcher: argument binding,
    specialization, the driver call) does nothing, so what is timed is everything the op does
    around it: the wrapper's checks and argument preparation, the dispatch (the direct eager path,
    or the registered ops: ``*_via_ops``), ``wrap_triton``, the output and partial-sum allocations
    and the reductions of the backward. Triton's own launcher cost comes on top of these. Tiny tensors (1 or 16 tokens, 51 columns), one thread, so the torch
    work itself is small. Rows: the op alone, the FFN's ``_middle_op`` (coefficient masking,
    state lookup) of a default-component layer, d = 64, and the polynomial-only op (``poly_*``) on the tiled
    kernels and on the flat ones (§3.17 of the benchmarks page)."""
    from types import SimpleNamespace

    from modeling_sparse_gpt2.component_base import FFNContext
    from modeling_sparse_gpt2.configuration_sparse_gpt2 import SparseGPT2Config
    from modeling_sparse_gpt2.sparse_ffn import UltraEfficientSparseFFN

    from benchmarks.harness import LaunchStub, one_thread

    flat_default = dict(fk.FLAT_TILE)
    with one_thread(), LaunchStub([fk]):  # the kernels path forced on, Triton's launches no-ops
        try:
            mod = SparseMLP(64, 40, 4, 4, token_gates=True)
            meta, par = mod.meta, (mod.coeffs, mod.coeff_mask, mod.gates, mod.fb_kernel)
            h1, state, mask = torch.randn(1, 1, 51), torch.zeros(1, WINDOW - 1, 4), torch.ones(1, 5, dtype=torch.long)
            h16 = torch.randn(1, 16, 51, requires_grad=True)
            cfg = SparseGPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=97, n_positions=64,
                                   sparse_components=["polynomial", "spectral", "feedback"])
            ffn = UltraEfficientSparseFFN(cfg, 0)
            hf1 = torch.randn(1, 1, ffn.c_fc.out_features)
            hf16 = torch.randn(1, 16, ffn.c_fc.out_features, requires_grad=True)
            decode_ctx = FFNContext(cache=SimpleNamespace(), token_mask=mask)

            def op_decode():
                with torch.no_grad():
                    fk.sparse_ffn_activation(h1, *par, state, mask, **meta)

            def op_prefill():
                with torch.no_grad():
                    fk.sparse_ffn_activation(h16, *par, None, None, **meta)

            def op_fwd_bwd():
                fk.sparse_ffn_activation(h16, *par, None, None, **meta).sum().backward()

            def ffn_decode():
                with torch.no_grad():
                    ffn._middle_op(hf1, decode_ctx)

            def ffn_fwd_bwd():
                ffn._middle_op(hf16, FFNContext()).sum().backward()

            poly = SparseMLP(64, 40, 0, 0)  # the polynomial-only FFN: the flat kernels where they are on
            poly_par = (poly.coeffs, poly.coeff_mask, poly.gates, None)
            hp16 = torch.randn(1, 16, 40, requires_grad=True)

            def poly_prefill():
                with torch.no_grad():
                    fk.sparse_ffn_activation(hp16, *poly_par, None, None, **poly.meta)

            def poly_fwd_bwd():
                fk.sparse_ffn_activation(hp16, *poly_par, None, None, **poly.meta).sum().backward()

            calls = dict(op_decode=op_decode, op_prefill=op_prefill, op_fwd_bwd=op_fwd_bwd, ffn_middle_decode=ffn_decode,
                         ffn_middle_fwd_bwd=ffn_fwd_bwd)
            out = {}
            for direct in (True, False):
                fk.EAGER_DIRECT = direct
                for name, fn in calls.items():
                    out[f"{name}{'' if direct else '_via_ops'}_us"] = host_us(fn, n // 3 if "bwd" in name else n)
            fk.EAGER_DIRECT = True
            for flat in (False, True):  # the polynomial-only op on the tiled kernels, then on the flat ones (direct)
                fk.FLAT_TILE.update(forward_on=flat, backward_on=flat)
                suffix = "flat" if flat else "tiled"
                out[f"poly_prefill_{suffix}_us"] = host_us(poly_prefill, n)
                out[f"poly_fwd_bwd_{suffix}_us"] = host_us(poly_fwd_bwd, n // 3)
            return out
        finally:
            fk.EAGER_DIRECT = True
            fk.FLAT_TILE.update(flat_default)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", default="768,1024,1280,1600")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--token-gates", action="store_true", help="sparse FFN with token gates (n_seg extra c_fc rows)")
    p.add_argument("--polynomial-only", action="store_true",
                   help="the sparse FFN without spectral and feedback columns (the conversion's default)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--sweep", default=SWEEP,
                   help="backward tiles timed at the first width, TOKENSxCOLUMNSxWARPS[r][f][pPROGRAMS][sPER_SM] "
                        "('r': coefficient sums in registers, 'f': prefetched loads, p: token programs per "
                        "column tile, s: per SM); '' for none")
    p.add_argument("--forward-sweep", default=FORWARD_SWEEP,
                   help="forward tiles TOKENSxCOLUMNSxWARPS timed at the first width (empty: none)")
    p.add_argument("--flat-sweep", default=FLAT_SWEEP,
                   help="flat-kernel settings timed at the first width on the polynomial-only FFN's op, against the tiled "
                        "kernels and gelu: fwd:BLOCKxWARPSxPER_SM[h] / bwd:BLOCKxWARPSxPER_SM[p] items (empty: none)")
    p.add_argument("--fastest-flat-of", default=None, metavar="FILE",
                   help="print the fastest flat forward and backward of FILE's flat sweep, for --flat-tile, and exit")
    p.add_argument("--fastest-of", default=None, metavar="FILE",
                   help="print the fastest tile of FILE's sweep (a results file of this script) and exit")
    p.add_argument("--host", action="store_true", help="also the op's host time per call (CPU, launch stubbed)")
    p.add_argument("--budget-s", type=float, default=100.0, help="rows that would start after this many seconds are skipped")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of this script: tiny shapes, fp32, a few timed calls (the kernels under "
                        "TRITON_INTERPRET=1, else the reference)")
    p.add_argument("--output", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    for flag, path, pick in (("--fastest-flat-of", args.fastest_flat_of, fastest_flat),
                             ("--fastest-of", args.fastest_of, fastest_tile)):
        if path:  # print the pick from an earlier results file, and exit
            try:
                print(pick(json.loads(Path(path).read_text())))
            except (OSError, json.JSONDecodeError) as exc:
                sys.exit(f"kernel_microbench {flag}: cannot read {path}: {exc}")
            return
    sweep = parse_tiles(args.sweep)
    forward_sweep = parse_forward_tiles(args.forward_sweep)
    flat_sweep = parse_flat_tile_items(args.flat_sweep)
    t0 = time.perf_counter()
    if args.smoke:
        device, dtype = "cpu", torch.float32
        args.d, args.tokens = "64", 64
        TIMING.update(inner=1, reps=2, max_warmup=2)
        sweep = parse_tiles("8x16x4,4x16x4rfp3")
        forward_sweep = parse_forward_tiles("4x16x4,8x8x2")
        flat_sweep = parse_flat_tile_items("fwd:64x4x2h,fwd:32x2x1,bwd:64x4x2p,bwd:32x1x3")  # per "SM": 2 on the CPU
    else:
        if not torch.cuda.is_available() or fk.triton is None:
            sys.exit("kernel_microbench: needs a CUDA GPU and triton (or --smoke)")
        device, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    dims = [int(v) for v in args.d.split(",")]
    result = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                  triton=getattr(fk.triton, "__version__", None), kernels=fk.use_kernel(torch.zeros(1, device=device)),
                  tokens=args.tokens, ratio=args.ratio, dtype=str(dtype).split(".")[-1], degree=DEGREE, window=WINDOW,
                  token_gates=args.token_gates, polynomial_only=args.polynomial_only, forward_tile=dict(fk.FORWARD_TILE),
                  backward_tile=dict(fk.BACKWARD_TILE), flat_tile=dict(fk.FLAT_TILE), rows=[], forward=[], backward=[],
                  flat=[], skipped=[])
    small = dict(d=64, m=40, k=4, r=4) if args.smoke else {}
    result["correctness"] = check_correctness(device, 16 if args.smoke else 2048, **small)
    if result["kernels"]:
        result["opcheck"] = check_opcheck(device)
    if not args.no_compile:
        result["compile_fullgraph"] = check_fullgraph(device, dims[0] if args.smoke else 768, 16 if args.smoke else 2048)
    print(json.dumps({k: result.get(k) for k in ("correctness", "opcheck", "compile_fullgraph")}, indent=1))
    print(f"checks done in {time.perf_counter() - t0:.1f} s", flush=True)

    def over_budget(what):
        if time.perf_counter() - t0 > args.budget_s:
            result["skipped"].append(what)
            print(f"skipped (over --budget-s {args.budget_s:g}): {what}", flush=True)
            return True
        return False

    heads = ("d", "mode", "model", "width", "fwd ms", "f+b ms", "fwd/ideal", "f+b/ideal", "f+b/dense")
    print(" ".join(f"{h:>9}" for h in heads))
    built = {}
    for d in dims:
        m, k, r = widths(d, args.ratio, args.polynomial_only)
        batch = max(1, args.tokens // 1024)  # sequences of 1,024 tokens (the feedback window runs along them)
        x = torch.randn(batch, args.tokens // batch, d, device=device, dtype=dtype, requires_grad=True)
        models = {"dense": DenseMLP(d, 4 * d), "ideal": DenseMLP(d, m + k + r),
                  "sparse": SparseMLP(d, m, k, r, args.token_gates)}
        for mod in models.values():
            mod.to(device).to_dtype(dtype)
        built[d] = models, x, torch.randn_like(x)
    for mode in ["eager"] + ([] if args.no_compile else ["compiled"]):  # every width eager first, then compiled
        for d in dims:
            models, x, gy = built[d]
            if over_budget(f"{mode} d={d}"):
                continue
            torch._dynamo.reset()
            names = ["ideal", "sparse"] + (["dense"] if mode == "eager" else [])  # compiled: against the ideal
            times = {name: time_model(models[name], x, gy, mode == "compiled") for name in names}
            for name, (fwd, fb) in times.items():
                mk = models["sparse"].meta
                row = dict(d=d, mode=mode, model=name, width=4 * d if name == "dense" else mk["m"] + mk["k"] + mk["r"],
                           fwd_ms=fwd, fwd_bwd_ms=fb, fwd_vs_ideal=fwd / times["ideal"][0],
                           fwd_bwd_vs_ideal=fb / times["ideal"][1],
                           fwd_bwd_vs_dense=fb / times["dense"][1] if "dense" in times else None)
                result["rows"].append(row)
                cells = [f"{v:>9}" for v in (d, mode, name, row["width"])]
                cells += [f"{row[key]:>9.3f}" if row[key] is not None else f"{'-':>9}"
                          for key in ("fwd_ms", "fwd_bwd_ms", "fwd_vs_ideal", "fwd_bwd_vs_ideal", "fwd_bwd_vs_dense")]
                print(" ".join(cells), flush=True)
        if mode == "eager" and forward_sweep and result["kernels"] and not over_budget("forward sweep"):
            row = forward_alone(device, dtype, dims[0], args.tokens, args.ratio, args.token_gates, forward_sweep,
                                args.polynomial_only)
            result["forward"].append(row)
            print(f"forward alone d={dims[0]}: gelu {row['gelu_ms']:.4f} ms"
                  + (f" (kernel {row['gelu_kernel_ms']:.4f} ms)" if "gelu_kernel_ms" in row else ""), flush=True)
            for c in row["sweep"]:
                main_ms = c.get("kernel_ms", {}).get("_forward_kernel")
                print(f"    forward tile {c['tokens']}x{c['columns']}x{c['warps']}: {c['forward_ms']:.4f} ms"
                      + (f", _forward_kernel {main_ms:.4f} ms" if main_ms is not None else ""), flush=True)
        if mode == "eager" and flat_sweep and result["kernels"] and not over_budget("flat sweep"):
            row = flat_alone(device, dtype, dims[0], args.tokens, args.ratio, flat_sweep)
            result["flat"].append(row)
            gelu_k = (f" (kernels {sum(row['gelu_kernel_ms'].values()):.4f} / "
                      f"{sum(row['gelu_backward_kernel_ms'].values()):.4f} ms)") if "gelu_kernel_ms" in row else ""
            print(f"polynomial-only op alone d={dims[0]} m={row['m']}: gelu {row['gelu_ms']:.4f} ms, gelu_backward "
                  f"{row['gelu_backward_ms']:.4f} ms{gelu_k}", flush=True)
            for c in row["sweep"]:
                print(f"    {c['side']:8s} {c['item']:16s} {c['ms']:.4f} ms"
                      + (f", kernels {c['kernels_ms']:.4f} ms {c['kernel_ms']}" if "kernels_ms" in c else ""), flush=True)
        if mode == "eager":  # the backward by itself, and the tile sweep at the first width
            for i, d in enumerate(dims):
                if not result["kernels"] or over_budget(f"backward alone d={d}"):
                    continue
                row = backward_alone(device, dtype, d, args.tokens, args.ratio, args.token_gates, sweep if i == 0 else (),
                                     args.polynomial_only)
                result["backward"].append(row)
                print(f"backward alone d={d}: {row['backward_ms']:.3f} ms (gelu_backward {row['gelu_backward_ms']:.3f} ms,"
                      f" {row['backward_vs_gelu']:.1f}x)", flush=True)
                for name, ms in sorted(row.get("kernel_ms", {}).items(), key=lambda kv: -kv[1])[:6]:
                    print(f"    {ms:8.3f} ms  {name[:90]}")
                for c in row["sweep"]:
                    main_ms = c.get("kernel_ms", {}).get("_backward_kernel")
                    print(f"    tile {tile_name(c)}: {c['backward_ms']:.3f} ms"
                          + (f", _backward_kernel {main_ms:.3f} ms" if main_ms is not None else ""))
    if args.host or args.smoke:
        result["host_us_per_call_cpu"] = host_cost(n=50 if args.smoke else 1000)
        print("host time per call (CPU, launch stubbed), us:",
              json.dumps({k: round(v, 1) for k, v in result["host_us_per_call_cpu"].items()}))
    result["wall_s"] = time.perf_counter() - t0
    print(f"total {result['wall_s']:.1f} s")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

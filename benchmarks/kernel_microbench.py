"""The sparse FFN's activation kernel between two GEMMs, against the dense MLP and the ideal.

    python benchmarks/kernel_microbench.py --output kernel_microbench.json      # on a CUDA GPU, bf16

For each width d (768, 1024, 1280, 1600) and 8,192 tokens, at FFN FLOPs ratio 0.4 (activation width
n = 0.4 * 4d rounded to 64; spectral k = d // 16, feedback r = d // 48, polynomial m = n - k - r), it
times forward and forward+backward (medians of CUDA-event timings after a warm-up that runs until
the timings settle), eager and under ``torch.compile``, of:

* dense: GPT-2's MLP, Linear(d, 4d) -> gelu_tanh -> Linear(4d, d);
* ideal: the same MLP with inner width n;
* sparse: c_fc = Linear(d, n + n_gates) -> ``sparse_ffn_activation`` -> c_proj = Linear(n, d).

Before timing it checks the kernels against ``sparse_ffn_activation_reference`` on the GPU (max
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
from modeling_sparse_gpt2 import ffn_kernels as fk  # noqa: E402

DEGREE, DOMAIN, WINDOW = 8, 4.0, 4


def widths(d: int, ratio: float):
    n = max(64, 64 * round(ratio * 4 * d / 64))
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
    """c_fc -> sparse_ffn_activation -> c_proj, the op's small parameters in fp32."""

    def __init__(self, d, m, k, r, token_gates=False, per_neuron=False):
        super().__init__()
        n_seg = (m > 0) + (k > 0) + (r > 0)
        self.meta = dict(m=m, k=k, r=r, n_gates=n_seg if token_gates else 0, domain=DOMAIN, degree=DEGREE)
        self.c_fc, self.c_proj = nn.Linear(d, m + k + r + self.meta["n_gates"]), nn.Linear(m + k + r, d)
        coeffs = gelu_chebyshev(DEGREE, DOMAIN)
        self.coeffs = nn.Parameter(coeffs.repeat(m, 1) if per_neuron else coeffs[None])
        self.gates = nn.Parameter(torch.ones(n_seg))
        self.fb_kernel = nn.Parameter(torch.randn(r, WINDOW) * 0.3)

    def to_dtype(self, dtype):
        self.c_fc.to(dtype)
        self.c_proj.to(dtype)
        return self

    def forward(self, x, token_mask=None):
        h = self.c_fc(x)
        a = fk.sparse_ffn_activation(h, self.coeffs, self.gates, self.fb_kernel, None, token_mask, **self.meta)
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


def cuda_time(fn, inner=5, reps=25, max_warmup=200):
    """Median ms per call: calls are timed ``inner`` at a time with CUDA events, after a warm-up
    that ends when the median of the last 5 timings is within 2% of the 5 before."""

    def once():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / inner

    history = [once() for _ in range(10)]
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


def check_correctness(device, tokens):
    """Kernel vs reference on the GPU: output and gradients, two layouts, fp32 and bf16."""
    out = []
    g = torch.Generator(device="cpu").manual_seed(0)
    m, k, r = 300, 48, 16
    for dtype in (torch.float32, torch.bfloat16):
        for token_gates, per_neuron, padded in ((False, False, False), (True, True, True)):
            mod = SparseMLP(768, m, k, r, token_gates, per_neuron).to(device)
            meta = mod.meta
            batch, seq = 4, tokens // 4
            h = (torch.randn(batch, seq, m + k + r + meta["n_gates"], generator=g) * 3).to(device, dtype)
            h[0, 0, :m] = torch.linspace(-1e4, 1e4, m)  # the linear tail
            mask = None
            if padded:
                mask = torch.ones(batch, seq, dtype=torch.long, device=device)
                mask[-1, : seq // 3] = 0
            leaves = [h.requires_grad_(), mod.coeffs, mod.gates, mod.fb_kernel]
            args = (mod.coeffs, mod.gates, mod.fb_kernel, None, mask)
            want = fk.sparse_ffn_activation_reference(h, *args, **meta)
            gy = torch.randn_like(want)
            want_g = torch.autograd.grad(want, leaves, gy)
            got = fk.sparse_ffn_activation(h, *args, **meta)
            got_g = torch.autograd.grad(got, leaves, gy)
            row = dict(dtype=str(dtype).split(".")[-1], token_gates=token_gates, per_neuron=per_neuron, padded=padded,
                       finite=bool(torch.isfinite(got).all()), act=max_err(got, want))
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
        torch.ops.sparse_gpt2.ffn_activation, (h, mod.coeffs, mod.gates, mod.fb_kernel, None, mask, *tail))}
    state = torch.randn(2, WINDOW - 1, 3, device=device)
    args = (h.detach()[:, :1], mod.coeffs.detach(), mod.gates.detach(), mod.fb_kernel.detach(), state, mask, *tail)
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


def host_us(fn, n=1000, reps=5):
    """Median wall-clock microseconds per call (CPU), after 100 warm-up calls."""
    for _ in range(100):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(samples)


def host_cost():
    """Host (CPU) time per call of the op's Python path with the kernel launch stubbed out.

    ``use_kernel`` is forced on and ``_launch`` does nothing, so what is timed is everything the op
    does around its kernels: the wrapper's checks and argument preparation, the dispatch (the
    registered ops, or the direct eager path), the output and partial-sum allocations and the
    reductions of the backward. Tiny tensors (1 or 16 tokens, 51 columns), one thread, so the torch
    work itself is small. Rows: the op alone, and the FFN's ``_middle_op`` (coefficient masking,
    state lookup) of a default-component layer, d = 64.
    """
    from types import SimpleNamespace

    from modeling_sparse_gpt2.component_base import FFNContext
    from modeling_sparse_gpt2.configuration_sparse_gpt2 import SparseGPT2Config
    from modeling_sparse_gpt2.sparse_ffn import UltraEfficientSparseFFN

    torch.set_num_threads(1)
    saved = fk.use_kernel, fk._launch
    fk.use_kernel, fk._launch = (lambda h: True), (lambda *a, **k: None)
    try:
        mod = SparseMLP(64, 40, 4, 4, token_gates=True)
        meta, par = mod.meta, (mod.coeffs, mod.gates, mod.fb_kernel)
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

        calls = dict(op_decode=op_decode, op_prefill=op_prefill, op_fwd_bwd=op_fwd_bwd, ffn_middle_decode=ffn_decode,
                     ffn_middle_fwd_bwd=ffn_fwd_bwd)
        out = {}
        for direct in (True, False):
            fk.EAGER_DIRECT = direct
            for name, fn in calls.items():
                out[f"{name}{'' if direct else '_via_ops'}_us"] = host_us(fn, 300 if "bwd" in name else 1000)
        return out
    finally:
        fk.use_kernel, fk._launch = saved
        fk.EAGER_DIRECT = True


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", default="768,1024,1280,1600")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--token-gates", action="store_true", help="sparse FFN with token gates (n_seg extra c_fc rows)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--output", default=None, help="JSON file for the results")
    args = p.parse_args()
    if not torch.cuda.is_available() or fk.triton is None:
        sys.exit("kernel_microbench: needs a CUDA GPU and triton")
    device, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=fk.triton.__version__,
                  tokens=args.tokens, ratio=args.ratio, dtype="bfloat16", degree=DEGREE, window=WINDOW,
                  token_gates=args.token_gates, rows=[])
    result["correctness"] = check_correctness(device, 2048)
    result["opcheck"] = check_opcheck(device)
    result["compile_fullgraph"] = check_fullgraph(device, 768, 2048)
    print(json.dumps({k: result[k] for k in ("correctness", "opcheck", "compile_fullgraph")}, indent=1))
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    heads = ("d", "mode", "model", "width", "fwd ms", "f+b ms", "fwd/ideal", "f+b/ideal", "f+b/dense")
    print(" ".join(f"{h:>9}" for h in heads))
    for d in (int(v) for v in args.d.split(",")):
        m, k, r = widths(d, args.ratio)
        n = m + k + r
        batch = max(1, args.tokens // 1024)  # sequences of 1,024 tokens (the feedback window runs along them)
        x = torch.randn(batch, args.tokens // batch, d, device=device, dtype=dtype, requires_grad=True)
        gy = torch.randn_like(x)
        sparse = SparseMLP(d, m, k, r, args.token_gates)
        models = {"dense": DenseMLP(d, 4 * d), "ideal": DenseMLP(d, n), "sparse": sparse}
        for mod in models.values():
            mod.to(device).to_dtype(dtype)
        for mode in modes:
            torch._dynamo.reset()
            times = {name: time_model(mod, x, gy, mode == "compiled") for name, mod in models.items()}
            for name, (fwd, fb) in times.items():
                row = dict(d=d, mode=mode, model=name, width=4 * d if name == "dense" else n, m=m, k=k, r=r,
                           fwd_ms=fwd, fwd_bwd_ms=fb, fwd_vs_ideal=fwd / times["ideal"][0],
                           fwd_bwd_vs_ideal=fb / times["ideal"][1], fwd_bwd_vs_dense=fb / times["dense"][1])
                result["rows"].append(row)
                cells = [f"{v:>9}" for v in (d, mode, name, row["width"])]
                cells += [f"{row[key]:>9.3f}" for key in ("fwd_ms", "fwd_bwd_ms", "fwd_vs_ideal", "fwd_bwd_vs_ideal",
                                                          "fwd_bwd_vs_dense")]
                print(" ".join(cells))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

"""The partial-sum reduction of the polynomial backward (``_reduce_kernel``) alone, per launch shape.

    python -m benchmarks.probe_reduce --output docs/benchmarks/results/reduce_probe_h200.json   # CUDA GPU
    TRITON_INTERPRET=1 python -m benchmarks.probe_reduce --smoke   # CPU: every configuration checked, not timed

The backward kernel's programs each write one row of partial sums (``_part_layout``); ``_reduce_kernel``
sums them into the parameters' gradients. This times that kernel by itself (GPU time from
``torch.profiler``, mean of 20 calls) on the buffers GPT-2's shapes give the default backward tile:
264 programs x 3 column tiles (d = 768, FFN FLOPs 0.4) and 528 x 5, ten outputs (a degree-8 series
and one gate), under each outputs-per-program (BLOCK), rows-per-step (BR) and warps, beside torch's
``sum`` of the same buffer and an empty kernel (the floor of one launch's GPU time), and checks each
result against that sum. ``--smoke``: 20 x 3 and 40 x 5 (on the CPU, under Triton's interpreter).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_sparse_gpt2 import ffn_kernels as fk  # noqa: E402

if fk.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _empty(x_ptr):
        tl.store(x_ptr, 1.0)

SHAPES = ((264, 3), (528, 5))  # (backward programs, column-tile slots)
DEGREE, N_SEG = 8, 1


def gpu_us(fn, calls=20):
    """Mean GPU time per call of ``fn``'s kernels (us), or None off CUDA."""
    if not torch.cuda.is_available():
        fn()
        return None
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(getattr(e, "device_time_total", 0.0) for e in prof.key_averages()) / calls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", default="1,2,16")
    p.add_argument("--rows-per-step", default="256,512,1024")
    p.add_argument("--warps", default="2,4,8")
    p.add_argument("--smoke", action="store_true", help="small buffers (on the CPU: Triton's interpreter, checks only)")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if fk.triton is None or not (torch.cuda.is_available() or (args.smoke and fk.INTERPRET)):
        sys.exit("probe_reduce: needs a CUDA GPU and triton (or --smoke with TRITON_INTERPRET=1)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = ((20, 3), (40, 5)) if args.smoke else SHAPES
    fmt = lambda us: "-" if us is None else f"{us:.2f} us"  # noqa: E731
    n_out, slot_width = DEGREE + 1 + N_SEG, DEGREE + 1 + N_SEG
    result = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", triton=triton.__version__,
                  shapes=[])
    for rows, slots in shapes:
        n_part = slots * slot_width
        part = torch.randn(rows, n_part, device=device)
        mask = torch.ones(DEGREE + 1, device=device)
        grad_c = torch.empty(DEGREE + 1, device=device, dtype=torch.bfloat16)
        grad_g = torch.empty(N_SEG, device=device, dtype=torch.bfloat16)
        want = part.view(rows, slots, slot_width).sum((0, 1))
        shape = dict(rows=rows, slots=slots, empty_kernel_us=gpu_us(lambda: _empty[(1,)](grad_c)),
                     torch_sum_us=gpu_us(lambda: part.view(rows, slots, slot_width).sum((0, 1))), configs=[])
        print(f"{rows} programs x {slots} slots: empty kernel {fmt(shape['empty_kernel_us'])}, "
              f"torch sum {fmt(shape['torch_sum_us'])}", flush=True)
        for block in (int(v) for v in args.blocks.split(",")):
            for br in (int(v) for v in args.rows_per_step.split(",")):
                for warps in (int(v) for v in args.warps.split(",")):
                    def run(block=block, br=br, warps=warps):
                        fk._reduce_kernel[(triton.cdiv(n_out, block),)](
                            part, mask, grad_c, grad_g, grad_g, rows, n_part, 0, slot_width, n_part, DEGREE + 1,
                            N_SEG, 0, DEGREE=DEGREE, PER_NEURON=False, N_SLOTS=slots, BLOCK=block, BR=br,
                            num_warps=warps)
                    us = gpu_us(run)
                    err = (torch.cat([grad_c.float(), grad_g.float()]) - want).abs().max().item()
                    ok = err <= 1e-2 * (1 + want.abs().max().item())  # bf16 outputs
                    shape["configs"].append(dict(block=block, rows_per_step=br, warps=warps, us=us, matches_sum=ok))
                    print(f"  BLOCK={block} BR={br} warps={warps}: {fmt(us)}{'' if ok else ' WRONG'}", flush=True)
        result["shapes"].append(shape)
    wrong = [(s["rows"], c) for s in result["shapes"] for c in s["configs"] if not c["matches_sum"]]
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.output}")
    if wrong:
        sys.exit(f"probe_reduce: {len(wrong)} configurations differ from torch's sum, first {wrong[0]}")


if __name__ == "__main__":
    main()

"""Registers, spills and occupancy of the FFN's Triton kernels per tile, compiled for an H100/H200 (sm_90)
on any machine: no GPU is needed, only triton (its bundled ptxas does the register allocation).

    python -m benchmarks.kernel_registers                                  # the defaults and the sweep's tiles
    python -m benchmarks.kernel_registers --tiles 64x128x8,4x128x4r --output docs/benchmarks/results/kernel_registers.json

A kernel whose threads need more than 255 registers spills to local memory, and the registers per
thread bound how many programs an SM keeps resident (65,536 registers, 64 warps per SM on sm_90):
both are what a tile choice trades against the work per program. This is a static figure of the
compiled code, not a timing; `kernel_microbench --sweep` times the same tiles on the GPU.
Tiles: as ``kernel_microbench --sweep`` (``harness.parse_tiles``): TOKENSxCOLUMNSxWARPS, ``r`` for the
backward's coefficient sums in registers (``ffn_kernels.BACKWARD_TILE["in_registers"]``), ``f`` for the
next tile's loads prefetched (the programs per column tile or per SM, ``pN`` / ``sN``, do not change the compiled code).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .harness import (backward_tile, flat_item_name, flat_item_side, flat_tile, parse_flat_tile_items, parse_tiles,
                      tile_name)
from .kernel_microbench import SWEEP

TARGET_ARCH = 90
REGISTERS_PER_SM, WARPS_PER_SM, MAX_REGISTERS = 65536, 64, 255
BF16_POINTERS = {"h_ptr", "out_ptr", "gout_ptr", "gh_ptr"}  # the activations; the rest fp32, the mask int64
# Arguments a real launch at GPT-2's shapes passes as multiples of 16, which triton specializes on (``tt.divisibility``):
# torch's allocations are 16-byte aligned, and the flat kernels' element count, the rows' strides, the segment widths
# m, k, r and the rows T are multiples of 16 at the benchmarks' shapes. Without these hints the compiled code would
# load and store element by element where the GPU's does not (16-byte vector loads need the alignment proven).
ALIGNED_INTS = {"n", "m", "k", "r", "T", "stride_hb", "stride_ht", "stride_gb", "stride_gt", "stride_ob", "stride_ot"}


def signature(kernel) -> dict:
    """Argument types of a kernel of ``ffn_kernels`` as its launch in bf16 passes them."""
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*bf16" if p.name in BF16_POINTERS else "*i64" if p.name == "mask_ptr" else "*fp32"
        else:
            sig[p.name] = "fp32" if p.name == "domain" else "i32"
    return sig


def triton_tool(name: str) -> str:
    """The path of one of the CUDA tools triton bundles (ptxas, nvdisasm)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def loop_instructions(cubin: bytes) -> list[int]:
    """Instructions in each loop of a compiled kernel (the SASS between a label and the branch back to it,
    ``nvdisasm`` of triton's bundle), in the order they appear: a static cost per trip, not a timing."""
    nvdisasm = triton_tool("nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        listing = subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True, check=True).stdout
    labels, count, loops = {}, 0, []
    for line in listing.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = count
            continue
        if re.search(r"/\*[0-9a-f]+\*/\s+\S", line):
            count += 1
            back = re.search(r"BRA\s+[`(]*\.?(L_x_\d+)", line)
            if back and back.group(1) in labels:
                loops.append(count - labels[back.group(1)])
    return loops


def compile_stats(kernel, constants: dict, num_warps: int, maxnreg: int | None = None,
                  elements_per_trip: int | None = None) -> dict:
    """Compile ``kernel`` for sm_90 with ``constants`` (and the register cap its launch passes) and
    return ptxas's registers and spills; with ``elements_per_trip`` (elements a thread handles per trip of
    the kernel's loops), also each loop's SASS instructions per element."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = signature(kernel)
    aligned = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(sig.items())
               if kind.startswith("*") or (name in ALIGNED_INTS and kind == "i32")}
    compiled = triton.compile(ASTSource(kernel, sig, constants, aligned),
                              target=GPUTarget("cuda", TARGET_ARCH, 32),
                              options=dict(num_warps=num_warps, **({} if maxnreg is None else dict(maxnreg=maxnreg))))
    ptxas = triton_tool("ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        info = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{TARGET_ARCH}a", str(ptx), "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr

    def number(pattern):
        found = re.search(pattern, info)
        return int(found.group(1)) if found else 0

    regs = number(r"Used (\d+) registers")
    loops = {}
    if elements_per_trip:
        loops = dict(loop_instructions_per_element=[round(n / elements_per_trip, 1)
                                                    for n in loop_instructions(compiled.asm["cubin"])])
    return dict(**loops, registers=regs, spill_store_bytes=number(r"(\d+) bytes spill stores"),
                spill_load_bytes=number(r"(\d+) bytes spill loads"), shared_bytes=compiled.metadata.shared,
                warps=num_warps, resident_per_sm=min(REGISTERS_PER_SM // (max(regs, 1) * 32 * num_warps),
                                                     WARPS_PER_SM // num_warps))


def flat_row(fk, side: str, degree: int) -> dict:
    """The flat kernel of ``side`` (forward / backward) compiled as its launch under ``ffn_kernels.FLAT_TILE``
    compiles it: the register cap for its programs per SM, Horner's rule where ``_flat_horner`` says, the
    backward's row width from ``_part_layout``."""
    flat = fk.FLAT_TILE
    block, warps, per_sm = (flat[f"{side}_{key}"] for key in ("block", "warps", "per_sm"))
    if side == "forward":
        kernel, option, options = fk._flat_forward_kernel, "horner", dict(HORNER=fk._flat_horner(degree))
    else:
        kernel, option = fk._flat_backward_kernel, "prefetch"
        options = dict(PREFETCH=flat["prefetch"], N_PART=fk._part_layout(0, 0, 1, degree, 1, False, 1)[3])
    stats = compile_stats(kernel, dict(DEGREE=degree, BLOCK=block, **options), warps, fk._register_cap(warps, per_sm),
                          elements_per_trip=max(1, block // (32 * warps)))
    setting = {key: value for key, value in flat.items() if key.startswith(side)}  # named as compiled:
    setting[option] = options[option.upper()]  # Horner only up to POWER_BASIS_MAX_DEGREE
    return dict(kernel=kernel.fn.__name__, tokens=1, columns=block, in_registers=None,
                setting=flat_item_name(setting), per_sm=per_sm, **stats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", default=SWEEP,
                   help="backward tiles, as kernel_microbench --sweep")
    p.add_argument("--degree", type=int, default=8)
    p.add_argument("--per-neuron", action="store_true", help="per-neuron Chebyshev coefficients")
    p.add_argument("--token-gates", action="store_true")
    p.add_argument("--spectral", action="store_true",
                   help="spectral columns beside the polynomial ones (default: the conversion's polynomial-only FFN)")
    p.add_argument("--flat", default="",
                   help="flat-kernel settings compiled beside the default's, as kernel_microbench --flat-sweep "
                        "(e.g. its FLAT_SWEEP): fwd:BLOCKxWARPSxPER_SM[h] / bwd:BLOCKxWARPSxPER_SM[p] items")
    p.add_argument("--output", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    tiles = parse_tiles(args.tiles, flag="--tiles")
    try:
        from modeling_sparse_gpt2 import ffn_kernels as fk
    except ImportError as exc:  # the package itself imports without triton
        sys.exit(f"kernel_registers: {exc}")
    if fk.triton is None:
        sys.exit("kernel_registers: needs triton (pip install triton)")
    flags = dict(DEGREE=args.degree, PER_NEURON=args.per_neuron, TOKEN_GATES=args.token_gates)
    dp = 1 << args.degree.bit_length()  # next power of two above the degree: DEGREE + 1 coefficients fit
    rows = []
    fwd = dict(fk.FORWARD_TILE)
    rows.append(dict(kernel="_forward_kernel", tokens=fwd["tokens"], columns=fwd["columns"], in_registers=None,
                     **compile_stats(fk._forward_kernel, dict(flags, WINDOW=1, HAS_MASK=False, HAS_STATE=False,
                                                              WRITE_STATE=False, BT=fwd["tokens"], BC=fwd["columns"],
                                                              BS=1), fwd["warps"])))
    flat = dict(fk.FLAT_TILE)
    # the default flat settings, then each item of --flat (FLAT_TILE updated by it)
    items = [({}, "forward"), ({}, "backward")]
    items += [(item, flat_item_side(item)) for item in parse_flat_tile_items(args.flat, "--flat")
              if item.get(f"{flat_item_side(item)}_on")]  # the flat ones: 'off' items compile nothing
    for item, side in items:
        with flat_tile(item):
            rows.append(flat_row(fk, side, args.degree))
    for tile in tiles:
        with backward_tile(tile) as launched:  # the columns _backward launches it with (per-neuron coefficients halve
            # them), and the programs per SM its register cap follows (the default's where the tile names none)
            tile = dict(tile, columns=fk._backward_columns(tile["tokens"], args.per_neuron),
                        programs_per_sm=launched["programs_per_sm"])
        constants = dict(flags, BT=tile["tokens"], BC=tile["columns"], DP=dp, IN_REGISTERS=tile["in_registers"],
                         SPECTRAL=args.spectral, PREFETCH=tile["prefetch"])
        stats = compile_stats(fk._backward_kernel, constants, tile["warps"],
                              fk._register_cap(tile["warps"], tile["programs_per_sm"]),
                              elements_per_trip=tile["tokens"] * tile["columns"] // (32 * tile["warps"]))
        rows.append(dict(kernel="_backward_kernel", tokens=tile["tokens"], columns=tile["columns"],
                         in_registers=tile["in_registers"], prefetch=tile["prefetch"], **stats))
    print(f"sm_{TARGET_ARCH}, degree {args.degree}, per-neuron {args.per_neuron}, token gates {args.token_gates}, "
          f"spectral {args.spectral}")
    print(f"{'kernel':22s} {'tile':>15s} {'regs':>5s} {'spill st/ld':>12s} {'smem':>6s} {'resident/SM':>11s}  "
          "loop instructions per element")
    for r in rows:
        if r["kernel"] == "_backward_kernel":
            tile = tile_name(r)
        elif r["kernel"] == "_forward_kernel":
            tile = f"{r['tokens']}x{r['columns']}x{r['warps']}"
        else:  # a flat kernel: its --flat-tile item (BLOCKxWARPSxPER_SM)
            tile = r["setting"]
        print(f"{r['kernel']:22s} {tile:>15s} {r['registers']:5d} {r['spill_store_bytes']:5d}/{r['spill_load_bytes']:<6d}"
              f" {r['shared_bytes']:6d} {r['resident_per_sm']:11d}  {r.get('loop_instructions_per_element', '')}")
    result = dict(target=f"sm_{TARGET_ARCH}", triton=fk.triton.__version__, degree=args.degree,
                  per_neuron=args.per_neuron, token_gates=args.token_gates, spectral=args.spectral, forward_tile=fwd,
                  backward_tile=dict(fk.BACKWARD_TILE), flat_tile=flat, rows=rows)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()

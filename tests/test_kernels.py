"""The Triton kernels of ``ffn_kernels`` equal the torch reference, forward and backward.

On a CUDA machine with triton the cases run on the GPU in this process. On a CPU they run under
Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before triton is first
imported; conftest imports the package first, so ``test_cases_under_the_interpreter`` runs this file
again in a subprocess with the variable set, and the cases skip themselves in this process.
The kernel cases run on small tiles (4 tokens x 8 columns, 4 feedback columns in the backward, 3
backward programs), so every case spans several tiles, and a backward program's last step can run
past the tiles (masked); the whole-model tests run the tiles the GPU
runs (fewer programs: the interpreter's cost is per program, ~10x less here).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_sparse_gpt2 import ffn_kernels as fk

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_HERE = fk.triton is not None and (DEVICE == "cuda" or fk.INTERPRET)
needs_kernels = pytest.mark.skipif(not RUNS_HERE, reason="kernels run under test_cases_under_the_interpreter")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # sigmoid(-1e4) = 0 in numpy
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setitem(fk.FORWARD_TILE, "tokens", 4)
    monkeypatch.setitem(fk.FORWARD_TILE, "columns", 8)
    monkeypatch.setitem(fk.BACKWARD_TILE, "tokens", 4)
    monkeypatch.setitem(fk.BACKWARD_TILE, "columns", 8)
    monkeypatch.setitem(fk.BACKWARD_TILE, "feedback_columns", 4)
    monkeypatch.setitem(fk.BACKWARD_TILE, "token_programs", 3)  # 4 token tiles: two programs end on a masked step
    # the flat kernels (polynomial-only FFN, shared series): 16 elements a block, 2 / 3 programs per "SM" (2 on
    # the CPU), so a case spans several programs of several blocks and the last one ends on masked elements
    monkeypatch.setitem(fk.FLAT_TILE, "forward_block", 16)
    monkeypatch.setitem(fk.FLAT_TILE, "backward_block", 16)
    monkeypatch.setitem(fk.FLAT_TILE, "forward_per_sm", 2)
    monkeypatch.setitem(fk.FLAT_TILE, "backward_per_sm", 3)


def switch_flat(monkeypatch, on: bool):
    """The flat kernels on or off, both sides (``FLAT_TILE``: off by default until they are timed on a GPU)."""
    monkeypatch.setitem(fk.FLAT_TILE, "forward_on", on)
    monkeypatch.setitem(fk.FLAT_TILE, "backward_on", on)


@pytest.fixture
def flat_on(monkeypatch):
    switch_flat(monkeypatch, True)


def kernel_case(test):
    """A kernel case: runs where the kernels do, on the small tiles."""
    return needs_kernels(pytest.mark.usefixtures("small_tiles")(test))


# which Chebyshev terms the mask keeps: the conversion's GELU series (T_0, T_1 and the even terms: the
# kernels' half-degree path in u = T_2(t)), every term, and a pattern with an odd term on (the general path)
SERIES = {"even": lambda i: i < 2 or i % 2 == 0, "all": lambda i: True, "odd-on": lambda i: i != 2}


def make_inputs(batch, tokens, m, k, r, token_gates, per_neuron, window=3, degree=4, padded=False,
                dtype=torch.float32, scale=3.0, seed=0, series="even"):
    """(h, coeffs, coeff_mask, gates, fb_kernel, token_mask, meta) on DEVICE; h has a batch dim unless
    batch is None. The coefficients are non-zero where the mask is off too (the op must apply it)."""
    g = torch.Generator().manual_seed(seed)
    n_seg = (m > 0) + (k > 0) + (r > 0)
    n_gates = n_seg if token_gates else 0
    shape = (tokens, m + k + r + n_gates) if batch is None else (batch, tokens, m + k + r + n_gates)
    h = torch.randn(shape, generator=g) * scale
    coeffs = torch.randn((m, degree + 1) if per_neuron else (degree + 1,), generator=g)
    coeff_mask = torch.tensor([float(SERIES[series](i)) for i in range(degree + 1)])
    gates = torch.rand(n_seg, generator=g) + 0.5
    fb_kernel = torch.randn(r, window, generator=g) * 0.5 if r else None
    token_mask = None
    if padded:
        token_mask = torch.ones(1 if batch is None else batch, tokens + 2, dtype=torch.long)
        token_mask[-1, :3] = 0  # left padding of the last sequence, before and inside this call
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    meta = dict(m=m, k=k, r=r, n_gates=n_gates, domain=2.0, degree=degree)
    return to(h).to(dtype), to(coeffs), to(coeff_mask), to(gates), to(fb_kernel), to(token_mask), meta


def assert_close(got, want, dtype, what):
    tol = TOLERANCE[dtype]
    err = (got.float() - want.float()).abs().max().item()
    bound = tol * (1 + want.float().abs().max().item())
    assert torch.isfinite(got).all(), f"{what}: not finite"
    assert err <= bound, f"{what}: max |kernel - reference| = {err:.3g} > {bound:.3g}"


def check_against_reference(h, coeffs, coeff_mask, gates, fb_kernel, token_mask, meta, dtype=torch.float32):
    named = dict(h=h, coeffs=coeffs if meta["m"] else None, gates=gates, fb_kernel=fb_kernel)  # no poly: no coeffs
    named = {name: t.requires_grad_() for name, t in named.items() if t is not None}
    leaves = list(named.values())
    args = (coeffs, coeff_mask, gates, fb_kernel, None, token_mask)
    want = fk.sparse_ffn_activation_reference(h, *args, **meta)
    assert torch.isfinite(want).all(), "test inputs overflow the reference"
    weight = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(want.device)
    want_grads = torch.autograd.grad((want.float() * weight).sum(), leaves)
    got = fk.sparse_ffn_activation(h, *args, **meta)
    assert got.dtype == h.dtype and got.shape == want.shape
    got_grads = torch.autograd.grad((got.float() * weight).sum(), leaves)
    assert_close(got, want, dtype, "act")
    for name, a, b in zip(named, got_grads, want_grads):
        assert a.dtype == b.dtype and a.shape == b.shape, f"grad {name}: {a.dtype} {tuple(a.shape)}"
        assert_close(a, b, dtype, f"grad {name}")


CASES = {  # (batch, tokens, m, k, r, token gates, per-neuron coefficients, padded)
    "poly": (2, 5, 19, 0, 0, False, False, False),
    "poly+spectral per-neuron token-gates": (2, 6, 11, 6, 0, True, True, False),
    "poly+feedback padded token-gates": (2, 5, 13, 0, 5, True, False, True),
    "all per-neuron padded": (2, 6, 10, 5, 6, False, True, True),
    "all one token token-gates": (2, 1, 9, 4, 5, True, True, True),
    "all no batch dim token-gates": (None, 6, 7, 3, 4, True, False, False),
    "spectral+feedback padded token-gates": (2, 5, 0, 4, 6, True, False, True),
    "feedback only": (1, 7, 0, 0, 5, False, False, False),
}


@pytest.mark.skipif(fk.triton is None, reason="the forward's tiles are chosen only with triton")
@pytest.mark.usefixtures("small_tiles")
def test_remembered_forward_tiles_follow_the_tile_settings(monkeypatch):
    """``_forward_plan`` remembers the tiles of each shape; changed FORWARD_TILE settings (4 x 8
    here, from the fixture) give new ones, and the old ones come back with the old settings."""
    assert fk._forward_plan(40, 50, 4) == (4, 8, 10, 7, 4)  # BT, BC, token tiles, column tiles, BS
    monkeypatch.setitem(fk.FORWARD_TILE, "tokens", 16)
    monkeypatch.setitem(fk.FORWARD_TILE, "columns", 64)
    assert fk._forward_plan(40, 50, 4) == (16, 64, 3, 1, 4)
    assert fk._forward_plan(1, 50, 4) == (4, 64, 1, 1, 4)  # one token: the first tile still holds the state
    monkeypatch.setitem(fk.FORWARD_TILE, "tokens", 4)
    monkeypatch.setitem(fk.FORWARD_TILE, "columns", 8)
    assert fk._forward_plan(40, 50, 4) == (4, 8, 10, 7, 4)


@pytest.mark.skipif(fk.triton is None, reason="the backward's programs are chosen only with triton")
def test_backward_programs_follow_the_per_sm_setting_and_never_exceed_the_token_tiles(monkeypatch):
    """Without ``token_programs`` the backward launches ``programs_per_sm`` programs per SM over its
    polynomial column tiles (2 per SM over the feedback ones), at most one per token tile."""
    monkeypatch.setitem(fk.BACKWARD_TILE, "token_programs", None)
    monkeypatch.setitem(fk.BACKWARD_TILE, "programs_per_sm", 8)
    # 2,048 token tiles, 10 column tiles, no feedback, 132 SMs: 8 x 132 / 10 -> 106 per column tile
    assert fk._token_programs(2048, 10, 0, 132) == 106
    monkeypatch.setitem(fk.BACKWARD_TILE, "programs_per_sm", 5)
    assert fk._token_programs(2048, 10, 0, 132) == 66  # 660 programs: one wave of 5 resident per SM
    assert fk._token_programs(2048, 10, 4, 132) == 66  # 2 x 132 / 4 = 66 for the feedback tiles too
    assert fk._token_programs(2048, 1, 1, 132) == 660
    assert fk._token_programs(40, 10, 0, 132) == 40  # no more programs than token tiles
    monkeypatch.setitem(fk.BACKWARD_TILE, "token_programs", 3)
    assert fk._token_programs(2048, 10, 0, 132) == 3 and fk._token_programs(2, 10, 0, 132) == 2


@pytest.mark.skipif(fk.triton is None, reason="the backward's tiles are chosen only with triton")
def test_a_feedback_window_narrows_the_backward_tile_to_its_elements_per_thread(monkeypatch):
    """A window of w tokens raises the backward tile's tokens to w's power of two (the first tile holds the
    state); its columns narrow by as much, so a 1 x 256 one-warp tile (8 elements a thread) does not become
    4 x 256 (32 a thread, ~4x the registers: spills) under feedback."""
    monkeypatch.setitem(fk.BACKWARD_TILE, "tokens", 1)
    monkeypatch.setitem(fk.BACKWARD_TILE, "columns", 256)
    shapes = {w: (fk._token_block(8192, 1, w), fk._backward_columns(fk._token_block(8192, 1, w))) for w in (1, 2, 4, 8)}
    assert shapes == {1: (1, 256), 2: (1, 256), 4: (4, 64), 8: (8, 32)}
    monkeypatch.setitem(fk.BACKWARD_TILE, "tokens", 4)
    monkeypatch.setitem(fk.BACKWARD_TILE, "columns", 128)
    assert fk._backward_columns(fk._token_block(8192, 4, 4)) == 128  # a tile already as tall keeps its columns
    assert fk._backward_columns(4, per_neuron=True) == 64  # per-neuron coefficient rows: half the elements


@pytest.mark.skipif(fk.triton is None, reason="the launches exist only with triton")
def test_the_kernels_launch_with_registers_capped_so_their_programs_per_sm_fit(monkeypatch):
    """The polynomial backward launches with at most 65,536 / (programs per SM x threads) registers per
    thread (ptxas would otherwise take what it may: 244, so 4 of its 6 programs per SM fit); the other
    kernels launch uncapped."""
    assert fk._register_cap(2, 6) == 168 and fk._register_cap(4, 4) == 128 and fk._register_cap(1, 6) == 255
    launches = {}

    def record(kernel, grid, direct, warps=4, maxnreg=None):
        launches[kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__] = (warps, maxnreg)
        return lambda *args, **meta: None

    monkeypatch.setattr(fk, "_launcher", record)
    monkeypatch.setitem(fk.BACKWARD_TILE, "programs_per_sm", 3)
    h, coeffs, coeff_mask, gates, fb_kernel, _, meta = make_inputs(2, 8, 12, 0, 3, False, False)
    h = h.to(DEVICE)
    fk._forward(h, coeffs, coeff_mask, gates, fb_kernel, None, None, *meta.values(), False, direct=True)
    fk._backward(torch.ones_like(h[..., :15]), h, coeffs, coeff_mask, gates, fb_kernel, None, None, *meta.values())
    warps = fk.BACKWARD_TILE["warps"]
    assert launches == {"_forward_kernel": (4, None), "_backward_kernel": (warps, fk._register_cap(warps, 3)),
                        "_feedback_backward_kernel": (4, None), "_reduce_kernel": (4, None)}


@kernel_case
@pytest.mark.parametrize("per_neuron", [False, True], ids=["shared", "per-neuron"])
def test_the_parameter_gradients_sum_every_backward_program_over_several_reduce_steps(per_neuron, monkeypatch):
    """20 backward programs per column tile, 16 rows per reduce step (``REDUCE_STEP``): the coefficient,
    gate and tap gradients add every program's row, the last step masked, over every column tile's slot."""
    monkeypatch.setitem(fk.BACKWARD_TILE, "token_programs", 20)
    monkeypatch.setattr(fk, "REDUCE_STEP", 16)
    check_against_reference(*make_inputs(1, 80, 13, 0, 5, True, per_neuron, padded=True))


@kernel_case
@pytest.mark.usefixtures("flat_on")
def test_the_flat_gradients_sum_every_backward_program_over_several_reduce_steps(monkeypatch):
    """The flat backward's 22 programs (1,040 elements, 3 blocks of 16 a program), 16 rows per reduce step:
    the coefficient and gate gradients add every program's row."""
    monkeypatch.setattr(fk, "REDUCE_STEP", 16)
    monkeypatch.setitem(fk.FLAT_TILE, "backward_per_sm", 11)
    h, *rest = make_inputs(1, 80, 13, 0, 0, False, False)
    assert fk._flat_grid(h.numel(), 16, 11, h.device) == (22, 3)
    check_against_reference(h, *rest)


# the flat kernels' settings: the forward by Horner's rule in powers of t or by Clenshaw's recurrence, the
# backward with its next block's loads prefetched or not
FLAT_WAYS = {"horner-prefetched": dict(horner=True, prefetch=True), "clenshaw": dict(horner=False, prefetch=False)}


@kernel_case
@pytest.mark.usefixtures("flat_on")
@pytest.mark.parametrize("way", FLAT_WAYS.values(), ids=FLAT_WAYS.keys())
@pytest.mark.parametrize("series", SERIES)
@pytest.mark.parametrize("degree", [2, 6])
def test_the_flat_kernels_match_reference_for_every_series(degree, series, way, monkeypatch):
    """The polynomial-only FFN with one shared series runs the flat kernels (``_flat``): output, dL/dh and
    the coefficient and gate gradients equal the reference, for the even series (the backward's half-degree
    loop), every term, and an odd term on (the general loop), either way of evaluating the series."""
    for key, value in way.items():
        monkeypatch.setitem(fk.FLAT_TILE, key, value)
    inputs = make_inputs(2, 7, 19, 0, 0, False, False, degree=degree, series=series)
    assert fk._flat("forward", inputs[0], inputs[1], 0, 0, 0, degree)
    assert fk._flat("backward", inputs[0], inputs[1], 0, 0, 0, degree)
    check_against_reference(*inputs)


@kernel_case
@pytest.mark.usefixtures("flat_on")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_the_flat_kernels_in_half_precision_with_large_inputs_stay_finite(dtype):
    h, *rest = make_inputs(2, 5, 21, 0, 0, False, False, dtype=dtype)
    with torch.no_grad():  # beyond the polynomial's domain: the linear tail, up to |h| = 1e4
        h[0, 1:3] = torch.linspace(-1e4, 1e4, h.shape[-1], device=h.device).to(dtype)
    check_against_reference(h, *rest, dtype=dtype)


@pytest.mark.skipif(fk.triton is None, reason="the launches exist only with triton")
@pytest.mark.parametrize("layout", ["shared", "per-neuron", "spectral", "token-gates", "strided-h", "switched-off",
                                    "forward-only", "backward-only"])
def test_only_the_polynomial_only_ffn_with_one_series_and_contiguous_h_launches_the_flat_kernels(layout, monkeypatch):
    """``_flat``: polynomial columns only, one shared series and a contiguous h take the flat kernels (forward,
    backward, the reduction) when they are on; per-neuron series, other segments or token gates the tiled ones,
    and so does the forward of a strided h; switched off (the default for now), the tiled ones too; each side
    is switched by itself (``forward_on``, ``backward_on``)."""
    monkeypatch.setitem(fk.FLAT_TILE, "forward_on", layout not in ("switched-off", "backward-only"))
    monkeypatch.setitem(fk.FLAT_TILE, "backward_on", layout not in ("switched-off", "forward-only"))
    launched, caps = [], {}

    def record(kernel, grid, direct, warps=4, maxnreg=None):
        launched.append(kernel.fn.__name__)
        caps[kernel.fn.__name__] = maxnreg
        return lambda *args, **meta: None

    monkeypatch.setattr(fk, "_launcher", record)
    spectral = 3 if layout == "spectral" else 0
    h, coeffs, coeff_mask, gates, _, _, meta = make_inputs(2, 8, 12, spectral, 0, layout == "token-gates",
                                                           layout == "per-neuron")
    if layout == "strided-h":
        h = torch.cat([h, h], dim=-1)[..., :12]
    fk._forward(h, coeffs, coeff_mask, gates, None, None, None, *meta.values(), False, direct=True)
    fk._backward(torch.ones_like(h[..., : 12 + spectral]), h, coeffs, coeff_mask, gates, None, None, None,
                 *meta.values())
    if layout == "shared":  # registers capped so that per_sm programs fit an SM: one wave
        assert launched == ["_flat_forward_kernel", "_flat_backward_kernel", "_reduce_kernel"]
        for side in ("forward", "backward"):
            want = fk._register_cap(fk.FLAT_TILE[f"{side}_warps"], fk.FLAT_TILE[f"{side}_per_sm"])
            assert caps[f"_flat_{side}_kernel"] == want
    elif layout in ("strided-h", "backward-only"):  # (strided: the backward makes h contiguous first)
        assert launched == ["_forward_kernel", "_flat_backward_kernel", "_reduce_kernel"]
    elif layout == "forward-only":
        assert launched == ["_flat_forward_kernel", "_backward_kernel", "_reduce_kernel"]
    else:
        assert launched == ["_forward_kernel", "_backward_kernel", "_reduce_kernel"]


@pytest.mark.skipif(fk.triton is None, reason="the flat kernels' plan exists only with triton")
def test_the_flat_kernels_launch_one_wave_of_programs_over_contiguous_shares_of_the_blocks(monkeypatch):
    """``_flat_grid``: ``per_sm`` programs per SM at most (8,192 x 1,216 elements in blocks of 1,024 on 132 SMs:
    4 per SM -> 512 programs of 19 blocks, every block covered, no program without one), one program per block
    where there are fewer blocks (decode: one token, 2 blocks)."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setitem(fk._SM_COUNTS, cuda, 132)  # no GPU needed: the count the device query would have cached
    for n, per_sm, want in ((8192 * 1216, 4, (512, 19)), (8192 * 1216, 16, (1946, 5)), (1216, 4, (2, 1)),
                            (64 * 1216, 16, (76, 1)), (100, 3, (4, 2))):
        device = cuda if n > 100 else torch.device("cpu")  # 2 "SMs" on the CPU
        programs, steps = fk._flat_grid(n, 16 if n == 100 else 1024, per_sm, device)
        assert (programs, steps) == want
        blocks = fk._cdiv(n, 16 if n == 100 else 1024)
        assert (programs - 1) * steps < blocks <= programs * steps  # every block, no idle program


@needs_kernels
def test_every_reduce_launch_shape_the_probe_times_sums_like_torch(capsys):
    """``benchmarks.probe_reduce``'s configurations (one, two or 16 outputs per program; rows per step below
    and above the programs) give torch's sum of the partial sums over programs and slots; it exits if not."""
    from benchmarks import probe_reduce

    probe_reduce.main(["--smoke", "--blocks", "1,2,16", "--rows-per-step", "16,64", "--warps", "4"])
    assert capsys.readouterr().out.count("BLOCK=") == 12


@pytest.mark.skipif(fk.triton is None, reason="the direct eager path exists only with triton")
@pytest.mark.parametrize("flat", [False, True], ids=["tiled", "flat"])
def test_the_op_makes_no_tensors_from_the_parameters_forward_or_backward(flat, monkeypatch):
    """A training call of the op dispatches no torch op but allocations, forward and backward: the
    mask, the fp32 reads and the parameters' gradients (partial sums reduced, cast back, times the mask)
    are the kernels' work, so eager pays no launches for them and compiled graphs no small kernels.
    The launches are stubbed (this counts torch's dispatches only)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(fk, "_launcher", lambda *launch, **options: lambda *args, **meta: None)
    monkeypatch.setattr(fk, "_plain_eager", lambda h: True)  # the direct path, as a plain eager call takes it
    switch_flat(monkeypatch, flat)
    monkeypatch.setattr(fk, "use_kernel", lambda h: True)
    h, coeffs, coeff_mask, gates, fb_kernel, _, meta = make_inputs(2, 8, 12, 0, 0, False, False)
    leaves = [h.requires_grad_(), coeffs.to(torch.bfloat16).requires_grad_(), gates.requires_grad_()]
    with Ops() as ops:
        act = fk.sparse_ffn_activation(leaves[0], leaves[1], coeff_mask, leaves[2], None, None, None, **meta)
        grads = torch.autograd.grad(act, leaves, torch.ones_like(act))
    allocations = ("empty", "empty_like", "new_empty", "ones_like", "zeros")  # (ones_like: the test's output gradient)
    computed = [n for n in ops.names if not n.split(".")[0] in allocations and not any(
        w in n for w in ("view", "alias", "detach"))]
    assert computed == [], computed
    assert [g.dtype for g in grads] == [leaf.dtype for leaf in leaves]


# the backward's ways of running its loop: per-tile token sums, sums kept in registers across the tiles
# (``in_registers``), and the same with the next tile's loads issued a step ahead (``prefetch``)
BACKWARD_WAYS = {"per-tile-sums": dict(in_registers=False, prefetch=False),
                 "sums-in-registers": dict(in_registers=True, prefetch=False),
                 "sums-in-registers-prefetched": dict(in_registers=True, prefetch=True)}


@kernel_case
@pytest.mark.parametrize("way", BACKWARD_WAYS.values(), ids=BACKWARD_WAYS.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_backward_match_reference(case, way, monkeypatch):
    """Every way of running the backward's loop (``BACKWARD_WAYS``) gives the reference's output and gradients."""
    for key, value in way.items():
        monkeypatch.setitem(fk.BACKWARD_TILE, key, value)
    batch, tokens, m, k, r, token_gates, per_neuron, padded = case
    check_against_reference(*make_inputs(batch, tokens, m, k, r, token_gates, per_neuron, padded=padded))


@kernel_case
@pytest.mark.parametrize("series", ["all", "odd-on"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_series_with_odd_terms_takes_the_general_path_and_matches_reference(case, series):
    """With an odd term above T_1 on, the kernels run the full-degree recurrence (the even series'
    half-degree path would be wrong): the same check, at degree 6 (odd terms 3 and 5)."""
    batch, tokens, m, k, r, token_gates, per_neuron, padded = case
    check_against_reference(*make_inputs(batch, tokens, m, k, r, token_gates, per_neuron, degree=6, padded=padded,
                                         series=series))


@kernel_case
@pytest.mark.parametrize("flat", [False, True], ids=["tiled", "flat"])
def test_registered_ops_match_reference(flat, monkeypatch):
    """Plain eager calls skip the dispatcher; compiled and traced code calls the registered ops:
    the same check through them, on the tiled and on the flat kernels."""
    monkeypatch.setattr(fk, "EAGER_DIRECT", False)
    switch_flat(monkeypatch, flat)
    if flat:
        check_against_reference(*make_inputs(2, 5, 13, 0, 0, False, False))
    else:
        check_against_reference(*make_inputs(2, 5, 13, 4, 5, True, True, padded=True))


@kernel_case
@pytest.mark.parametrize("way", BACKWARD_WAYS.values(), ids=BACKWARD_WAYS.keys())
def test_the_polynomial_only_ffn_on_the_tiled_kernels_matches_reference(way, monkeypatch):
    """With the flat kernels off (``FLAT_TILE``), the FFN they would run takes the tiled ones:
    the same check, every way of running the backward's loop."""
    switch_flat(monkeypatch, False)
    for key, value in way.items():
        monkeypatch.setitem(fk.BACKWARD_TILE, key, value)
    check_against_reference(*make_inputs(2, 5, 19, 0, 0, False, False))


@kernel_case
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_and_large_inputs_stay_finite(dtype):
    h, coeffs, coeff_mask, gates, fb_kernel, token_mask, meta = make_inputs(1, 5, 10, 3, 4, True, True, padded=True,
                                                                            dtype=dtype)
    with torch.no_grad():  # beyond the polynomial's domain: the linear tail, up to |h| = 1e4
        h[0, 1:3] = torch.linspace(-1e4, 1e4, h.shape[-1], device=h.device).to(dtype)
        fb_kernel *= 0.3  # keeps the reference's feedback below fp16's 65504
    check_against_reference(h, coeffs, coeff_mask, gates, fb_kernel, token_mask, meta, dtype=dtype)


@kernel_case
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-ops"])
def test_decode_state_calls_equal_one_call(direct, monkeypatch):
    """Calls of 2, 1 and 3 tokens with the state equal one call over the 6 (the kernel reads and
    writes the state under no_grad); the state equals the reference's after each call. Directly
    (plain eager) and through the stateful op."""
    monkeypatch.setattr(fk, "EAGER_DIRECT", direct)
    h, coeffs, coeff_mask, gates, fb_kernel, token_mask, meta = make_inputs(2, 6, 6, 2, 5, True, False, window=4,
                                                                            padded=True)
    par = (coeffs, coeff_mask, gates, fb_kernel)
    whole = fk.sparse_ffn_activation_reference(h, *par, None, token_mask, **meta)
    state = torch.zeros(2, 3, 5, device=h.device)
    state_ref = state.clone()
    parts, start = [], 0
    with torch.no_grad():
        for n in (2, 1, 3):
            mask = token_mask[:, : 2 + start + n]
            step = h[:, start : start + n]
            parts.append(fk.sparse_ffn_activation(step, *par, state, mask, **meta))
            fk.sparse_ffn_activation_reference(step, *par, state_ref, mask, **meta)
            assert_close(state, state_ref, torch.float32, f"state after {start + n} tokens")
            start += n
    assert_close(torch.cat(parts, dim=1), whole, torch.float32, "act by steps")


@kernel_case
def test_decode_state_with_autograd():
    """With gradients the op reads the state, the state still advances, and the gradients match."""
    h, coeffs, coeff_mask, gates, fb_kernel, _, meta = make_inputs(2, 2, 6, 0, 5, False, False, window=4)
    state = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(2)).to(h.device)
    state_ref = state.clone()
    leaves = [h.requires_grad_(), fb_kernel.requires_grad_()]
    got = fk.sparse_ffn_activation(h, coeffs, coeff_mask, gates, fb_kernel, state, None, **meta)
    want = fk.sparse_ffn_activation_reference(h, coeffs, coeff_mask, gates, fb_kernel, state_ref, None, **meta)
    assert_close(got, want, torch.float32, "act")
    assert_close(state, state_ref, torch.float32, "state")
    for a, b in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), leaves)):
        assert_close(a, b, torch.float32, "grad")


@kernel_case
@pytest.mark.parametrize("way", BACKWARD_WAYS.values(), ids=BACKWARD_WAYS.keys())
def test_opcheck(way, monkeypatch):
    for key, value in way.items():
        monkeypatch.setitem(fk.BACKWARD_TILE, key, value)
    h, coeffs, coeff_mask, gates, fb_kernel, token_mask, meta = make_inputs(1, 2, 5, 2, 2, True, True, window=2,
                                                                            padded=True)
    tail = (meta["m"], meta["k"], meta["r"], meta["n_gates"], meta["domain"], meta["degree"])
    coeffs, gates, fb_kernel = coeffs.requires_grad_(), gates.requires_grad_(), fb_kernel.requires_grad_()
    torch.library.opcheck(torch.ops.sparse_gpt2.ffn_activation,
                          (h.requires_grad_(), coeffs, coeff_mask, gates, fb_kernel, None, token_mask, *tail))
    state = torch.randn(1, 1, 2, device=h.device)
    args = (h.detach()[:, :1], coeffs.detach(), coeff_mask, gates.detach(), fb_kernel.detach(), state, token_mask,
            *tail)
    torch.library.opcheck(torch.ops.sparse_gpt2.ffn_activation_stateful, args)


@kernel_case
@pytest.mark.usefixtures("flat_on")
def test_opcheck_flat():
    h, coeffs, coeff_mask, gates, _, _, meta = make_inputs(2, 3, 7, 0, 0, False, False)
    tail = (meta["m"], meta["k"], meta["r"], meta["n_gates"], meta["domain"], meta["degree"])
    torch.library.opcheck(torch.ops.sparse_gpt2.ffn_activation, (h.requires_grad_(), coeffs.requires_grad_(),
                                                                 coeff_mask, gates.requires_grad_(), None, None, None,
                                                                 *tail))


@needs_kernels
@pytest.mark.parametrize(
    "overrides",
    [
        dict(sparse_components=["polynomial", "spectral", "feedback"]),
        dict(sparse_components=["polynomial", "feedback"], gate_kind="token", poly_coefficients="per_neuron"),
        dict(gate_kind="token"),  # all five: tensor and micro beside the kernel, their token gates after it
        dict(sparse_components=["polynomial"]),  # the conversion's default: the flat kernels
    ],
    ids=["default", "token-per-neuron", "all-token", "polynomial-only"],
)
def test_the_model_on_the_kernel_equals_the_reference_path_and_decodes_like_it(overrides, monkeypatch):
    """The whole model with the kernel in its FFNs: logits and parameter gradients equal the
    per-component reference path, and cached decoding (state in the kernel) equals no cache (the
    polynomial-only model on the flat kernels)."""
    from conftest import tiny_model

    switch_flat(monkeypatch, True)

    model = tiny_model(**overrides).to(DEVICE)
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight[block.mlp.gate_rows].normal_(std=0.3)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = {}
    for fused in (True, False):
        model.set_fused_ffn(fused)
        model.zero_grad()
        logits = model(ids, attention_mask=mask).logits
        logits.square().mean().backward()
        out[fused] = logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_close(out[True][0], out[False][0], torch.float32, "logits")
    assert out[True][1].keys() == out[False][1].keys()
    for name in out[True][1]:
        assert_close(out[True][1][name], out[False][1][name], torch.float32, name)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():  # cached on the kernel against no cache on the reference path (equal to the kernel's, above)
        model.set_fused_ffn(True)
        cached = model.generate(ids, attention_mask=mask, **kw)
        model.set_fused_ffn(False)
        assert torch.equal(cached, model.generate(ids, attention_mask=mask, use_cache=False, **kw))


def test_masked_coefficients_follow_in_place_weight_updates_without_autograd():
    """No-grad eager calls reuse the FFN's masked coefficients until a weight changes in place
    (an optimizer step, a new mask): the fused path then still equals the reference path."""
    from conftest import tiny_model

    model = tiny_model(sparse_components=["polynomial", "spectral", "feedback"]).to(DEVICE)
    ids = torch.randint(1, 97, (1, 5), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    poly = model.transformer.h[0].mlp.components["polynomial"]
    with torch.no_grad():
        before = model(ids).logits
        for update in (lambda: poly.coeffs.mul_(-0.5), lambda: poly.coeff_mask[1].zero_()):
            update()
            model.set_fused_ffn(True)
            fused = model(ids).logits
            model.set_fused_ffn(False)
            assert_close(fused, model(ids).logits, torch.float32, "fused vs reference after the update")
            assert not torch.allclose(fused, before)
            before = fused

def test_cases_under_the_interpreter():
    if fk.triton is None:
        pytest.skip("triton is not installed")
    if RUNS_HERE:
        pytest.skip("the kernel cases run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cases = "not interpreter and not without_triton"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(HERE), "-k", cases]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


NO_TRITON = r"""
import importlib.util, sys
import torch

class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoTriton())
sys.path.insert(0, sys.argv[1])
from modeling_sparse_gpt2 import ffn_kernels as fk
assert fk.triton is None and "triton" not in sys.modules
assert not fk.use_kernel(torch.zeros(1)) and not hasattr(torch.ops.sparse_gpt2, "ffn_activation")
h = torch.randn(2, 4, 8, requires_grad=True)
args = (h, torch.randn(3), torch.tensor([1.0, 1.0, 0.0]), torch.ones(3), torch.randn(2, 3), None, None)
meta = dict(m=4, k=2, r=2, n_gates=0, domain=2.0, degree=2)
act = fk.sparse_ffn_activation(*args, **meta)
assert torch.equal(act, fk.sparse_ffn_activation_reference(*args, **meta))
act.sum().backward()
assert h.grad is not None
print("ok")
"""


def test_imports_and_runs_without_triton():
    """A CPU-only user without triton (remote code): the module imports and runs the reference."""
    run = subprocess.run([sys.executable, "-c", NO_TRITON, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]

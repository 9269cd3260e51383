"""The sparse FFN's middle stage as one Triton kernel forward and one backward.

The FFN is ``h = c_fc(x)`` -> ``act = sparse_ffn_activation(h, ...)`` -> ``y = c_proj(act)``.
Columns of ``h``: ``[poly m | spectral k | feedback r | token gates n_gates]``; of ``act``:
``[poly m | spectral k | feedback r]``. Per token (``s`` = domain, ``g_c`` = learned scalar gates in
segment order poly, spectral, feedback, ``tau_c = 2 sigmoid(h_gate_c)`` when ``n_gates > 0``, else 1):

    poly:      t = clamp(h / s, -1, 1);  a = sum_i c_{p,i} T_i(t) + relu(h - s)     (p = 0 or the neuron)
    spectral:  a = h
    feedback:  u_t = h_t * token_mask_t;  full = [state (w-1 rows, or zeros) ; u]
               a_t = gelu_tanh(sum_{j<w} K[:, j] * full[t + j])                   (K[:, w-1]: this token)
    act = g_c * tau_c * a        (segment c of each column)

With ``fb_state`` the last ``w - 1`` rows of ``full`` are written back into it (decode).

The series is ``c * mask`` (the parameters and the mask as they are: the kernels read them in fp32
and write the gradients back in the parameters' dtypes). When the mask switches off every odd term
above T_1, as the conversion's GELU fit does, the polynomial backward runs its pass over T_j(u), u =
T_2(t) = 2t^2 - 1, to half the degree (T_2j(t) = T_j(T_2(t)); p = c_1 t + sum_j c_2j T_j(u)): a branch on
the mask, one per program.

FLOPs per token (elementwise, fp32 inside), approximately: poly m·(3·deg + 8) (Clenshaw, clamp,
linear tail), feedback r·(2·w + 12) (window,
gelu), gates 2·(m + k + r) + 4·n_gates. Backward: poly m·(6·deg + 12) (one pass over T_i(t) for the
derivative and the coefficient gradients' terms, three multiply-adds per degree, about half for the
even series; with token gates the value too, 8·deg + 12), feedback r·w·(2·w + 20) (u_t reaches the w
outputs t..t+w-1, whose pre-activations are recomputed from h), gates 4·(m + k + r). The kernels read h once and write
their output once (the backward also reads dL/dact; the feedback columns re-read w rows of h per
tap from cache); everything else is in registers.

Kernel design. The kernels run on programs over (token tiles, column tiles); a tile is ``BT``
tokens of one sequence times ``BC`` activation columns. The forward launches one program per tile;
a tile handles the segment(s) its columns fall in through scalar ``if``s on the tile's column range
plus per-column masks. Feedback columns read the ``w - 1`` earlier tokens from ``h`` (or from the
decode state / zeros before the sequence start); the token gates are read per row. The backward is
two kernels over disjoint columns: ``_backward_kernel`` on the polynomial and spectral columns
(no feedback code, so its registers are those of the Clenshaw recurrences) and
``_feedback_backward_kernel`` on the feedback columns with its own, narrower column tiles. Each
launches ``G`` programs per column tile (the same ``G`` for both); a program walks every G-th
token tile (a loop of ``ceil(tiles / G)`` steps, the last one masked where it runs past the tiles).
The polynomial kernel, by default (``BACKWARD_TILE["in_registers"]``), keeps one ``[BT, BC]`` fp32
tile per coefficient, adds to it elementwise on every token tile and sums its tokens once after the
last (small tiles, no reduction inside the loop), and with ``prefetch`` loads the next tile's h and
dL/dact before this tile's arithmetic; otherwise, as the feedback kernel does, it adds one token sum
(``tl.sum`` over axis 0) per coefficient and tile into a ``[coefficient, column]`` tile. At the end a
program writes its partial sums once (no atomics) into its row
of one buffer ``part`` (``_part_layout``; for shared coefficients the column reduction is done here,
once); ``_reduce_kernel`` sums ``part`` over the programs and the column tiles' slots into the
parameters' gradients (times the mask for the coefficients), in a fixed order. The token-gate gradient of a row is a sum over columns, which the column tiles split,
so each column tile writes its per-row partial and one ``sum`` over the column tiles adds them.

The polynomial-only FFN with one shared series and a scalar gate (the conversion's default) is one
elementwise function over all of h's elements, so it has its own two kernels (``_flat``; opt-in, each
side by ``FLAT_TILE["forward_on"]`` / ``["backward_on"]``, until they are timed on a GPU): the forward and
the backward run over h as one contiguous run of elements, BLOCK at a time, each program over its own
contiguous share of the blocks, one wave of programs (``FLAT_TILE``). There is no column tile to fill (the tiled backward's 512-column tiles compute 1,536
columns for m = 1,216, a quarter of them masked), the loads are 16-byte vectors, the gate is folded into
the series, the forward evaluates it in powers of t by Horner's rule (the power coefficients made once
per program from the Chebyshev ones; one multiply-add per degree where Clenshaw's recurrence takes two;
up to ``POWER_BASIS_MAX_DEGREE``, where the basis change's rounding stays near fp32's), and each backward
program writes one row of partial sums for the same ``_reduce_kernel``.

Dispatch (``use_kernel``): the Triton ops run on CUDA when triton is installed, and on CPU tensors
when ``TRITON_INTERPRET=1`` was set before triton was imported (Triton's interpreter; this is how
CI tests them). Everywhere else ``sparse_ffn_activation`` is ``sparse_ffn_activation_reference``
(plain torch, autograd through torch), so the module imports and works without triton.
The kernels are registered as ``torch.library`` ops (``triton_op``, autograd by
``register_autograd``), which ``torch.compile`` and tracing see. A plain eager call (real tensors,
no compiler, no dispatch mode: ``_plain_eager``) calls the same ``_forward`` / ``_backward``
directly (an ``autograd.Function`` where gradients are needed) and launches the kernels without
``wrap_triton``: the ops' Python dispatch layers cost several times the launch on the host, which
is what eager decode and small prefills pay.
Under the interpreter, ``wrap_triton`` hands back the Python-emulated kernel, which cannot be traced:
the ops then stay opaque to AOT autograd (as a ``custom_op`` is) and skip the launch on fake tensors.
"""


import torch
from torch import Tensor

from .feedback import causal_feedback
from .polynomial import POWER_BASIS_MAX_DEGREE, chebyshev_activation

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    INTERPRET = bool(triton.knobs.runtime.interpret)  # TRITON_INTERPRET=1, read by triton at import
except ImportError:  # CPU-only users: the reference path below needs no triton
    triton = None
    INTERPRET = False

# Tile sizes (tokens, columns; the backward's feedback kernel has its own column width), the backward's
# warps, its programs per column tile (None: `programs_per_sm` per SM over the polynomial column tiles, 2 per
# SM over the feedback ones) and how its loop runs. Backward 1 token x 512 columns, two warps (8 columns per
# thread), sums in registers, loads prefetched, 6 programs per SM: the fastest polynomial backward kernel of
# `kernel_microbench --polynomial-only --sweep` on the H200 (d = 768, 8,192 tokens, bf16; docs/benchmarks.md
# §3.15). `kernel_registers`: 168 registers, no spill, 6 such programs resident per SM, so one wave.
# ``programs_per_sm`` also caps the backward's registers per thread at what that many programs leave
# (``_register_cap``: 168 for 6 x 2 warps): ptxas otherwise takes registers it can have (the kernel with
# both of its loops, general and even series, compiled to 244 where either loop alone needs 168), and
# fewer programs fit an SM.
FORWARD_TILE = {"tokens": 32, "columns": 64, "warps": 4}
BACKWARD_TILE = {"tokens": 1, "columns": 512, "warps": 2, "feedback_columns": 16, "token_programs": None,
                 "programs_per_sm": 6, "in_registers": True, "prefetch": True}
# The polynomial-only FFN with one shared series (the conversion's default; ``_flat``) runs flat kernels over h's
# elements: BLOCK elements a step, ``warps`` warps a program, ``per_sm`` programs per SM (one wave: each program
# walks its own contiguous share of the blocks, so no partial second wave); the forward in powers of t by Horner's
# rule (``horner``, up to polynomial.POWER_BASIS_MAX_DEGREE), the backward with the next block's loads prefetched.
# Both launch with registers capped so that per_sm programs fit an SM (``_register_cap``; sm_90, ``kernel_registers``:
# the forward takes 28 of its 32, the backward 128, where uncapped it took 168 and 3 programs fit, not 4).
# ``forward_on`` / ``backward_on``: whether that side runs flat (the two are independent: the flat backward needs
# only h, so either side may win its own sweep). Off until the flat kernels are timed on a GPU beside the tiled
# ones (docs/benchmarks.md §3.17: tested equal to the reference, and cheaper per element in their compiled code,
# but not yet measured), so that FFN runs on the tiled kernels above unless a caller turns them on (``--flat-tile``
# in the benchmarks).
FLAT_TILE = {"forward_on": False, "forward_block": 1024, "forward_warps": 4, "forward_per_sm": 16, "horner": True,
             "backward_on": False, "backward_block": 1024, "backward_warps": 4, "backward_per_sm": 4, "prefetch": True}
# Partial sums per slot that a ``_reduce_kernel`` program loads per step (BLOCK outputs x REDUCE_STEP // BLOCK
# rows, 16 to 1,024 rows): one step holds every backward program's row at GPT-2's sizes (264 or 528 programs).
REDUCE_STEP = 4096
# Plain eager calls skip the torch.library dispatcher (``_plain_eager``); False: always the ops.
EAGER_DIRECT = True


def plain_eager(t: Tensor) -> bool:
    """A plain tensor outside any compiler, tracing or dispatch mode: where Python may take shortcuts
    that traced code must not see (calling the kernels directly)."""
    return type(t) is Tensor and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()


def use_kernel(h: Tensor) -> bool:
    """Whether ``sparse_ffn_activation`` runs the Triton kernels for this input."""
    if triton is None:
        return False
    return h.is_cuda or (INTERPRET and h.device.type == "cpu")


# ---------------------------------------------------------------------------------- reference
def sparse_ffn_activation_reference(
    h: Tensor,
    coeffs: Tensor,
    coeff_mask: Tensor,
    gates: Tensor,
    fb_kernel: Tensor | None,
    fb_state: Tensor | None,
    token_mask: Tensor | None,
    *,
    m: int,
    k: int,
    r: int,
    n_gates: int,
    domain: float,
    degree: int,
) -> Tensor:
    """The specification in plain torch (fp32 inside, fp64 for fp64 inputs), from the components' own functions."""
    x = h.to(torch.promote_types(h.dtype, torch.float32))
    n_act = m + k + r
    segments = []
    if m:  # (degree+1,) or (P, degree+1): one series, or one per neuron (P == 1 broadcasts)
        segments.append(chebyshev_activation(x[..., :m], coeffs.to(x.dtype), coeff_mask.to(x.dtype), domain, degree))
    if k:
        segments.append(x[..., m : m + k])
    if r:
        u = x[..., m + k : n_act]
        squeeze = u.dim() == 2  # (tokens, r): one sequence
        if squeeze:
            u = u[None]
            token_mask = token_mask.reshape(1, -1) if token_mask is not None else None
        s = causal_feedback(u, fb_kernel.to(x.dtype), fb_state if fb_kernel.shape[1] > 1 else None, token_mask)
        segments.append(s[0] if squeeze else s)
    scaled = []
    for i, a in enumerate(segments):
        a = a * gates[i].to(x.dtype)
        if n_gates:
            a = a * (2 * torch.sigmoid(x[..., n_act + i : n_act + i + 1]))
        scaled.append(a)
    return (torch.cat(scaled, dim=-1) if len(scaled) > 1 else scaled[0]).to(h.dtype)  # one segment: no copy


def _check(h, coeffs, coeff_mask, gates, fb_kernel, fb_state, m, k, r, n_gates, degree):
    """One-line errors for inputs that do not fit the segment widths (the token mask's length is
    checked on every call, also with ``checked=False``)."""
    n_seg = (m > 0) + (k > 0) + (r > 0)
    fail = "sparse_ffn_activation: "
    if h.dim() not in (2, 3) or h.shape[-1] != m + k + r + n_gates:
        raise ValueError(f"{fail}h {tuple(h.shape)} must end in m+k+r+n_gates = {m + k + r + n_gates} columns")
    if coeffs.shape[-1] != degree + 1 or coeffs.dim() > 2 or (coeffs.dim() == 2 and coeffs.shape[0] not in (1, m)):
        raise ValueError(f"{fail}coeffs {tuple(coeffs.shape)} must be (degree+1={degree + 1},) or (1 or m={m}, degree+1)")
    if coeff_mask.shape != (degree + 1,):
        raise ValueError(f"{fail}coeff_mask {tuple(coeff_mask.shape)} must be (degree+1={degree + 1},)")
    if gates.shape != (n_seg,) or n_gates not in (0, n_seg):
        raise ValueError(f"{fail}gates {tuple(gates.shape)}, n_gates={n_gates} must match the {n_seg} segments")
    if r and (fb_kernel is None or fb_kernel.dim() != 2 or fb_kernel.shape[0] != r):
        got = None if fb_kernel is None else tuple(fb_kernel.shape)
        raise ValueError(f"{fail}fb_kernel must be (r={r}, window), got {got}")
    if fb_state is not None and r:
        batch = h.shape[0] if h.dim() == 3 else 1
        if tuple(fb_state.shape) != (batch, fb_kernel.shape[1] - 1, r):
            raise ValueError(f"{fail}fb_state {tuple(fb_state.shape)} must be (batch, window-1, r)")


def sparse_ffn_activation(
    h: Tensor,
    coeffs: Tensor,
    coeff_mask: Tensor,
    gates: Tensor,
    fb_kernel: Tensor | None,
    fb_state: Tensor | None,
    token_mask: Tensor | None,
    *,
    m: int,
    k: int,
    r: int,
    n_gates: int,
    domain: float,
    degree: int,
    checked: bool = True,
) -> Tensor:
    """``act`` (..., m + k + r) from ``h`` (..., m + k + r + n_gates): one kernel where ``use_kernel(h)``.

    ``coeffs`` are the Chebyshev coefficients, (degree+1,) or (1, degree+1) shared, (m, degree+1) per
    neuron, and ``coeff_mask`` (degree+1,) which of them are on: the series is ``coeffs * coeff_mask``;
    ``gates`` (n_seg,) the scalar gates; ``fb_kernel`` (r, w) the causal taps (all as the parameters
    are, in their own dtypes: the kernels read them in fp32 and write their gradients back in those
    dtypes, so a call makes no tensors from them); ``fb_state``
    (batch, w-1, r) the decode state, updated in place (None: zeros, no update); ``token_mask``
    (batch, T') the 0/1 mask of real tokens, whose last T columns belong to this call.
    ``checked=False`` skips ``_check``'s shape checks, for callers whose arguments follow from a layout
    checked once (the FFN, on every call of every block); the token mask, the caller's input, is
    checked always (the kernels would read before its start).
    """
    if checked:
        _check(h, coeffs, coeff_mask, gates, fb_kernel, fb_state, m, k, r, n_gates, degree)
    if token_mask is not None and token_mask.shape[-1] < h.shape[-2]:
        raise ValueError(f"sparse_ffn_activation: token_mask {tuple(token_mask.shape)} is shorter than the "
                         f"{h.shape[-2]} tokens")
    if not use_kernel(h):
        return sparse_ffn_activation_reference(h, coeffs, coeff_mask, gates, fb_kernel, fb_state, token_mask, m=m, k=k,
                                               r=r, n_gates=n_gates, domain=domain, degree=degree)
    h3 = h if h.dim() == 3 else h[None]
    if token_mask is not None and token_mask.dim() == 1:
        token_mask = token_mask[None]
    if not r:
        fb_kernel = fb_state = None
    elif fb_state is not None and fb_kernel.shape[1] == 1:
        fb_state = None  # a window of one token keeps no state
    args = (h3, coeffs, coeff_mask, gates, fb_kernel, fb_state, token_mask, m, k, r, n_gates, float(domain), degree)
    needs_grad = torch.is_grad_enabled() and (
        h.requires_grad or coeffs.requires_grad or gates.requires_grad or (fb_kernel is not None and fb_kernel.requires_grad)
    )
    direct = _plain_eager(h3)
    if fb_state is not None and not needs_grad:  # decode: the state is read and written by the kernel
        act = _forward(*args, True, direct=True) if direct else torch.ops.sparse_gpt2.ffn_activation_stateful(*args)
    elif not needs_grad and direct:
        act = _forward(*args, False, direct=True)
    else:
        if fb_state is not None:  # with autograd the op reads a copy of the state (saved for backward)
            args = args[:5] + (fb_state.clone(),) + args[6:]
        act = _EagerActivation.apply(*args) if direct else torch.ops.sparse_gpt2.ffn_activation(*args)
        if fb_state is not None:  # ... and the state is advanced here
            with torch.no_grad():
                u = h3[..., m + k : m + k + r]
                causal_feedback(u.float(), fb_kernel.float(), fb_state, token_mask)  # advances fb_state
    return act if h.dim() == 3 else act[0]


# ------------------------------------------------------------------------------- triton kernels
if triton is not None:

    @triton.jit
    def _gelu_tanh(z):
        """gelu_tanh(z) = z sigmoid(2 c (z + 0.044715 z^3)) and its derivative."""
        c = 0.7978845608028654
        sg = tl.sigmoid(2.0 * c * (z + 0.044715 * z * z * z))
        return z * sg, sg + z * sg * (1.0 - sg) * 2.0 * c * (1.0 + 3.0 * 0.044715 * z * z)

    @triton.jit
    def _feedback_u(h_seq, state_seq, mask_seq, times, rc, is_fb, T, stride_ht, stride_st, stride_mt, mask_off, fb0,
                    HAS_MASK: tl.constexpr, HAS_STATE: tl.constexpr, WINDOW: tl.constexpr):
        """u at ``times`` (vector, may be < 0 or >= T) for feedback channels ``rc``, fp32."""
        in_seq = (times >= 0) & (times < T)
        ptr = h_seq + times[:, None] * stride_ht + (fb0 + rc)[None, :]
        u = tl.load(ptr, mask=in_seq[:, None] & is_fb[None, :], other=0.0).to(tl.float32)
        if HAS_MASK:
            keep = tl.load(mask_seq + (mask_off + times) * stride_mt, mask=in_seq, other=0).to(tl.float32)
            u = u * keep[:, None]
        if HAS_STATE:
            before = (times < 0) & (times >= 1 - WINDOW)
            sptr = state_seq + (times + WINDOW - 1)[:, None] * stride_st + rc[None, :]
            u += tl.load(sptr, mask=before[:, None] & is_fb[None, :], other=0.0).to(tl.float32)
        return u

    @triton.jit
    def _feedback_z(h_seq, state_seq, mask_seq, kern_ptr, times, rc, is_fb, T, stride_ht, stride_st, stride_mt,
                    mask_off, fb0, HAS_MASK: tl.constexpr, HAS_STATE: tl.constexpr, WINDOW: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr):
        """Pre-activation z_t = sum_j K[:, j] u_{t-w+1+j} of the feedback columns at ``times``."""
        z = tl.zeros((BT, BC), dtype=tl.float32)
        for j in tl.static_range(WINDOW):
            u = _feedback_u(h_seq, state_seq, mask_seq, times - (WINDOW - 1) + j, rc, is_fb, T, stride_ht, stride_st,
                            stride_mt, mask_off, fb0, HAS_MASK, HAS_STATE, WINDOW)
            kj = tl.load(kern_ptr + rc * WINDOW + j, mask=is_fb, other=0.0).to(tl.float32)
            z += kj[None, :] * u
        return z

    @triton.jit
    def _token_gates(h_rows, row_ok, cols, m, k, r, gate_col, SPEC_IDX, FB_IDX, TOKEN_GATES: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr):
        """(tau, dtau/dh_gate) per element: 2 sigmoid(h_gate of the column's segment), or (1, 0)."""
        if TOKEN_GATES:
            hp = tl.load(h_rows + gate_col, mask=row_ok & (m > 0), other=0.0).to(tl.float32)
            hs = tl.load(h_rows + gate_col + SPEC_IDX, mask=row_ok & (k > 0), other=0.0).to(tl.float32)
            hf = tl.load(h_rows + gate_col + FB_IDX, mask=row_ok & (r > 0), other=0.0).to(tl.float32)
            hg = tl.where(cols[None, :] < m, hp[:, None], tl.where(cols[None, :] < m + k, hs[:, None], hf[:, None]))
            sg = tl.sigmoid(hg)
            return 2.0 * sg, 2.0 * sg * (1.0 - sg)
        else:
            return tl.full((BT, BC), 1.0, tl.float32), tl.zeros((BT, BC), dtype=tl.float32)

    @triton.jit
    def _chebyshev_coefficients(coeff_ptr, mask_ptr, cols, is_poly, DEGREE: tl.constexpr, PER_NEURON: tl.constexpr):
        """The DEGREE + 1 masked Chebyshev coefficients c_i * mask_i as a tuple of fp32 values: scalars
        (shared), or [1, BC] rows of the tile's columns (per neuron)."""
        coef = ()
        for i in tl.static_range(DEGREE + 1):
            if PER_NEURON:
                ci = tl.load(coeff_ptr + cols * (DEGREE + 1) + i, mask=is_poly, other=0.0)[None, :]
            else:
                ci = tl.load(coeff_ptr + i)
            coef = coef + (ci.to(tl.float32) * tl.load(mask_ptr + i).to(tl.float32),)
        return coef

    @triton.jit
    def _odd_terms_masked(mask_ptr, DEGREE: tl.constexpr):
        """Whether the mask switches off every odd term above T_1 (the conversion's GELU series: T_1 plus
        even terms): then p(t) = c_1 t + q(T_2(t)) with q = sum_j c_2j T_j, since T_2j(t) = T_j(T_2(t)),
        a series of half the degree in u = T_2(t) = 2 t^2 - 1 (``_even_*``). A scalar, one per program."""
        off = tl.load(mask_ptr + 3) == 0
        for i in tl.static_range(5, DEGREE + 1, 2):
            off = off & (tl.load(mask_ptr + i) == 0)
        return off

    @triton.jit
    def _even_series(coef, DEGREE: tl.constexpr):
        """(c_0, c_2, ..., c_2H), H = DEGREE // 2: the series q in u = T_2(t)."""
        sub = ()
        for j in tl.static_range(DEGREE // 2 + 1):
            sub = sub + (coef[2 * j],)
        return sub

    @triton.jit
    def _clenshaw(tc, coef, DEGREE: tl.constexpr):
        """sum_{i <= DEGREE} c_i T_i(t) by Clenshaw: b_i = c_i + 2 t b_{i+1} - b_{i+2}, sum = c_0 + t b_1 - b_2."""
        b1 = tl.zeros_like(tc)
        b2 = tl.zeros_like(tc)
        tc2 = tc + tc
        for step in tl.static_range(DEGREE):
            b0 = coef[DEGREE - step] + tc2 * b1 - b2
            b2 = b1
            b1 = b0
        return coef[0] + tc * b1 - b2

    @triton.jit
    def _forward_kernel(
        h_ptr, out_ptr, coeff_ptr, coeff_mask_ptr, gate_ptr, kern_ptr, state_ptr, mask_ptr,
        T, n_tiles_t, stride_hb, stride_ht, stride_ob, stride_ot, stride_sb, stride_st, stride_mb, stride_mt, mask_off,
        m, k, r, SPEC_IDX, FB_IDX, domain,
        DEGREE: tl.constexpr, WINDOW: tl.constexpr, PER_NEURON: tl.constexpr, TOKEN_GATES: tl.constexpr,
        HAS_MASK: tl.constexpr, HAS_STATE: tl.constexpr, WRITE_STATE: tl.constexpr,
        BT: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
        domain = tl.cast(domain, tl.float32)  # fp64 in compiled graphs (the schema says float), a Python float in analysis
        b = (pid_t // n_tiles_t).to(tl.int64)
        tt = pid_t % n_tiles_t
        n_act = m + k + r
        fb0 = m + k
        col0 = pid_c * BC
        t = tt * BT + tl.arange(0, BT)
        cols = col0 + tl.arange(0, BC)
        row_ok = t < T
        col_ok = cols < n_act
        ok = row_ok[:, None] & col_ok[None, :]
        h_seq = h_ptr + b * stride_hb
        h_rows = h_seq + t * stride_ht
        x = tl.load(h_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        a = x  # spectral: identity
        if col0 < m:  # poly: Clenshaw's recurrence to the full degree. This kernel is memory-bound: the backward's
            # half-degree path for the even series, tried here with its branch, made it slower (H200: 16.6 -> 19.6 us)
            tc = tl.minimum(tl.maximum(x / domain, -1.0), 1.0)
            coef = _chebyshev_coefficients(coeff_ptr, coeff_mask_ptr, cols, cols < m, DEGREE, PER_NEURON)
            poly = _clenshaw(tc, coef, DEGREE) + tl.maximum(x - domain, 0.0)
            a = tl.where(cols[None, :] < m, poly, a)
        state_seq = state_ptr + b * stride_sb
        mask_seq = mask_ptr + b * stride_mb
        rc = cols - fb0
        is_fb = (cols >= fb0) & col_ok
        if (col0 + BC > fb0) & (r > 0):  # feedback: causal window over u
            z = _feedback_z(h_seq, state_seq, mask_seq, kern_ptr, t, rc, is_fb, T, stride_ht, stride_st, stride_mt,
                            mask_off, fb0, HAS_MASK, HAS_STATE, WINDOW, BT, BC)
            s, _ = _gelu_tanh(z)
            a = tl.where(is_fb[None, :], s, a)
            if WRITE_STATE:
                if tt == 0:  # the only tile that reads the old state (BT >= w-1) writes the new one
                    j = tl.arange(0, BS)
                    new = _feedback_u(h_seq, state_seq, mask_seq, T + j - (WINDOW - 1), rc, is_fb, T, stride_ht,
                                      stride_st, stride_mt, mask_off, fb0, HAS_MASK, HAS_STATE, WINDOW)
                    tl.debug_barrier()
                    sptr = state_seq + j[:, None] * stride_st + rc[None, :]
                    tl.store(sptr, new.to(state_ptr.dtype.element_ty), mask=(j < WINDOW - 1)[:, None] & is_fb[None, :])
        seg = tl.where(cols < m, 0, tl.where(cols < fb0, SPEC_IDX, FB_IDX))
        gate = tl.load(gate_ptr + seg, mask=col_ok, other=0.0).to(tl.float32)
        tau, _ = _token_gates(h_rows, row_ok, cols, m, k, r, n_act, SPEC_IDX, FB_IDX, TOKEN_GATES, BT, BC)
        out = a * gate[None, :] * tau
        out_rows = out_ptr + b * stride_ob + t * stride_ot
        tl.store(out_rows[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _row_gate_parts(row_part_ptr, tile_c, n_rows, b, t, T, row_ok, dg, cols, m, fb0, n_act, SPEC_IDX, FB_IDX,
                        N_SEG):
        """This column tile's share of dL/dh_gate per row and segment (zeros for segments it lacks)."""
        rp = row_part_ptr + (tile_c * n_rows + b * T + t) * N_SEG
        if m > 0:
            tl.store(rp, tl.sum(tl.where((cols < m)[None, :], dg, 0.0), axis=1), mask=row_ok)
        if fb0 > m:
            tl.store(rp + SPEC_IDX, tl.sum(tl.where(((cols >= m) & (cols < fb0))[None, :], dg, 0.0), axis=1),
                     mask=row_ok)
        if n_act > fb0:
            tl.store(rp + FB_IDX, tl.sum(tl.where(((cols >= fb0) & (cols < n_act))[None, :], dg, 0.0), axis=1),
                     mask=row_ok)

    @triton.jit
    def _gate_slots(slot_ptr, acc_gate, cols, m, fb0, n_act, SPEC_IDX, FB_IDX):
        """Per-segment sums of one column tile's gate accumulator, into its slot."""
        if m > 0:
            tl.store(slot_ptr, tl.sum(tl.where(cols < m, acc_gate, 0.0), axis=0))
        if fb0 > m:
            tl.store(slot_ptr + SPEC_IDX, tl.sum(tl.where((cols >= m) & (cols < fb0), acc_gate, 0.0), axis=0))
        if n_act > fb0:
            tl.store(slot_ptr + FB_IDX, tl.sum(tl.where((cols >= fb0) & (cols < n_act), acc_gate, 0.0), axis=0))

    @triton.jit
    def _add_at(terms, i: tl.constexpr, v):
        """``terms`` (a tuple of tiles) with ``v`` added to its i-th tile (tuples are immutable)."""
        out = ()
        for j in tl.static_range(len(terms)):
            if j == i:
                out = out + (terms[j] + v,)
            else:
                out = out + (terms[j],)
        return out

    @triton.jit
    def _tile_rows(tile, n_tiles, n_tiles_t, T, BT: tl.constexpr, FLAT: tl.constexpr = False):
        """(sequence, token indices, rows in range) of token tile ``tile``; a tile past the last one
        (a program's masked last step) has no rows in range and the addresses of tile 0. ``FLAT``: the
        tokens of every sequence as one (sequence 0 of ``T`` = all rows; no integer division per tile)."""
        live = tile < n_tiles
        tile = tl.where(live, tile, 0)
        if FLAT:
            t = tile * BT + tl.arange(0, BT)
            return tl.zeros((), dtype=tl.int64), t, (t < T) & live
        t = (tile % n_tiles_t) * BT + tl.arange(0, BT)
        return (tile // n_tiles_t).to(tl.int64), t, (t < T) & live

    @triton.jit
    def _derivative_coefficients(coef, inv_domain, DEGREE: tl.constexpr):
        """``d`` with p'(h) = sum_{j < DEGREE} d_j T_j(t) for p = sum_i c_i T_i(t), t = h / s (the 1 / s of
        dt/dh folded in): d_{j-1} = d_{j+1} + 2 j c_j from j = DEGREE down to 1, d_0 halved (the Chebyshev
        derivative recurrence). Computed once per program, from the coefficients' values or rows."""
        d = ()
        d_next = coef[0] * 0.0  # d_{j+1}
        d_cur = coef[0] * 0.0  # d_j
        for s in tl.static_range(DEGREE):
            d_prev = d_next + (2.0 * (DEGREE - s)) * coef[DEGREE - s]
            d = (d_prev,) + d
            d_next = d_cur
            d_cur = d_prev
        out = ()
        for j in tl.static_range(DEGREE):
            if j == 0:
                out = out + (d[0] * (0.5 * inv_domain),)
            else:
                out = out + (d[j] * inv_domain,)
        return out

    @triton.jit
    def _load_pair(h_ptr, gout_ptr, b, t, stride_hb, stride_ht, stride_gb, stride_gt, cols, ok):
        """h and dL/dact of one tile, in their storage dtype."""
        x = tl.load((h_ptr + b * stride_hb + t * stride_ht)[:, None] + cols[None, :], mask=ok, other=0.0)
        go = tl.load((gout_ptr + b * stride_gb + t * stride_gt)[:, None] + cols[None, :], mask=ok, other=0.0)
        return x, go

    @triton.jit
    def _accumulate(terms, acc_coeff, di, i: tl.constexpr, v, IN_REGISTERS: tl.constexpr):
        """Coefficient i's sum plus the tile ``v``: elementwise into its register tile (``IN_REGISTERS``),
        or v's token sum into row i of the ``[coefficient, column]`` tile."""
        if IN_REGISTERS:
            terms = _add_at(terms, i, v)
        else:
            acc_coeff += tl.where(di[:, None] == i, tl.sum(v, axis=0)[None, :], 0.0)
        return terms, acc_coeff

    @triton.jit
    def _series_derivative(coef, scale, DEGREE: tl.constexpr, EVEN: tl.constexpr):
        """``(dcoef, slope1)`` of ``_series_backward``'s derivative, times ``scale`` (1 / s, dt/dh, and whatever
        the caller folds in): the Chebyshev derivative coefficients of the series, or with ``EVEN``
        dp/dh = c_1 scale + t * sum_j e_j T_j(u), e: q's derivative coefficients times 4 scale (du/dt = 4t)."""
        if EVEN:
            dcoef = _derivative_coefficients(_even_series(coef, DEGREE), 4.0 * scale, DEGREE // 2)
            slope1 = coef[1] * scale
        else:
            dcoef = _derivative_coefficients(coef, scale, DEGREE)
            slope1 = 0.0
        return dcoef, slope1

    @triton.jit
    def _series_backward(x, gp, coef, dcoef, slope1, inv_domain, domain, dtail, terms, acc_coeff, di,
                         DEGREE: tl.constexpr, EVEN: tl.constexpr, VALUE: tl.constexpr, IN_REGISTERS: tl.constexpr):
        """The polynomial's backward per element: one pass over T_i(t), t = clamp(x / s, -1, 1), adds the
        coefficient gradients' terms gp * T_i(t) to ``terms`` / ``acc_coeff`` (``_accumulate``) and gives
        ``(a, da)``: a = p(t) + relu(x - s) with ``VALUE``, else the linear tail relu(x - s) alone; da = p'(x)
        = sum_j dcoef_j T_j(t) (+ slope1, times t, for the even series) inside [-s, s], ``dtail`` above s
        (the tail's slope times whatever the caller folded into dcoef), 0 below -s (the clamp). ``EVEN``:
        the pass runs over T_j(u), u = T_2(t), to half the degree (``_odd_terms_masked``)."""
        xs = x * inv_domain
        tc = tl.minimum(tl.maximum(xs, -1.0), 1.0)
        tc2 = tc + tc
        poly = coef[0] + tl.zeros_like(tc)
        dpoly = tl.zeros_like(tc)
        terms, acc_coeff = _accumulate(terms, acc_coeff, di, 0, gp, IN_REGISTERS)
        if DEGREE >= 1:
            if VALUE:
                poly += coef[1] * tc
            terms, acc_coeff = _accumulate(terms, acc_coeff, di, 1, gp * tc, IN_REGISTERS)
        if EVEN:  # T_2j(t) = T_j(u), u = T_2(t): the pass runs over j to DEGREE // 2
            u = tc2 * tc - 1.0
            u2 = u + u
            dpoly += dcoef[0] + dcoef[1] * u
            if VALUE:
                poly += coef[2] * u
            terms, acc_coeff = _accumulate(terms, acc_coeff, di, 2, gp * u, IN_REGISTERS)
            t_prev = tl.zeros_like(tc) + 1.0
            t_cur = u
            for j in tl.static_range(2, DEGREE // 2 + 1):
                t_next = u2 * t_cur - t_prev
                t_prev = t_cur
                t_cur = t_next
                if VALUE:
                    poly += coef[2 * j] * t_cur
                if j < DEGREE // 2:
                    dpoly += dcoef[j] * t_cur
                terms, acc_coeff = _accumulate(terms, acc_coeff, di, 2 * j, gp * t_cur, IN_REGISTERS)
            dpoly = slope1 + tc * dpoly
        else:
            if DEGREE >= 1:
                dpoly += dcoef[0]
            if DEGREE >= 2:
                dpoly += dcoef[1] * tc
            t_prev = tl.zeros_like(tc) + 1.0
            t_cur = tc
            for i in tl.static_range(2, DEGREE + 1):
                t_next = tc2 * t_cur - t_prev
                t_prev = t_cur
                t_cur = t_next
                if VALUE:  # the value: per element only where the caller needs it
                    poly += coef[i] * t_cur
                if i < DEGREE:
                    dpoly += dcoef[i] * t_cur
                terms, acc_coeff = _accumulate(terms, acc_coeff, di, i, gp * t_cur, IN_REGISTERS)
        # the clamp's derivative is 0 outside [-1, 1] (t == x / s inside), the linear tail's dtail above s
        tail = tl.maximum(x - domain, 0.0)
        poly = poly + tail if VALUE else tail
        dpoly = tl.where(x > domain, dtail, tl.where(tc == xs, dpoly, 0.0))
        return poly, dpoly, terms, acc_coeff

    @triton.jit
    def _backward_kernel(
        h_ptr, gout_ptr, gh_ptr, coeff_ptr, coeff_mask_ptr, gate_ptr, part_ptr, row_part_ptr,
        T, n_tiles_t, n_tiles, n_prog_t, n_iter, stride_hb, stride_ht, stride_gb, stride_gt,
        m, k, r, SPEC_IDX, FB_IDX, N_SEG, domain, n_part, slot0, slot_width, n_rows,
        DEGREE: tl.constexpr, PER_NEURON: tl.constexpr, TOKEN_GATES: tl.constexpr,
        BT: tl.constexpr, BC: tl.constexpr, DP: tl.constexpr, IN_REGISTERS: tl.constexpr, PREFETCH: tl.constexpr,
        SPECTRAL: tl.constexpr = True,
    ):
        """Polynomial and spectral columns [0, m + k): grad_h, and the partial sums of the
        coefficient and gate gradients (no feedback code: ``_feedback_backward_kernel``).

        Per element, one pass over T_0..T_deg(t) by the forward recurrence T_{i+1} = 2t T_i - T_{i-1}
        gives the sums it needs: the derivative p' = sum d_j T_j (``_derivative_coefficients``) and
        the coefficient gradients' terms dL/da * T_i, three multiply-adds per degree; the gate g is
        applied to those once per program, and the gate gradient's polynomial share is sum_i c_i times
        their sums. When the mask switches the odd terms above T_1 off (``_odd_terms_masked``, the
        conversion's series) the pass runs over T_j(u), u = T_2(t), to half the degree (``EVEN``).
        With token gates (tau per token) the terms carry g * tau and the value
        p = sum c_i T_i is summed per element too (the row gate gradients need it). ``SPECTRAL``
        (k > 0): some columns are the spectral identity. The tiles run over the rows of every
        sequence as one (``_tile_rows``' ``FLAT``: this kernel has no causal window).

        Two ways to sum the coefficient and gate gradients over a program's tokens: per tile (one
        ``tl.sum`` over the tile's tokens per coefficient, added into a ``[coefficient, column]``
        tile), or ``IN_REGISTERS``: one ``[BT, BC]`` tile per coefficient (a tuple), added to
        elementwise on every token tile and summed over its tokens once, after the program's last
        tile (no cross-warp reduction or layout change inside the loop, for small tiles). Rows and
        columns out of range load as zeros, so dL/dact is zero there and adds nothing to either sum."""
        args = (h_ptr, gout_ptr, gh_ptr, coeff_ptr, coeff_mask_ptr, gate_ptr, part_ptr, row_part_ptr, T, n_tiles_t,
                n_tiles, n_prog_t, n_iter, stride_hb, stride_ht, stride_gb, stride_gt, m, k, r, SPEC_IDX, FB_IDX, N_SEG,
                domain, n_part, slot0, slot_width, n_rows)
        if DEGREE >= 4:  # one of two loops for the whole program, by a scalar of the mask
            if _odd_terms_masked(coeff_mask_ptr, DEGREE):
                _backward_program(args, DEGREE, PER_NEURON, TOKEN_GATES, BT, BC, DP, IN_REGISTERS, PREFETCH, SPECTRAL,
                                  True)
            else:
                _backward_program(args, DEGREE, PER_NEURON, TOKEN_GATES, BT, BC, DP, IN_REGISTERS, PREFETCH, SPECTRAL,
                                  False)
        else:
            _backward_program(args, DEGREE, PER_NEURON, TOKEN_GATES, BT, BC, DP, IN_REGISTERS, PREFETCH, SPECTRAL, False)

    @triton.jit
    def _backward_program(args, DEGREE: tl.constexpr, PER_NEURON: tl.constexpr, TOKEN_GATES: tl.constexpr,
                          BT: tl.constexpr, BC: tl.constexpr, DP: tl.constexpr, IN_REGISTERS: tl.constexpr,
                          PREFETCH: tl.constexpr, SPECTRAL: tl.constexpr, EVEN: tl.constexpr):
        """``_backward_kernel``'s loop over a program's token tiles and its partial sums' stores."""
        (h_ptr, gout_ptr, gh_ptr, coeff_ptr, coeff_mask_ptr, gate_ptr, part_ptr, row_part_ptr, T, n_tiles_t, n_tiles,
         n_prog_t, n_iter, stride_hb, stride_ht, stride_gb, stride_gt, m, k, r, SPEC_IDX, FB_IDX, N_SEG, domain, n_part,
         slot0, slot_width, n_rows) = args
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
        domain = tl.cast(domain, tl.float32)  # fp64 in compiled graphs (the schema says float), a Python float in analysis
        inv_domain = 1.0 / domain
        n_act = m + k + r
        fb0 = m + k
        col0 = pid_c * BC
        cols = col0 + tl.arange(0, BC)
        col_ok = cols < fb0
        is_poly = cols < m
        # the Chebyshev coefficients, read once before the loop (its stores to grad_h could alias them,
        # so the compiler would otherwise read them again on every tile): scalars, or [1, BC] per neuron
        coef = _chebyshev_coefficients(coeff_ptr, coeff_mask_ptr, cols, is_poly, DEGREE, PER_NEURON)
        di = tl.arange(0, DP)
        gate = tl.load(gate_ptr + tl.where(is_poly, 0, SPEC_IDX), mask=col_ok, other=0.0).to(tl.float32)
        # the coefficient terms' weight per column (zero off the polynomial columns): with token gates
        # g * tau * dL/da; without, dL/da alone, g applied once per program after the loop
        poly_weight = tl.where(is_poly, gate if TOKEN_GATES else 1.0, 0.0)[None, :]
        dcoef, slope1 = _series_derivative(coef, inv_domain, DEGREE, EVEN)
        # sums over tokens, one row per coefficient i (columns on the tile's column axis, so the
        # per-tile token sums add in without a layout change): dL/da * T_i(t), times g * tau with token gates
        acc_coeff = tl.zeros((DP, BC), dtype=tl.float32)
        acc_gate = tl.zeros((BC,), dtype=tl.float32)  # sum over tokens of dL/dact * tau * a
        terms = ()
        if IN_REGISTERS:  # per element: dL/da * g * tau * T_i(t), one tile per i; dL/dact * tau * a
            for i in tl.static_range(DEGREE + 1):
                terms = terms + (tl.zeros((BT, BC), dtype=tl.float32),)
            gate_terms = tl.zeros((BT, BC), dtype=tl.float32)
        # tiles pid_t, pid_t + n_prog_t, ...: n_iter = ceil(n_tiles / n_prog_t) steps, the last one masked
        # where it runs past n_tiles. PREFETCH: the next tile's h and dL/dact are loaded before this
        # tile's arithmetic and carried into the next step, so their memory latency hides under it.
        if PREFETCH:
            b, t, row_ok = _tile_rows(pid_t, n_tiles, n_tiles_t, T, BT, True)
            ok = row_ok[:, None] & col_ok[None, :]
            x_next, go_next = _load_pair(h_ptr, gout_ptr, b, t, stride_hb, stride_ht, stride_gb, stride_gt, cols, ok)
        for it in range(0, n_iter):
            b, t, row_ok = _tile_rows(pid_t + it * n_prog_t, n_tiles, n_tiles_t, T, BT, True)
            ok = row_ok[:, None] & col_ok[None, :]
            h_rows = h_ptr + b * stride_hb + t * stride_ht
            if PREFETCH:
                x_raw, go_raw = x_next, go_next
                b_n, t_n, row_ok_n = _tile_rows(pid_t + (it + 1) * n_prog_t, n_tiles, n_tiles_t, T, BT, True)
                x_next, go_next = _load_pair(h_ptr, gout_ptr, b_n, t_n, stride_hb, stride_ht, stride_gb, stride_gt,
                                             cols, row_ok_n[:, None] & col_ok[None, :])
            else:
                x_raw, go_raw = _load_pair(h_ptr, gout_ptr, b, t, stride_hb, stride_ht, stride_gb, stride_gt, cols, ok)
            x = x_raw.to(tl.float32)
            go = go_raw.to(tl.float32)
            tau, dtau = _token_gates(h_rows, row_ok, cols, m, k, r, n_act, SPEC_IDX, FB_IDX, TOKEN_GATES, BT, BC)
            a = x  # spectral: identity, derivative 1
            da = tl.full((BT, BC), 1.0, tl.float32)
            if col0 < m:  # poly: T_i(t) once, for p, p' and the coefficient gradients' terms
                if TOKEN_GATES:
                    gp = go * poly_weight * tau
                elif SPECTRAL:
                    gp = go * poly_weight
                else:
                    gp = go  # zero past the columns (masked loads)
                # Without token gates the gate gradient's sum_t dL/dact * p(t) is sum_i c_i * (the coefficient
                # terms' sum), added after the loop: ``poly`` is then only the linear tail's share
                poly, dpoly, terms, acc_coeff = _series_backward(x, gp, coef, dcoef, slope1, inv_domain, domain, 1.0,
                                                                 terms, acc_coeff, di, DEGREE, EVEN, TOKEN_GATES,
                                                                 IN_REGISTERS)
                if SPECTRAL:
                    a = tl.where(is_poly[None, :], poly, a)
                    da = tl.where(is_poly[None, :], dpoly, da)
                else:
                    a = poly
                    da = dpoly
            gh = go * gate[None, :] * tau * da
            if IN_REGISTERS:
                gate_terms += go * tau * a
            else:
                acc_gate += tl.sum(go * tau * a, axis=0)
            gh_rows = gh_ptr + b * stride_hb + t * stride_ht
            tl.store(gh_rows[:, None] + cols[None, :], gh.to(gh_ptr.dtype.element_ty), mask=ok)
            if TOKEN_GATES:
                dg = tl.where(ok, go * gate[None, :] * a * dtau, 0.0)
                _row_gate_parts(row_part_ptr, pid_c, n_rows, b, t, T, row_ok, dg, cols, m, fb0, n_act, SPEC_IDX,
                                FB_IDX, N_SEG)
        # this program's partial sums, written once (layout: ``_part_layout``)
        row = part_ptr + pid_t * n_part
        slot = row + slot0 + pid_c * slot_width
        if IN_REGISTERS:  # the token sums, once
            if not TOKEN_GATES:  # the polynomial's share of the gate sums, then g on the coefficient terms
                for i in tl.static_range(DEGREE + 1):
                    if not (EVEN and i % 2 == 1 and i > 1):  # (terms the pass skipped are zero)
                        gate_terms += coef[i] * terms[i]
            acc_gate = tl.sum(gate_terms, axis=0)
            for i in tl.static_range(DEGREE + 1):
                coeff_sum = tl.sum(terms[i], axis=0)  # zeros on a tile without polynomial columns
                if not TOKEN_GATES:
                    coeff_sum = coeff_sum * gate
                if PER_NEURON:
                    tl.store(row + cols * (DEGREE + 1) + i, coeff_sum, mask=is_poly)
                else:
                    tl.store(slot + i, tl.sum(coeff_sum, axis=0))
            _gate_slots(slot + (0 if PER_NEURON else DEGREE + 1), acc_gate, cols, m, fb0, n_act, SPEC_IDX, FB_IDX)
        else:
            if not TOKEN_GATES:  # as above, on the [coefficient, column] tile
                for i in tl.static_range(DEGREE + 1):
                    q_i = tl.sum(tl.where(di[:, None] == i, acc_coeff, 0.0), axis=0)
                    acc_gate += tl.sum(coef[i] * q_i[None, :], axis=0)
                acc_coeff = acc_coeff * gate[None, :]
            if PER_NEURON:
                tl.store(row + cols[None, :] * (DEGREE + 1) + di[:, None], acc_coeff,
                         mask=is_poly[None, :] & (di < DEGREE + 1)[:, None])
                _gate_slots(slot, acc_gate, cols, m, fb0, n_act, SPEC_IDX, FB_IDX)
            else:  # the column reduction, once
                tl.store(slot + di, tl.sum(acc_coeff, axis=1), mask=di < DEGREE + 1)
                _gate_slots(slot + DEGREE + 1, acc_gate, cols, m, fb0, n_act, SPEC_IDX, FB_IDX)

    # ------------------------------------------------------------- the polynomial-only FFN, flat
    # The conversion's default FFN (polynomial columns only, one shared series, scalar gate) is elementwise over
    # h's elements with the same series everywhere: these kernels run over h as one flat run of elements (no
    # column tiles, so no masked columns past m at the last tile, no 2-D index arithmetic), each program over
    # n_iter consecutive blocks of BLOCK elements. ``_flat`` says when.

    @triton.jit
    def _power_series(coef, DEGREE: tl.constexpr):
        """e with sum_i c_i T_i(t) = sum_p e_p t^p: Clenshaw's recurrence b_k = c_k + 2 t b_{k+1} - b_{k+2}
        run on the coefficient tuples of the polynomials b_k (b_k has degree DEGREE - k), once per program."""
        zero = coef[0] * 0.0
        b1 = ()
        b2 = ()
        for p in tl.static_range(DEGREE + 1):
            b1 = b1 + (zero,)
            b2 = b2 + (zero,)
        for step in tl.static_range(DEGREE):  # k = DEGREE - step, down to 1
            b0 = ()
            for p in tl.static_range(DEGREE + 1):
                if p > step:  # beyond b_k's degree
                    b0 = b0 + (zero,)
                elif p == 0:
                    b0 = b0 + (coef[DEGREE - step] - b2[0],)
                else:
                    b0 = b0 + (2.0 * b1[p - 1] - b2[p],)
            b2 = b1
            b1 = b0
        e = ()
        for p in tl.static_range(DEGREE + 1):  # c_0 + t b_1 - b_2
            if p == 0:
                e = e + (coef[0] - b2[0],)
            else:
                e = e + (b1[p - 1] - b2[p],)
        return e

    @triton.jit
    def _flat_series(domain, gate_ptr, coeff_ptr, coeff_mask_ptr, DEGREE: tl.constexpr):
        """What both flat kernels read once per program: the domain s in fp32 (fp64 in compiled graphs, the
        schema says float) and 1 / s, the gate g, and the masked shared coefficients c_0..c_DEGREE."""
        domain = tl.cast(domain, tl.float32)
        g = tl.load(gate_ptr).to(tl.float32)
        return domain, 1.0 / domain, g, _chebyshev_coefficients(coeff_ptr, coeff_mask_ptr, 0, True, DEGREE, False)

    @triton.jit
    def _flat_forward_kernel(h_ptr, out_ptr, coeff_ptr, coeff_mask_ptr, gate_ptr, n, n_iter, domain,
                             DEGREE: tl.constexpr, BLOCK: tl.constexpr, HORNER: tl.constexpr):
        """act = g * (sum_i c_i T_i(clamp(h / s)) + relu(h - s)) over n elements, the gate folded into the
        series once per program. ``HORNER``: the series in powers of t (``_power_series``, Horner's rule:
        one multiply-add per degree, where Clenshaw's recurrence takes two), else Clenshaw."""
        pid = tl.program_id(0)
        domain, inv_domain, g, coef = _flat_series(domain, gate_ptr, coeff_ptr, coeff_mask_ptr, DEGREE)
        scaled = ()
        for i in tl.static_range(DEGREE + 1):
            scaled = scaled + (coef[i] * g,)
        if HORNER:
            series = _power_series(scaled, DEGREE)
        else:
            series = scaled
        start = pid.to(tl.int64) * n_iter * BLOCK
        idx = tl.arange(0, BLOCK)
        for it in range(0, n_iter):
            offs = start + it * BLOCK + idx
            ok = offs < n
            x = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            tc = tl.minimum(tl.maximum(x * inv_domain, -1.0), 1.0)
            if HORNER:
                p = series[DEGREE] + tl.zeros_like(tc)
                for step in tl.static_range(DEGREE):
                    p = p * tc + series[DEGREE - 1 - step]
            else:
                p = _clenshaw(tc, series, DEGREE)
            a = p + g * tl.maximum(x - domain, 0.0)
            tl.store(out_ptr + offs, a.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _flat_backward_kernel(h_ptr, gout_ptr, gh_ptr, coeff_ptr, coeff_mask_ptr, gate_ptr, part_ptr, n, n_iter,
                              domain, DEGREE: tl.constexpr, BLOCK: tl.constexpr, PREFETCH: tl.constexpr,
                              N_PART: tl.constexpr):
        """dL/dh over n elements, and this program's row of partial sums ``[g * sum dL/da T_i(t), i <= DEGREE |
        sum dL/da * (p(t) + relu(h - s))]`` (``_reduce_kernel`` sums the rows into the gradients of the
        coefficients and of the gate; ``N_PART``: the row's width, ``_part_layout``'s). One of two loops for the
        whole program, by the mask (``_odd_terms_masked``)."""
        args = (h_ptr, gout_ptr, gh_ptr, coeff_ptr, coeff_mask_ptr, gate_ptr, part_ptr, n, n_iter, domain)
        if DEGREE >= 4:
            if _odd_terms_masked(coeff_mask_ptr, DEGREE):
                _flat_backward_program(args, DEGREE, BLOCK, PREFETCH, N_PART, True)
            else:
                _flat_backward_program(args, DEGREE, BLOCK, PREFETCH, N_PART, False)
        else:
            _flat_backward_program(args, DEGREE, BLOCK, PREFETCH, N_PART, False)

    @triton.jit
    def _flat_backward_program(args, DEGREE: tl.constexpr, BLOCK: tl.constexpr, PREFETCH: tl.constexpr,
                               N_PART: tl.constexpr, EVEN: tl.constexpr):
        """``_flat_backward_kernel``'s loop: the coefficient terms in registers (one BLOCK tile per
        coefficient, summed once after the loop), the gate g folded into the derivative's coefficients
        (dL/dh = dL/dact * g p'), the next block's loads issued before this one's arithmetic (``PREFETCH``)."""
        (h_ptr, gout_ptr, gh_ptr, coeff_ptr, coeff_mask_ptr, gate_ptr, part_ptr, n, n_iter, domain) = args
        pid = tl.program_id(0)
        domain, inv_domain, g, coef = _flat_series(domain, gate_ptr, coeff_ptr, coeff_mask_ptr, DEGREE)
        dcoef, slope1 = _series_derivative(coef, inv_domain * g, DEGREE, EVEN)  # g folded into p'
        terms = ()
        for i in tl.static_range(DEGREE + 1):
            terms = terms + (tl.zeros((BLOCK,), dtype=tl.float32),)
        tail_terms = tl.zeros((BLOCK,), dtype=tl.float32)
        start = pid.to(tl.int64) * n_iter * BLOCK
        idx = tl.arange(0, BLOCK)
        if PREFETCH:
            ok = start + idx < n
            x_next = tl.load(h_ptr + start + idx, mask=ok, other=0.0)
            go_next = tl.load(gout_ptr + start + idx, mask=ok, other=0.0)
        for it in range(0, n_iter):
            offs = start + it * BLOCK + idx
            ok = offs < n
            if PREFETCH:
                x_raw, go_raw = x_next, go_next
                ok_next = (offs + BLOCK < n) & (it + 1 < n_iter)
                x_next = tl.load(h_ptr + offs + BLOCK, mask=ok_next, other=0.0)
                go_next = tl.load(gout_ptr + offs + BLOCK, mask=ok_next, other=0.0)
            else:
                x_raw = tl.load(h_ptr + offs, mask=ok, other=0.0)
                go_raw = tl.load(gout_ptr + offs, mask=ok, other=0.0)
            x = x_raw.to(tl.float32)
            go = go_raw.to(tl.float32)  # zero past n (masked loads): adds nothing to the sums
            tail, da, terms, _ = _series_backward(x, go, coef, dcoef, slope1, inv_domain, domain, g, terms, 0.0, 0,
                                                  DEGREE, EVEN, False, True)
            tail_terms += go * tail
            tl.store(gh_ptr + offs, (go * da).to(gh_ptr.dtype.element_ty), mask=ok)
        row = part_ptr + pid * N_PART  # a constant (as a runtime argument: 0.4 more sm_90 instructions per element)
        gate_sum = tl.sum(tail_terms, axis=0)
        for i in tl.static_range(DEGREE + 1):
            if EVEN and i % 2 == 1 and i > 1:  # terms the pass skipped are zero
                tl.store(row + i, 0.0)
            else:
                coeff_sum = tl.sum(terms[i], axis=0)
                gate_sum += coef[i] * coeff_sum
                tl.store(row + i, coeff_sum * g)
        tl.store(row + DEGREE + 1, gate_sum)

    @triton.jit
    def _reduce_kernel(part_ptr, coeff_mask_ptr, gc_ptr, gg_ptr, gk_ptr, n_prog, n_part, slot0, slot_width,
                       kern_off, n_coef, n_seg, n_taps, DEGREE: tl.constexpr, PER_NEURON: tl.constexpr,
                       N_SLOTS: tl.constexpr, BLOCK: tl.constexpr, BR: tl.constexpr):
        """The parameters' gradients from the backward programs' partial sums (``_part_layout``), in the
        parameters' dtypes. Output o of [coefficients n_coef | gates n_seg | taps n_taps] sums its entry
        over the programs' rows, and a slot entry (a shared coefficient, a gate) over the N_SLOTS column
        tiles' slots too; a coefficient's gradient is times its mask (the series is c * mask). Each
        program sums BLOCK outputs, BR rows of every slot at a time (all of a step's loads in flight at
        once, no integer division), in a fixed order (deterministic)."""
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        is_coef = o < n_coef
        is_gate = (o >= n_coef) & (o < n_coef + n_seg)
        is_tap = (o >= n_coef + n_seg) & (o < n_coef + n_seg + n_taps)
        gate_col = slot0 + (0 if PER_NEURON else DEGREE + 1) + (o - n_coef)
        if PER_NEURON:
            base = tl.where(is_coef, o, tl.where(is_gate, gate_col, kern_off + (o - n_coef - n_seg)))
            slotted = is_gate
        else:
            base = tl.where(is_coef, slot0 + o, tl.where(is_gate, gate_col, kern_off + (o - n_coef - n_seg)))
            slotted = is_coef | is_gate
        live = is_coef | is_gate | is_tap
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for r0 in range(0, n_prog, BR):
            rows = r0 + tl.arange(0, BR)
            row_addr = rows[:, None] * n_part + base[None, :]
            for s in tl.static_range(N_SLOTS):  # an output outside the slots is read once, from the first
                use = (rows < n_prog)[:, None] & (live & (slotted | (s == 0)))[None, :]
                acc += tl.sum(tl.load(part_ptr + row_addr + s * slot_width, mask=use, other=0.0), axis=0)
        keep = tl.load(coeff_mask_ptr + o % (DEGREE + 1), mask=is_coef, other=0.0).to(tl.float32)
        tl.store(gc_ptr + o, (acc * keep).to(gc_ptr.dtype.element_ty), mask=is_coef)
        tl.store(gg_ptr + (o - n_coef), acc.to(gg_ptr.dtype.element_ty), mask=is_gate)
        tl.store(gk_ptr + (o - n_coef - n_seg), acc.to(gk_ptr.dtype.element_ty), mask=is_tap)

    @triton.jit
    def _feedback_backward_kernel(
        h_ptr, gout_ptr, gh_ptr, gate_ptr, kern_ptr, state_ptr, mask_ptr, part_ptr, row_part_ptr,
        T, n_tiles_t, n_tiles, n_prog_t, n_iter, tile_c0,
        stride_hb, stride_ht, stride_gb, stride_gt, stride_sb, stride_st, stride_mb, stride_mt,
        mask_off, m, k, r, SPEC_IDX, FB_IDX, N_SEG, n_part, slot0, slot_width, kern_off, n_rows,
        DEGREE: tl.constexpr, WINDOW: tl.constexpr, PER_NEURON: tl.constexpr, TOKEN_GATES: tl.constexpr,
        HAS_MASK: tl.constexpr, HAS_STATE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, DP: tl.constexpr,
        WP: tl.constexpr,
    ):
        """Feedback columns [m + k, m + k + r): u_t reaches z_{t..t+w-1}, whose pre-activations are
        recomputed from h; partial sums of the tap and gate gradients."""
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
        n_act = m + k + r
        fb0 = m + k
        rc = pid_c * BC + tl.arange(0, BC)
        cols = fb0 + rc
        is_fb = rc < r
        wi = tl.arange(0, WP)
        gate = tl.load(gate_ptr + FB_IDX + 0 * rc, mask=is_fb, other=0.0).to(tl.float32)
        acc_kernel = tl.zeros((WP, BC), dtype=tl.float32)  # sum over tokens of dL/dz * u_{t-w+1+j}, row j
        acc_gate = tl.zeros((BC,), dtype=tl.float32)
        for it in range(0, n_iter):  # as in _backward_kernel
            b, t, row_ok = _tile_rows(pid_t + it * n_prog_t, n_tiles, n_tiles_t, T, BT)
            ok = row_ok[:, None] & is_fb[None, :]
            h_seq = h_ptr + b * stride_hb
            g_seq = gout_ptr + b * stride_gb
            state_seq = state_ptr + b * stride_sb
            mask_seq = mask_ptr + b * stride_mb
            go = tl.load((g_seq + t * stride_gt)[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            tau, dtau = _token_gates(h_seq + t * stride_ht, row_ok, cols, m, k, r, n_act, SPEC_IDX, FB_IDX,
                                     TOKEN_GATES, BT, BC)
            a = tl.zeros((BT, BC), dtype=tl.float32)
            du = tl.zeros((BT, BC), dtype=tl.float32)
            for d in tl.static_range(WINDOW):
                later = t + d
                z = _feedback_z(h_seq, state_seq, mask_seq, kern_ptr, later, rc, is_fb, T, stride_ht, stride_st,
                                stride_mt, mask_off, fb0, HAS_MASK, HAS_STATE, WINDOW, BT, BC)
                s, ds = _gelu_tanh(z)
                if d == 0:
                    go_d = go
                    tau_d = tau
                    a = s
                else:
                    later_ok = later < T
                    go_d = tl.load((g_seq + later * stride_gt)[:, None] + cols[None, :],
                                   mask=later_ok[:, None] & is_fb[None, :], other=0.0).to(tl.float32)
                    tau_d, _ = _token_gates(h_seq + later * stride_ht, later_ok, cols, m, k, r, n_act, SPEC_IDX,
                                            FB_IDX, TOKEN_GATES, BT, BC)
                dz = go_d * gate[None, :] * tau_d * ds
                kd = tl.load(kern_ptr + rc * WINDOW + (WINDOW - 1 - d), mask=is_fb, other=0.0).to(tl.float32)
                du += kd[None, :] * dz
                if d == 0:
                    dz0 = tl.where(ok, dz, 0.0)
                    for j in tl.static_range(WINDOW):
                        u = _feedback_u(h_seq, state_seq, mask_seq, t - (WINDOW - 1) + j, rc, is_fb, T, stride_ht,
                                        stride_st, stride_mt, mask_off, fb0, HAS_MASK, HAS_STATE, WINDOW)
                        acc_kernel += tl.where(wi[:, None] == j, tl.sum(dz0 * u, axis=0)[None, :], 0.0)
            if HAS_MASK:
                keep = tl.load(mask_seq + (mask_off + t) * stride_mt, mask=row_ok, other=0).to(tl.float32)
                du = du * keep[:, None]
            acc_gate += tl.sum(tl.where(ok, go * tau * a, 0.0), axis=0)
            gh_rows = gh_ptr + b * stride_hb + t * stride_ht
            tl.store(gh_rows[:, None] + cols[None, :], du.to(gh_ptr.dtype.element_ty), mask=ok)
            if TOKEN_GATES:
                dg = tl.where(ok, go * gate[None, :] * a * dtau, 0.0)
                _row_gate_parts(row_part_ptr, tile_c0 + pid_c, n_rows, b, t, T, row_ok, dg, cols, m, fb0, n_act,
                                SPEC_IDX, FB_IDX, N_SEG)
        row = part_ptr + pid_t * n_part
        tl.store(row + kern_off + rc[None, :] * WINDOW + wi[:, None], acc_kernel,
                 mask=is_fb[None, :] & (wi < WINDOW)[:, None])
        slot = row + slot0 + (tile_c0 + pid_c) * slot_width
        if not PER_NEURON:  # this tile's share of the shared-coefficient sums is zero
            di = tl.arange(0, DP)
            tl.store(slot + di, tl.zeros((DP,), dtype=tl.float32), mask=di < DEGREE + 1)
            slot += DEGREE + 1
        _gate_slots(slot, acc_gate, cols, m, fb0, n_act, SPEC_IDX, FB_IDX)

    def _pow2(n: int) -> int:  # triton.next_power_of_2 / cdiv are constexpr_functions: slow on the host
        if type(n) is not int:  # a SymInt (dynamic-shape tracing)
            return triton.next_power_of_2(n)
        return 1 << max(n - 1, 0).bit_length()

    def _cdiv(a: int, b: int) -> int:
        return -(-a // b) if type(a) is int and type(b) is int else triton.cdiv(a, b)

    _SM_COUNTS: dict = {}  # device -> multiprocessors (a property query per backward call costs host time)

    def _sm_count(device) -> int:
        if device not in _SM_COUNTS:
            _SM_COUNTS[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return _SM_COUNTS[device]

    def _register_cap(warps: int, programs_per_sm: int) -> int:
        """Registers per thread that leave room for ``programs_per_sm`` programs of ``warps`` warps on an
        SM (65,536 registers; ptxas allocates in steps of 8; at most 255)."""
        return min(255, 65536 // (programs_per_sm * warps * 32) // 8 * 8)

    _CAPPED: dict = {}  # (kernel, warps, registers) -> a one-config triton.autotune of the kernel

    def _capped(kernel, warps: int, maxnreg: int):
        """``kernel`` with its warps and register cap as a triton.Config: where Inductor launches a user
        kernel it reads launch options from the kernel's configs only (a ``maxnreg`` keyword would be dropped)."""
        key = (kernel, warps, maxnreg)
        if key not in _CAPPED:
            _CAPPED[key] = triton.autotune([triton.Config({}, num_warps=warps, maxnreg=maxnreg)], key=[])(kernel)
        return _CAPPED[key]

    def _launcher(kernel, grid, direct: bool, warps: int = 4, maxnreg: int | None = None):
        """The launch of ``kernel`` over ``grid`` with ``warps`` warps (and at most ``maxnreg`` registers
        per thread), to call with its arguments: the kernel itself for a direct eager call (``wrap_triton``
        outside an op's backend would route it through the slow HOP dispatch), else through
        ``wrap_triton`` (which tracing sees); under the interpreter the fake-tensor pass only
        allocates (and the interpreter ignores the launch options). (Returned rather than called with
        the arguments: the forward's ~35 arguments are then packed once per call, not twice.)"""
        if direct:
            options = dict(num_warps=warps) if maxnreg is None else dict(num_warps=warps, maxnreg=maxnreg)
            launch = kernel[grid]
            return lambda *args, **meta: launch(*args, **meta, **options)

        def launch(*args, **meta):
            if INTERPRET:
                if any(torch._subclasses.fake_tensor.is_fake(a) for a in args if isinstance(a, Tensor)):
                    return
                return kernel[grid](*args, **meta)
            if maxnreg is None:
                return wrap_triton(kernel)[grid](*args, **meta, num_warps=warps)
            return wrap_triton(_capped(kernel, warps, maxnreg))[grid](*args, **meta)

        return launch

    def _layout(h, fb_kernel, fb_state, token_mask, m, k, r):
        """Strides and flags shared by both kernels (dummy pointers for absent tensors)."""
        window = fb_kernel.shape[1] if fb_kernel is not None else 1
        has_state = fb_state is not None
        has_mask = token_mask is not None and r > 0
        return dict(
            window=window,
            kern=fb_kernel if fb_kernel is not None else h,
            state=fb_state if has_state else h,
            mask=token_mask if has_mask else h,
            state_strides=(fb_state.stride(0), fb_state.stride(1)) if has_state else (0, 0),
            mask_strides=(token_mask.stride(0), token_mask.stride(1)) if has_mask else (0, 0),
            mask_off=token_mask.shape[1] - h.shape[1] if has_mask else 0,
            has_state=has_state,
            has_mask=has_mask,
            spec_idx=int(m > 0),
            fb_idx=int(m > 0) + int(k > 0),
        )

    def _token_block(tokens: int, preferred: int, window: int) -> int:
        block = min(preferred, _pow2(max(tokens, 1)))
        return max(block, _pow2(max(window - 1, 1)))  # the first tile holds the state

    _FORWARD_PLANS: dict = {}  # (tokens, n_act, window, FORWARD_TILE values) -> _forward_plan's tiles

    def _forward_plan(tokens, n_act, window) -> tuple:
        """The forward's tiles ``(BT, BC, token tiles, column tiles, BS)``. Remembered per shape for
        plain ints (a dozen integer calls, but on every eager call of every block); computed anew
        for symbolic sizes (tracing)."""
        key = None
        if type(tokens) is int and type(n_act) is int and type(window) is int:  # SymInts do not hash
            key = (tokens, n_act, window, FORWARD_TILE["tokens"], FORWARD_TILE["columns"])
        plan = _FORWARD_PLANS.get(key)
        if plan is None:
            bt = _token_block(tokens, FORWARD_TILE["tokens"], window)
            bc = min(FORWARD_TILE["columns"], _pow2(n_act))
            plan = (bt, bc, _cdiv(tokens, bt), _cdiv(n_act, bc), _pow2(max(window - 1, 1)))
            if key is not None:
                _FORWARD_PLANS[key] = plan
        return plan

    def _forward(h, coeffs, coeff_mask, gates, fb_kernel, fb_state, token_mask, m, k, r, n_gates, domain, degree,
                 write_state, direct=False):
        h = h if h.stride(-1) == 1 else h.contiguous()
        batch, tokens, _ = h.shape
        n_act = m + k + r
        out = h.new_empty(batch, tokens, n_act)
        if batch * tokens == 0 or n_act == 0:
            return out
        if _flat("forward", h, coeffs, k, r, n_gates, degree):
            return _flat_forward(h, out, coeffs, coeff_mask, gates, domain, degree, direct)
        lay = _layout(h, fb_kernel, fb_state, token_mask, m, k, r)
        bt, bc, n_tiles_t, n_tiles_c, bs = _forward_plan(tokens, n_act, lay["window"])
        _launcher(_forward_kernel, (batch * n_tiles_t, n_tiles_c), direct, FORWARD_TILE["warps"])(
            h, out, coeffs.contiguous(), coeff_mask, gates, lay["kern"], lay["state"], lay["mask"],
            tokens, n_tiles_t, h.stride(0), h.stride(1), out.stride(0), out.stride(1), *lay["state_strides"],
            *lay["mask_strides"], lay["mask_off"], m, k, r, lay["spec_idx"], lay["fb_idx"], domain,
            DEGREE=degree, WINDOW=lay["window"], PER_NEURON=coeffs.numel() > degree + 1, TOKEN_GATES=n_gates > 0,
            HAS_MASK=lay["has_mask"], HAS_STATE=lay["has_state"], WRITE_STATE=write_state and lay["has_state"],
            BT=bt, BC=bc, BS=bs,
        )
        return out

    def _backward(grad, h, coeffs, coeff_mask, gates, fb_kernel, fb_state, token_mask, m, k, r, n_gates, domain, degree,
                  direct=False):
        """``(grad_h, grad_coeffs, grad_gates, grad_kernel)``, the gradients in the dtypes of h and of the
        parameters (``grad_kernel`` empty without feedback): the backward kernels write dL/dh and each
        program's partial sums (``_part_layout``), which ``_reduce_kernel`` sums into the parameters'
        gradients, so the backward dispatches no torch op but allocations (and, with token gates,
        the row gate gradients' sum over the column tiles)."""
        h = h.contiguous()  # grad_h (empty_like) then has h's strides, and the rows are one flat run
        grad = grad.contiguous()
        coeffs = coeffs.contiguous()
        if _flat("backward", h, coeffs, k, r, n_gates, degree):
            return _flat_backward(grad, h, coeffs, coeff_mask, gates, domain, degree, direct)
        batch, tokens, n_down = h.shape
        n_act, n_seg = m + k + r, (m > 0) + (k > 0) + (r > 0)
        per_neuron = coeffs.numel() > degree + 1
        lay = _layout(h, fb_kernel, fb_state, token_mask, m, k, r)
        window = lay["window"]
        bt = _token_block(tokens, BACKWARD_TILE["tokens"], window)
        bc = min(_backward_columns(bt, per_neuron), _pow2(max(m + k, 1)))
        bcf = min(BACKWARD_TILE["feedback_columns"], _pow2(max(r, 1)))
        n_tiles_t = _cdiv(tokens, bt)
        n_tiles = batch * n_tiles_t
        n_tiles_c, n_tiles_f = _cdiv(m + k, bc), _cdiv(r, bcf)
        programs = _token_programs(n_tiles, n_tiles_c, n_tiles_f, _sm_count(h.device) if h.is_cuda else 2)
        slot0, slot_width, kern_off, n_part = _part_layout(m, r, n_seg, degree, window, per_neuron, n_tiles_c + n_tiles_f)
        f32 = dict(dtype=torch.float32, device=h.device)
        part = torch.empty(programs, n_part, **f32) if n_tiles > 0 else torch.zeros(1, n_part, **f32)
        row_part = torch.empty(n_tiles_c + n_tiles_f, batch * tokens, n_seg, **f32) if n_gates else part
        grad_h = torch.empty_like(h)
        common = (tokens, n_tiles_t, n_tiles, programs, _cdiv(n_tiles, programs))  # ..., steps per program
        strides = (h.stride(0), h.stride(1), grad.stride(0), grad.stride(1))
        flags = dict(DEGREE=degree, PER_NEURON=per_neuron, TOKEN_GATES=n_gates > 0, DP=_pow2(degree + 1))
        if n_tiles > 0 and n_tiles_c > 0:  # its tiles run over the rows of every sequence as one
            rows = batch * tokens
            flat_tiles = _cdiv(rows, bt)
            warps = BACKWARD_TILE["warps"]
            _launcher(_backward_kernel, (programs, n_tiles_c), direct, warps,
                      _register_cap(warps, BACKWARD_TILE["programs_per_sm"]))(
                h, grad, grad_h, coeffs, coeff_mask, gates, part, row_part, rows, flat_tiles, flat_tiles, programs,
                _cdiv(flat_tiles, programs), *strides, m, k, r, lay["spec_idx"], lay["fb_idx"], n_seg, domain, n_part,
                slot0, slot_width, rows, BT=bt, BC=bc,
                IN_REGISTERS=BACKWARD_TILE["in_registers"], PREFETCH=BACKWARD_TILE["prefetch"], SPECTRAL=k > 0, **flags,
            )
        if n_tiles > 0 and n_tiles_f > 0:
            _launcher(_feedback_backward_kernel, (programs, n_tiles_f), direct)(
                h, grad, grad_h, gates, lay["kern"], lay["state"], lay["mask"], part, row_part, *common, n_tiles_c,
                *strides, *lay["state_strides"], *lay["mask_strides"], lay["mask_off"], m, k, r, lay["spec_idx"],
                lay["fb_idx"], n_seg, n_part, slot0, slot_width, kern_off, batch * tokens,
                WINDOW=window, HAS_MASK=lay["has_mask"], HAS_STATE=lay["has_state"], BT=bt, BC=bcf, WP=_pow2(window),
                **flags,
            )
        n_slots = max(n_tiles_c + n_tiles_f, 1)  # taps are read from the first slot's pass
        grads = _reduce(part, coeff_mask, coeffs, gates, fb_kernel, (slot0, slot_width, kern_off, n_part), n_seg,
                        n_slots, degree, per_neuron, direct)
        if n_gates:
            grad_h[..., n_act:] = row_part.sum(0).view(batch, tokens, n_seg)
        return (grad_h, *grads)

    def _reduce(part, coeff_mask, coeffs, gates, fb_kernel, layout, n_seg, n_slots, degree, per_neuron, direct):
        """``(grad_coeffs, grad_gates, grad_kernel)`` from the backward programs' rows of partial sums ``part``
        (``layout``: ``_part_layout``'s slot0, slot_width, kern_off, width) by ``_reduce_kernel``; ``grad_kernel``
        empty without feedback taps. One output per program, every row of every slot in one step where they fit
        (shared coefficients: on the H200, 264 rows x 3 slots took 2.2 us so, 7.8 us as 16 outputs of one program,
        2.7 us as torch's sum); per-neuron coefficients: 128 neighbouring outputs (contiguous in a row) per program."""
        slot0, slot_width, kern_off, n_part = layout
        grad_coeffs, grad_gates = torch.empty_like(coeffs), torch.empty_like(gates)
        grad_kernel = torch.empty_like(fb_kernel) if fb_kernel is not None else None
        n_coef, n_taps = coeffs.numel(), n_part - kern_off
        block = 128 if per_neuron else 1
        # rows per step: REDUCE_STEP loads per slot (16 to 1,024 rows), fewer where there are fewer rows (not when
        # traced: next_power_of_2 of a symbolic size costs minutes of sympy)
        br = min(1024, max(16, REDUCE_STEP // block))
        br = min(br, _pow2(part.shape[0])) if type(part.shape[0]) is int else br
        _launcher(_reduce_kernel, (_cdiv(n_coef + n_seg + n_taps, block),), direct)(
            part, coeff_mask, grad_coeffs, grad_gates, grad_gates if grad_kernel is None else grad_kernel,
            part.shape[0], n_part, slot0, slot_width, kern_off, n_coef, n_seg, n_taps,
            DEGREE=degree, PER_NEURON=per_neuron, N_SLOTS=n_slots, BLOCK=block, BR=br,
        )
        return grad_coeffs, grad_gates, grad_gates.new_empty(0) if grad_kernel is None else grad_kernel

    def _flat(side: str, h, coeffs, k, r, n_gates, degree) -> bool:
        """Whether the flat kernel of ``side`` (forward / backward) runs this call: polynomial columns only (no
        spectral, feedback or token-gate columns), one shared series, h one contiguous run of elements, and
        ``FLAT_TILE[side + "_on"]``."""
        return (FLAT_TILE[f"{side}_on"] and not (k or r or n_gates) and coeffs.numel() == degree + 1
                and h.is_contiguous())

    def _flat_grid(n, block: int, per_sm: int, device) -> tuple:
        """(programs, blocks per program) of a flat kernel over n elements: ``per_sm`` programs per SM, one
        wave, each over a contiguous share of the blocks (the last share may be shorter), or one program per
        block where there are fewer (decode, small prefills); for symbolic sizes ``per_sm`` per SM (no guard
        on n: a program past the blocks does nothing, or writes zero partial sums)."""
        blocks = _cdiv(n, block)
        programs = per_sm * (_sm_count(device) if device.type == "cuda" else 2)
        if type(blocks) is not int:
            return programs, _cdiv(blocks, programs)
        steps = _cdiv(blocks, max(1, min(programs, blocks)))
        return _cdiv(blocks, steps), steps

    def _flat_launch(kernel, side: str, n, device, direct: bool) -> tuple:
        """``(launch, programs, blocks per program, BLOCK)`` of a flat kernel over n elements with ``FLAT_TILE``'s
        settings for ``side`` (forward / backward): ``_flat_grid``'s one wave, registers capped so it fits."""
        block, per_sm, warps = (FLAT_TILE[f"{side}_{key}"] for key in ("block", "per_sm", "warps"))
        programs, steps = _flat_grid(n, block, per_sm, device)
        return _launcher(kernel, (programs,), direct, warps, _register_cap(warps, per_sm)), programs, steps, block

    def _flat_horner(degree: int) -> bool:
        """Whether the flat forward evaluates the series by Horner's rule in powers of t (``FLAT_TILE["horner"]``,
        up to ``POWER_BASIS_MAX_DEGREE``) rather than by Clenshaw's recurrence."""
        return FLAT_TILE["horner"] and degree <= POWER_BASIS_MAX_DEGREE

    def _flat_forward(h, out, coeffs, coeff_mask, gates, domain, degree, direct):
        n = h.numel()
        launch, _, steps, block = _flat_launch(_flat_forward_kernel, "forward", n, h.device, direct)
        launch(h, out, coeffs, coeff_mask, gates, n, steps, domain, DEGREE=degree, BLOCK=block,
               HORNER=_flat_horner(degree))
        return out

    def _flat_backward(grad, h, coeffs, coeff_mask, gates, domain, degree, direct):
        """``_backward`` of the flat case: dL/dh and one row of partial sums per program
        (``[coefficients | gate]``, the layout ``_part_layout`` gives one column tile), summed by ``_reduce_kernel``."""
        n = h.numel()
        launch, programs, steps, block = _flat_launch(_flat_backward_kernel, "backward", n, h.device, direct)
        layout = _part_layout(h.shape[-1], 0, 1, degree, 1, False, 1)
        part = torch.empty(programs, layout[3], dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        launch(h, grad, grad_h, coeffs, coeff_mask, gates, part, n, steps, domain, DEGREE=degree, BLOCK=block,
               PREFETCH=FLAT_TILE["prefetch"], N_PART=layout[3])
        return (grad_h, *_reduce(part, coeff_mask, coeffs, gates, None, layout, 1, 1, degree, False, direct))

    def _backward_columns(bt: int, per_neuron: bool = False) -> int:
        """The polynomial backward tile's columns for ``bt`` tokens: ``BACKWARD_TILE["columns"]``, narrowed
        where a feedback window raised the tokens above the tile's (``_token_block``), so a tile keeps its
        elements (and registers) per thread: 1 x 512 becomes 4 x 128 with a window of 4 (16 at the least).
        Per-neuron coefficients halve it (each thread holds 2 * degree + 1 coefficient values per column:
        at 1 x 256 on one warp with token gates they spill on sm_90, at 1 x 128 they do not; ``kernel_registers``)."""
        tile = BACKWARD_TILE["tokens"] * BACKWARD_TILE["columns"] // (2 if per_neuron else 1)
        return min(BACKWARD_TILE["columns"], max(16, _pow2(max(tile // bt, 1))))

    def _token_programs(n_tiles: int, n_tiles_c: int, n_tiles_f: int, sms: int) -> int:
        """Programs along the backward's token tiles (each column tile has as many): ``token_programs``,
        or ``programs_per_sm`` per SM over the polynomial column tiles (2 per SM over the feedback
        ones, where there are feedback columns), never more than there are token tiles. Programs an SM
        cannot hold at once (its registers, ``kernel_registers``) run as a second, partial wave."""
        programs = BACKWARD_TILE["token_programs"]
        if programs is None:
            per_sm = BACKWARD_TILE["programs_per_sm"]
            programs = max(_cdiv(per_sm * sms, max(n_tiles_c, 1)), _cdiv(2 * sms, n_tiles_f) if n_tiles_f else 1)
        return max(1, min(programs, n_tiles))

    def _part_layout(m, r, n_seg, degree, window, per_neuron, n_tiles_c):
        """(slot0, slot_width, kern_off, width) of a token program's row of partial sums:
        ``[per-neuron coefficients m*(degree+1) | one slot per column tile: (shared coefficients
        degree+1,) gates n_seg | feedback taps r*window]``; every entry is written by one program."""
        slot0 = m * (degree + 1) if per_neuron else 0
        slot_width = n_seg + (0 if per_neuron else degree + 1)
        kern_off = slot0 + n_tiles_c * slot_width
        return slot0, slot_width, kern_off, kern_off + r * window

    def _plain_eager(h: Tensor) -> bool:
        """Plain tensors outside any compiler or tracing mode: the wrapper calls ``_forward`` /
        ``_backward`` itself instead of the registered ops, whose Python dispatch layers (autograd,
        ADInplaceOrView with its schema walk, the triton_op backend) cost more host time than the
        launch. Traced or compiled code always sees the ops."""
        return EAGER_DIRECT and plain_eager(h)

    class _EagerActivation(torch.autograd.Function):
        """``ffn_activation`` with its registered autograd, without the dispatcher (plain eager)."""

        @staticmethod
        def forward(ctx, h, coeffs, coeff_mask, gates, fb_kernel, fb_state, token_mask, *meta):
            ctx.save_for_backward(h, coeffs, coeff_mask, gates, fb_kernel, fb_state, token_mask)
            ctx.meta = meta
            return _forward(h, coeffs, coeff_mask, gates, fb_kernel, fb_state, token_mask, *meta, False, direct=True)

        @staticmethod
        def backward(ctx, grad):
            return _input_grads(_backward(grad, *ctx.saved_tensors, *ctx.meta, direct=True), ctx.saved_tensors)

    def _input_grads(outputs, saved):
        """The backward op's ``(grad_h, grad_coeffs, grad_gates, grad_kernel)`` as gradients of the op's
        13 inputs (the mask, the state, the token mask and the sizes have none)."""
        grad_h, grad_coeffs, grad_gates, grad_kernel = outputs
        fb_kernel = saved[4]
        return (grad_h, grad_coeffs, None, grad_gates, None if fb_kernel is None else grad_kernel) + (None,) * 8


def _define_ops():
    """Register the three ops once per process (a second copy of this file, e.g. the remote-code
    one, reuses them)."""
    if hasattr(torch.ops.sparse_gpt2, "ffn_activation"):
        return
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    @triton_op("sparse_gpt2::ffn_activation", mutates_args=())
    def ffn_activation(
        h: Tensor, coeffs: Tensor, coeff_mask: Tensor, gates: Tensor, fb_kernel: Tensor | None,
        fb_state: Tensor | None, token_mask: Tensor | None, m: int, k: int, r: int, n_gates: int, domain: float,
        degree: int,
    ) -> Tensor:
        return _forward(h, coeffs, coeff_mask, gates, fb_kernel, fb_state, token_mask, m, k, r, n_gates, domain,
                        degree, False)

    @triton_op("sparse_gpt2::ffn_activation_stateful", mutates_args={"fb_state"})
    def ffn_activation_stateful(
        h: Tensor, coeffs: Tensor, coeff_mask: Tensor, gates: Tensor, fb_kernel: Tensor, fb_state: Tensor,
        token_mask: Tensor | None, m: int, k: int, r: int, n_gates: int, domain: float, degree: int,
    ) -> Tensor:
        return _forward(h, coeffs, coeff_mask, gates, fb_kernel, fb_state, token_mask, m, k, r, n_gates, domain,
                        degree, True)

    @triton_op("sparse_gpt2::ffn_activation_backward", mutates_args=())
    def ffn_activation_backward(
        grad: Tensor, h: Tensor, coeffs: Tensor, coeff_mask: Tensor, gates: Tensor, fb_kernel: Tensor | None,
        fb_state: Tensor | None, token_mask: Tensor | None, m: int, k: int, r: int, n_gates: int, domain: float,
        degree: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _backward(grad, h, coeffs, coeff_mask, gates, fb_kernel, fb_state, token_mask, m, k, r, n_gates,
                         domain, degree)

    def setup_context(ctx, inputs, output):
        h, coeffs, coeff_mask, gates, fb_kernel, fb_state, token_mask, *meta = inputs
        ctx.save_for_backward(h, coeffs, coeff_mask, gates, fb_kernel, fb_state, token_mask)
        ctx.meta = meta

    def backward(ctx, grad):
        outputs = torch.ops.sparse_gpt2.ffn_activation_backward(grad, *ctx.saved_tensors, *ctx.meta)
        return _input_grads(outputs, ctx.saved_tensors)

    ffn_activation.register_autograd(backward, setup_context=setup_context)
    if INTERPRET:  # the emulated kernel cannot be traced: AOT keeps the ops opaque, like custom_op
        def opaque(mode, func, types, args, kwargs):
            return mode.__torch_dispatch__(func, types, args, kwargs)

        for op in (ffn_activation, ffn_activation_stateful, ffn_activation_backward):
            op.register_torch_dispatch(FunctionalTensorMode, opaque)


if triton is not None:
    _define_ops()

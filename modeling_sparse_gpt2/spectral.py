"""Spectral component: a few DCT frequencies of the token's hidden vector, mapped back.

    z = C_K x                   (C_K: the rows K of the orthonormal DCT-II basis of R^d)
    z = z * [|z| >= kth(|z|)]   (only with spectral_selection="topk": per token keep the k largest
                                 of the 2k analysed frequencies, as the seed's top-k)
    y = O z                     (O = C_K^T M: the k x k frequency-domain map composed with the
                                 inverse transform, stored folded as one d x k matrix)

``C_K`` is this component's rows of the FFN's ``c_fc`` and ``O`` its columns of ``c_proj``, so it
costs two skinny slices of the big GEMMs rather than kernels of its own. The analysis rows start
as the DCT rows of the kept frequencies (``freq_index``) and are trained with every other weight
while healing (they are a frequency-initialised projection from then on).

FLOPs per token: matmul 4·d·k_analysed (a masked dense matmul costs the dense matmul).
"""

import math

import torch

from .component_base import FFNContext, GemmComponent


def dct_rows(freqs: torch.Tensor, d: int) -> torch.Tensor:
    """Rows ``freqs`` of the orthonormal DCT-II matrix: C[k, n] = a_k cos(pi (n + 1/2) k / d)."""
    n = torch.arange(d, dtype=torch.float64, device=freqs.device)
    k = freqs.to(torch.float64)[:, None]
    rows = torch.cos(math.pi * (n[None, :] + 0.5) * k / d) * math.sqrt(2.0 / d)
    rows[freqs == 0] = 1.0 / math.sqrt(d)
    return rows


class SpectralComponent(GemmComponent):
    def __init__(self, spec):
        super().__init__(spec.d, spec.spectral_candidates)
        self.k = spec.spectral_freqs
        self.topk = spec.spectral_selection == "topk"
        self.register_buffer("freq_index", torch.arange(spec.spectral_candidates, dtype=torch.long))

    def activate(self, z, ctx: FFNContext):
        if not self.topk or self.k >= z.shape[-1]:
            return z
        kth = z.abs().topk(self.k, dim=-1).values[..., -1:]
        return z * (z.abs() >= kth).to(z.dtype)

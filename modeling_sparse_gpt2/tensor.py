"""Tensor (factorised) component: a Monarch matrix, a product of two block-diagonal factors.

With d = nb * bs, write the input as blocks x[p, q] (block p, position q). Then

    h[p, k]  = sum_q L[p, k, q] x[p, q]          (nb blocks of bs x bs)
    y[o, k]  = sum_p R[k, o, p] h[p, k]          (bs blocks of nb x nb, across blocks: the
                                                  permutation between the factors is the index swap)

so the dense map it stands for is A[(o,k), (p,q)] = R[k, o, p] L[p, k, q]: every (k, p) slice of A
is rank one, which makes the projection of a dense matrix onto Monarch matrices closed-form (one
rank-1 SVD per slice, ``project_dense``). Full rank with 2·d·(bs + nb) parameters instead of d².

Layout: both factors run as batched GEMMs on the tokens-last views ``x^T`` [p, q, n] and
[k, p, n], which a batched GEMM can read in place (one of the last two strides is 1); batching over
blocks in the tokens-first layout needs a transposing copy of the activations around each factor.

FLOPs per token: matmul 2·d·bs + 2·d·nb.
"""

import torch
from torch import nn


class TensorComponent(nn.Module):

    def __init__(self, spec):
        super().__init__()
        nb = spec.tensor_blocks
        bs = spec.d // nb
        self.nb, self.bs = nb, bs
        self.left = nn.Parameter(torch.empty(nb, bs, bs))  # [p, k_out, q_in]
        self.right = nn.Parameter(torch.empty(bs, nb, nb))  # [k, o_out, p_in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = x.reshape(-1, self.nb, self.bs).permute(1, 2, 0)  # [p, q, n]: a view, no copy
        h = torch.matmul(self.left, xt)  # [p, k, n]   h[p, k] = L[p] x[p]
        y = torch.matmul(self.right, h.transpose(0, 1))  # [k, o, n]   y[o, k] = R[k] h[:, k]
        return y.permute(2, 1, 0).reshape(x.shape)  # channel o * bs + k

    def dense(self) -> torch.Tensor:
        """The d x d matrix this Monarch factorisation computes."""
        a = torch.einsum("kop,pkq->okpq", self.right, self.left)
        return a.reshape(self.nb * self.bs, self.nb * self.bs)

    @torch.no_grad()
    def project_dense(self, a: torch.Tensor):
        """Set the factors to the Frobenius-closest Monarch matrix to the d x d matrix ``a``."""
        nb, bs = self.nb, self.bs
        blocks = a.double().reshape(nb, bs, nb, bs).permute(1, 2, 0, 3)  # [k, p, o, q]
        u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
        root = s[..., 0].sqrt()
        self.right.copy_((u[..., :, 0] * root[..., None]).permute(0, 2, 1).to(self.right))  # [k, o, p]
        self.left.copy_((vh[..., 0, :] * root[..., None]).permute(1, 0, 2).to(self.left))  # [p, k, q]

    def matmul_flops_per_token(self) -> int:
        return 2 * self.nb * self.bs * self.bs + 2 * self.bs * self.nb * self.nb

    def elementwise_flops_per_token(self) -> int:
        return 0

"""`whiten`: SVD of the weight in whitened input coordinates (SVD-LLM style).

`S` = Cholesky factor of the input second moment `E[xxᵀ] = S Sᵀ` (a small ridge is added if it is
not positive definite); SVD of `W S = U Σ Vᵀ`; `B = U_r Σ_r`, `A = V_rᵀ S⁻¹`. Truncation error is
then measured on actual inputs: ‖(W − W_r) X‖ is minimised, not ‖W − W_r‖.
"""

from __future__ import annotations

import torch

from engine.methods.base import as_factors, per_linear, register_method, svd_factors, weight64


def cholesky_with_ridge(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric PSD matrix, adding a growing ridge until it succeeds."""
    scale = matrix.diagonal().mean().clamp_min(1e-30)
    ridge = 0.0
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(matrix + ridge * scale * torch.eye(matrix.shape[0], dtype=matrix.dtype))
        if int(info) == 0:
            return factor
        ridge = 1e-8 if ridge == 0.0 else ridge * 10
    raise ValueError("second moment is not positive definite even with a ridge of 1e-4")


class Whiten:
    name = "whiten"
    needs = "second_moment"
    description = "SVD of W·S with S the Cholesky factor of E[xxᵀ] (SVD-LLM)."

    def factorize(self, loaded, statistics):
        def one(ref):
            S = cholesky_with_ridge(statistics.site(ref.layer, ref.site).second_moment.to(torch.float64))
            U, sigma, Vh = svd_factors(weight64(ref) @ S)
            A = torch.linalg.solve_triangular(S, Vh, upper=False, left=False)  # Vᵀ S⁻¹
            return as_factors(U * sigma, A)

        return per_linear(loaded, self.name, one)


register_method(Whiten())

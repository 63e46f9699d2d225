"""`feature-pca`: PCA of each linear's output features (Bolaco / AFM), with bias compensation.

Eigenvectors `U` of the output covariance `W C_X Wᵀ` (pooled covariance by default, sample
selectable). `B = U_r`, `A = U_rᵀ W`: the output is projected onto its top-r principal directions.
The mean of the discarded directions is added back as a bias, `(I − U_r U_rᵀ) W μ_X`, so the
compressed layer is exact on the calibration mean. Stored as `bias_shift = W μ`,
`bias_coeff = Uᵀ W μ`, so that `bias_r = bias + W μ − U_r (U_rᵀ W μ)` for any r.

How (not what): `W C Wᵀ` has rank at most `d_in`, so for a wide matrix (`d_out > d_in`: gate, up)
its eigenvectors are found in `W`'s column space: `W = Y R` (thin QR, `Y` orthonormal),
`W C Wᵀ = Y (R C Rᵀ) Yᵀ`, so `U = Y P` and `Uᵀ W = Pᵀ R` with `P` the eigenvectors of the
`d_in × d_in` matrix `R C Rᵀ`. That is linear in `d_out`, needs no factor of `C` (which may be
singular), and keeps today's accuracy (a float64 symmetric eigensolver on the same operator).
Other shapes use `eigh(W C Wᵀ)` directly. The covariance is taken once per input site; sites run
in parallel (`per_site`).
"""

from __future__ import annotations

import torch

from engine.methods.base import as_factors, per_site, register_method, weight64


def output_principal_directions(w: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(U, Uᵀ w)` (float64): eigenvectors `U [d_out, min(d_out, d_in)]` of `w c wᵀ` by descending eigenvalue.

    For `d_out > d_in` the columns span `w`'s column space, so `U Uᵀ w = w` even when `c` is singular.
    """
    d_out, d_in = w.shape
    if d_out > d_in:
        R, basis_times = _column_space(w)  # w = Y R, Y [d_out, d_in] orthonormal: w c wᵀ = Y (R c Rᵀ) Yᵀ
        _, P = torch.linalg.eigh(R @ c @ R.T)  # [d_in, d_in], ascending
        P = P.flip(1)
        return basis_times(P), P.T @ R  # U = Y P, Uᵀ w = Pᵀ Yᵀ Y R
    _, vectors = torch.linalg.eigh(w @ c @ w.T)  # [d_out, d_out], ascending
    U = vectors.flip(1)
    return U, U.T @ w


def _column_space(w: torch.Tensor) -> tuple[torch.Tensor, object]:
    """`(R, M ↦ Y M)` with `w = Y R`, `Y [d_out, d_in]` orthonormal, `R` upper triangular (`d_out > d_in`).

    Cholesky QR (`R` from the Cholesky of `wᵀw`, `Y = w R⁻¹`; about half the work of Householder QR)
    when `w` is well conditioned: `Y` then departs from orthonormal by about ε·κ(w)², kept under 1e-8
    by asking `‖R‖_F ‖R⁻¹‖_F ≥ κ(w)` to stay under 1e4 (trained weights: κ ≈ 10–30). Householder QR otherwise.
    """
    R, info = torch.linalg.cholesky_ex(w.T @ w, upper=True)  # [d_in, d_in]
    if int(info) == 0:
        R_inv = torch.linalg.solve_triangular(R, torch.eye(R.shape[0], dtype=R.dtype), upper=True)
        if torch.linalg.matrix_norm(R) * torch.linalg.matrix_norm(R_inv) < 1e4:
            return R, lambda M: w @ (R_inv @ M)
    Q, R = torch.linalg.qr(w)  # [d_out, d_in], [d_in, d_in]
    return R, lambda M: Q @ M


class FeaturePCA:
    needs = "covariance"
    description = "Eigenvectors of W·C_X·Wᵀ (Bolaco), mean compensated by a bias."

    def __init__(self, name: str, covariance: str):
        self.name, self.covariance = name, covariance

    def factorize(self, loaded, statistics):
        def one_site(refs):
            site = statistics.site(refs[0].layer, refs[0].site)
            c = site.pooled_covariance if self.covariance == "pooled" else site.covariance  # once per site
            factors = {}
            for ref in refs:
                w = weight64(ref)  # [d_out, d_in]
                U, A = output_principal_directions(w, c)  # [d_out, R], [R, d_in]
                factors[ref.path] = as_factors(U, A, bias_shift=w @ site.mean, bias_coeff=A @ site.mean)  # Uᵀ W μ
            return factors

        return per_site(loaded, self.name, one_site)


register_method(FeaturePCA("feature-pca", "pooled"))
register_method(FeaturePCA("feature-pca-sample", "sample"))

"""`whiten`: SVD of the weight in whitened input coordinates (SVD-LLM style).

`S` = Cholesky factor of the input second moment `E[xxᵀ] = S Sᵀ` (a small ridge is added if it is
not positive definite); SVD of `W S = U Σ Vᵀ`; `B = U_r Σ_r`, `A = V_rᵀ S⁻¹`. Truncation error is
then measured on actual inputs: ‖(W − W_r) X‖ is minimised, not ‖W − W_r‖.

How (not what): the SVD of `X = W S` comes from a float64 symmetric eigendecomposition of its
smaller Gram matrix. `d_out > d_in`: `XᵀX = V Σ² Vᵀ`, `B = X V` (= UΣ), `A = Vᵀ S⁻¹`.
`d_out ≤ d_in`: `X Xᵀ = U Σ² Uᵀ`, `B = UΣ`, `A = Σ⁻¹ Uᵀ W` (= Vᵀ S⁻¹; no solve with `S`). Same factors
(up to sign, and to rotation within repeated singular values). σ is resolved to about 1e-8 of σ_max
(σ² to float64 rounding of σ_max²) where an SVD resolves 1e-16, so only directions below that are
ordered less exactly. The products skip known zeros: `W S` reads only the lower triangle of `S`, and
only the lower triangle of the Gram matrix is formed (all `eigh` reads), each about 5/8 of a full
product. `S` is computed once per input site (q, k, v share one; gate, up another); sites run in
parallel (`per_site`).
"""

from __future__ import annotations

import torch

from engine.methods.base import as_factors, per_site, register_method, weight64


def cholesky_with_ridge(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric PSD matrix, adding a growing ridge until it succeeds."""
    scale = matrix.diagonal().mean().clamp_min(1e-30)
    ridge = 0.0
    for _ in range(12):
        shifted = matrix if ridge == 0.0 else matrix + ridge * scale * torch.eye(matrix.shape[0], dtype=matrix.dtype)
        factor, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            return factor
        ridge = 1e-8 if ridge == 0.0 else ridge * 10
    raise ValueError("second moment is not positive definite even with a ridge of 1e-4")


def whitened_factors(w: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, A)` (float64) with `W S = U Σ Vᵀ`, `B = U Σ`, `A = Vᵀ S⁻¹`, by descending σ; S lower triangular."""
    d_out, d_in = w.shape
    X = _times_lower_triangular(w, S)  # [d_out, d_in]
    if d_out > d_in:
        _, V = torch.linalg.eigh(_lower_gram(X))  # XᵀX [d_in, d_in], ascending
        V = V.flip(1)
        return X @ V, torch.linalg.solve_triangular(S, V.T, upper=False, left=False)
    values, U = torch.linalg.eigh(_lower_gram(X.T))  # X Xᵀ [d_out, d_out], ascending
    U, sigma = U.flip(1), values.flip(0).clamp_min(0).sqrt()
    # σ = 0 only for a rank-deficient W; any positive scale keeps B_i A_i = U_i U_iᵀ W there
    sigma = sigma.clamp_min(max(sigma[0].item() * torch.finfo(torch.float64).eps, 1e-300))
    return U * sigma, (U.T @ w) / sigma.unsqueeze(1)


_BLOCK = 144  # columns per block product: small enough to skip most zeros, large enough for fast GEMMs


def _times_lower_triangular(w: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """`w @ L` for a lower-triangular `L`, without multiplying its zero upper blocks."""
    n = L.shape[0]
    product = torch.empty(w.shape[0], n, dtype=w.dtype)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        product[:, start:stop] = w[:, start:] @ L[start:, start:stop]  # L[:start, start:stop] = 0
    return product


def _lower_gram(X: torch.Tensor) -> torch.Tensor:
    """`XᵀX` with only its lower triangle (and diagonal blocks) formed, the rest zero: what `eigh` reads."""
    n = X.shape[1]
    gram = torch.zeros(n, n, dtype=X.dtype)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        gram[start:, start:stop] = X[:, start:].T @ X[:, start:stop]
    return gram


class Whiten:
    name = "whiten"
    needs = "second_moment"
    description = "SVD of W·S with S the Cholesky factor of E[xxᵀ] (SVD-LLM)."

    def factorize(self, loaded, statistics):
        def one_site(refs):
            S = cholesky_with_ridge(statistics.site(refs[0].layer, refs[0].site).second_moment.to(torch.float64))
            return {ref.path: as_factors(*whitened_factors(weight64(ref), S)) for ref in refs}

        return per_site(loaded, self.name, one_site)


register_method(Whiten())

"""`feature-pca`: PCA of each linear's output features (Bolaco / AFM), with bias compensation.

Eigenvectors `U` of the output covariance `W C_X Wᵀ` (pooled covariance by default, sample
selectable). `B = U_r`, `A = U_rᵀ W`: the output is projected onto its top-r principal directions.
The mean of the discarded directions is added back as a bias, `(I − U_r U_rᵀ) W μ_X`, so the
compressed layer is exact on the calibration mean. Stored as `bias_shift = W μ`,
`bias_coeff = Uᵀ W μ`, so that `bias_r = bias + W μ − U_r (U_rᵀ W μ)` for any r.

How (not what): `W C Wᵀ` has rank at most `d_in`, so for a wide matrix (`d_out > d_in`: gate, up)
its eigenvectors are found in `W`'s column space: `W = Q R` (thin QR), `W C Wᵀ = Q (R C Rᵀ) Qᵀ`,
so `U = Q P` with `P` the eigenvectors of the `d_in × d_in` matrix `R C Rᵀ`. That is linear in
`d_out`, needs no factor of `C` (which may be singular), and keeps today's accuracy (a float64
symmetric eigensolver on the same operator). Other shapes use `eigh(W C Wᵀ)` directly. The
covariance is taken once per input site; sites run in parallel (`per_site`).
"""

from __future__ import annotations

import torch

from engine.methods.base import as_factors, per_site, register_method, weight64


def output_principal_directions(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of `w c wᵀ` (float64), by descending eigenvalue: `[d_out, min(d_out, d_in)]`.

    For `d_out > d_in` the columns span `w`'s column space, so `U Uᵀ w = w` even when `c` is singular.
    """
    d_out, d_in = w.shape
    if d_out > d_in:
        Q, R = torch.linalg.qr(w)  # [d_out, d_in], [d_in, d_in]
        _, P = torch.linalg.eigh(R @ c @ R.T)  # ascending
        return Q @ P.flip(1)
    _, vectors = torch.linalg.eigh(w @ c @ w.T)  # ascending
    return vectors.flip(1)


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
                U = output_principal_directions(w, c)  # [d_out, R]
                w_mu = w @ site.mean  # [d_out]
                factors[ref.path] = as_factors(U, U.T @ w, bias_shift=w_mu, bias_coeff=U.T @ w_mu)
            return factors

        return per_site(loaded, self.name, one_site)


register_method(FeaturePCA("feature-pca", "pooled"))
register_method(FeaturePCA("feature-pca-sample", "sample"))

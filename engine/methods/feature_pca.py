"""`feature-pca`: PCA of each linear's output features (Bolaco / AFM), with bias compensation.

Eigenvectors `U` of the output covariance `W C_X Wᵀ` (pooled covariance by default, sample
selectable). `B = U_r`, `A = U_rᵀ W`: the output is projected onto its top-r principal directions.
The mean of the discarded directions is added back as a bias, `(I − U_r U_rᵀ) W μ_X`, so the
compressed layer is exact on the calibration mean. Stored as `bias_shift = W μ`,
`bias_coeff = Uᵀ W μ`, so that `bias_r = bias + W μ − U_r (U_rᵀ W μ)` for any r.
"""

from __future__ import annotations

import torch

from engine.methods.base import as_factors, per_linear, register_method, weight64


class FeaturePCA:
    needs = "covariance"
    description = "Eigenvectors of W·C_X·Wᵀ (Bolaco), mean compensated by a bias."

    def __init__(self, name: str, covariance: str):
        self.name, self.covariance = name, covariance

    def factorize(self, loaded, statistics):
        def one(ref):
            site = statistics.site(ref.layer, ref.site)
            c = site.pooled_covariance if self.covariance == "pooled" else site.covariance
            w = weight64(ref)  # [d_out, d_in]
            values, vectors = torch.linalg.eigh(w @ c @ w.T)  # ascending
            keep = min(w.shape)
            U = vectors.flip(1)[:, :keep]  # [d_out, R], descending eigenvalues
            w_mu = w @ site.mean  # [d_out]
            return as_factors(U, U.T @ w, bias_shift=w_mu, bias_coeff=U.T @ w_mu)

        return per_linear(loaded, self.name, one)


register_method(FeaturePCA("feature-pca", "pooled"))
register_method(FeaturePCA("feature-pca-sample", "sample"))

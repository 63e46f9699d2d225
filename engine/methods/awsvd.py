"""`awsvd`: activation-weighted SVD (LoRAP). Columns of W are scaled by input channel norms.

`D = diag(‖X_j‖₂)`; SVD of `W D = U Σ Vᵀ`; `B = U_r Σ_r`, `A = V_rᵀ D⁻¹`. Channels that carry more
activation energy are approximated better. Zero-norm channels get a tiny floor to keep D invertible.
"""

from __future__ import annotations

import torch

from engine.methods.base import as_factors, per_linear, register_method, svd_factors, weight64


class ActivationWeightedSVD:
    name = "awsvd"
    needs = "l2_norm"
    description = "SVD of W·diag(‖X_j‖₂), LoRAP's activation-weighted SVD."

    def factorize(self, loaded, statistics):
        def one(ref):
            norms = statistics.site(ref.layer, ref.site).l2_norm.to(torch.float64)
            d = norms.clamp_min(norms.max() * 1e-8 + 1e-30)
            U, S, Vh = svd_factors(weight64(ref) * d)  # W D: scale column j by d_j
            return as_factors(U * S, Vh / d)  # Vᵀ D⁻¹

        return per_linear(loaded, self.name, one)


register_method(ActivationWeightedSVD())

"""`svd`: plain truncated SVD of each weight, no data. `B = U_r Σ_r`, `A = V_rᵀ`."""

from __future__ import annotations

from engine.methods.base import as_factors, per_linear, register_method, svd_factors, weight64


class PlainSVD:
    name = "svd"
    needs = None
    description = "Truncated SVD of each weight matrix (data-free)."

    def factorize(self, loaded, statistics=None):
        def one(ref):
            U, S, Vh = svd_factors(weight64(ref))
            return as_factors(U * S, Vh)

        return per_linear(loaded, self.name, one)


register_method(PlainSVD())

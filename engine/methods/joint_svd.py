"""`joint-svd`: data-free joint rank-k SVD of linears that share an input.

`[W_q; W_k]` and `[W_gate; W_up]` are stacked on the output axis and factorised together, so each
pair shares one `A` (the right singular vectors) and keeps its own rows of `B = UΣ`. At equal rank
this stores `r·d_in` fewer parameters than two separate SVDs. v, o and down use plain SVD.
"""

from __future__ import annotations

import torch

from engine.methods.base import Factorization, Factors, as_factors, register_method, svd_factors, weight64

JOINT_PAIRS: tuple[tuple[str, str], ...] = (("q", "k"), ("gate", "up"))


class JointSVD:
    name = "joint-svd"
    needs = None
    description = "SVD of stacked q‖k and gate‖up with a shared A; v, o, down as svd (data-free)."

    def factorize(self, loaded, statistics=None):
        refs = {(ref.layer, ref.linear_type): ref for ref in loaded.linears()}
        factors, groups = {}, []
        paired = {t for pair in JOINT_PAIRS for t in pair}
        for (layer, linear_type), ref in refs.items():
            if linear_type not in paired:
                U, S, Vh = svd_factors(weight64(ref))
                factors[ref.path] = as_factors(U * S, Vh)
        for layer in sorted({layer for layer, _ in refs}):
            for first, second in JOINT_PAIRS:
                top, bottom = refs[(layer, first)], refs[(layer, second)]
                stacked = torch.cat([weight64(top), weight64(bottom)], dim=0)  # [d_top + d_bottom, d_in]
                U, S, Vh = svd_factors(stacked)
                B = U * S
                split = top.shape[0]
                factors[top.path] = as_factors(B[:split], Vh)
                # the same A object for both, so it is stored (and counted) once
                factors[bottom.path] = Factors(B[split:].to(torch.float32).contiguous(), factors[top.path].A)
                groups.append((top.path, bottom.path))
        return Factorization(self.name, factors, groups)


register_method(JointSVD())

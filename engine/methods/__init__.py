"""Decomposition methods, one module each, behind the `FactorizationMethod` protocol.

Importing this package registers every method in `engine.methods.base.METHODS`.
"""

from engine.methods import awsvd, feature_pca, joint_svd, svd, whiten  # noqa: F401  (registration)
from engine.methods.base import METHODS, Factorization, Factors, get_method

__all__ = ["METHODS", "Factorization", "Factors", "get_method"]

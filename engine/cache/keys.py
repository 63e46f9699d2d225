"""The keys of cached artifacts and of app requests, in one place and without torch.

A key hashes everything the artifact depends on: the model fingerprint (weights and tokenizer,
hence BOS handling), the text fingerprint, the windowing and, where they apply, the method, the
calibration and a definition version. Bump a version when the definition of what it keys changes,
so old values are never mixed with new ones. The key formulas are those of RankScope 0.1.0, so a
cache written by it is still found (tests/test_release_cache.py), except the reference
distribution's: 0.2 replaced its top-k estimate by exact KL (`REFERENCE_VERSION`).

What a forward pass measures (calibration statistics, evaluations, references, and factorisations, whose
weights are read in the model's dtype) also depends on the forward dtype: a `dtype` other than float32
is appended to those keys (`forward_dtype_part`), and float32 appends nothing, so every float32 key is
the one it always was. Sweep keys follow from the factorisation and reference ids. Token windows do not
depend on it. The device is in no key (`engine.models.device`).
"""

from __future__ import annotations

from engine.hashing import sha256_json
from engine.texts.windows import Windowing

STATISTICS_VERSION = 1  # definition of a stored calibration statistic
FACTORIZATION_VERSION = 1  # definition of a stored factorisation
REFERENCE_VERSION = 2  # 2: final hidden states (exact KL); 1 was top-k + tail bucket (0.1.0)
KEY_LENGTH = 32


def digest(*parts) -> str:
    """A short stable hash of plain values (settings, request parts): 16 hex characters."""
    return sha256_json([repr(part) for part in parts])[:16]


def forward_dtype_part(dtype: str) -> list:
    """What a forward dtype adds to a key: nothing for float32 (keys as before dtypes existed), else its name."""
    return [] if dtype == "float32" else ["dtype", dtype]


def windows_key(model_fingerprint: str, text_fp: str, windowing: Windowing) -> str:
    return sha256_json(["windows", model_fingerprint, text_fp, *windowing.key()])[:KEY_LENGTH]


def calibration_key(model_fingerprint: str, text_fp: str, windowing: Windowing, n_groups: int,
                    dtype: str = "float32") -> str:
    return sha256_json(
        ["calibration", STATISTICS_VERSION, model_fingerprint, text_fp, *windowing.key(), n_groups,
         *forward_dtype_part(dtype)]
    )[:KEY_LENGTH]


def evaluation_key(model_fingerprint: str, text_fp: str, windowing: Windowing, dtype: str = "float32") -> str:
    return sha256_json(["evaluation", model_fingerprint, text_fp, *windowing.key(),
                        *forward_dtype_part(dtype)])[:KEY_LENGTH]


def factorization_key(model_fingerprint: str, method: str, calibration_id: str, dtype: str = "float32") -> str:
    """`calibration_id` is '' for data-free methods (whose factors still depend on the dtype the weights are in)."""
    return sha256_json(
        ["factorization", FACTORIZATION_VERSION, STATISTICS_VERSION, model_fingerprint, method, calibration_id,
         *forward_dtype_part(dtype)]
    )[:KEY_LENGTH]


def reference_key(model_fingerprint: str, text_fp: str, windowing: Windowing, dtype: str = "float32") -> str:
    """Version 2 keys differ from 0.1.0's top-k references, so an approximate reference is never read as exact
    (and sweep keys, built on reference ids, change with them)."""
    return sha256_json(["reference", REFERENCE_VERSION, model_fingerprint, text_fp, *windowing.key(),
                        *forward_dtype_part(dtype)])[:KEY_LENGTH]


def sweep_key(model_fingerprint: str, method: str, factorization_id: str, reference_id: str) -> str:
    """Points of one sweep share a model, method, factorisation and evaluation set."""
    return sha256_json(["sweep", model_fingerprint, method, factorization_id, reference_id])[:KEY_LENGTH]

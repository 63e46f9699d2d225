"""The shifted accumulation of calibration sums: float32 products of `x − s` keep the centred statistics close to
float64 products where the unshifted float32 products lose them to cancellation (activations with large means)."""

from __future__ import annotations

import torch

from engine.calibration import _SiteAccumulator

DIM, WINDOW_LEN, WINDOWS, BATCH = 48, 256, 8, 2
GROUP_TOKENS = [2 * WINDOW_LEN] * 4  # 4 groups of 2 windows


def _activations(massive: bool = False) -> list[torch.Tensor]:
    """Batches [B, S, d] float32 whose channels have means up to 40 times their spread, as some LLM channels do;
    `massive`: also a channel that is near 0 except on the first token of each window (about 3000 there)."""
    generator = torch.Generator().manual_seed(0)
    mean = torch.ones(DIM)
    mean[:6] = torch.tensor([40.0, -25.0, 30.0, 12.0, -60.0, 18.0])
    mixing = torch.randn(DIM, DIM, generator=generator) / DIM**0.5
    batches = [(torch.randn(BATCH, WINDOW_LEN, DIM, generator=generator) @ mixing + mean).float()
               for _ in range(WINDOWS // BATCH)]
    if massive:
        for batch in batches:
            batch[:, :, -1] *= 0.01
            batch[:, 0, -1] = 3000.0
    return batches


def _accumulate(product_dtype: torch.dtype, shift: str = "median", massive: bool = False):
    accumulator = _SiteAccumulator(DIM, GROUP_TOKENS, product_dtype)
    batches = _activations(massive)
    if shift == "none":
        accumulator.shift = torch.zeros(DIM, dtype=product_dtype)  # s = 0: the plain float32 Σ x xᵀ of before
    elif shift == "mean":
        accumulator.shift = batches[0].reshape(-1, DIM).mean(dim=0).to(product_dtype)
    for index, batch in enumerate(batches):
        accumulator.add(batch, [index * BATCH // 2 + row // 2 for row in range(BATCH)])
    return accumulator.finish()[0]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_shifted_float32_products_are_much_closer_to_float64_than_unshifted_ones():
    exact = _accumulate(torch.float64)
    shifted = _accumulate(torch.float32)
    unshifted = _accumulate(torch.float32, shift="none")
    for name in ("covariance", "pooled_covariance"):
        shifted_error = _relative_error(getattr(shifted, name), getattr(exact, name))
        unshifted_error = _relative_error(getattr(unshifted, name), getattr(exact, name))
        assert shifted_error < 1e-6, (name, shifted_error)
        assert unshifted_error > 20 * shifted_error, (name, unshifted_error, shifted_error)
    # the uncentred statistics stay as close as before (Σ x xᵀ is recovered in float64)
    assert _relative_error(shifted.second_moment, exact.second_moment) < 1e-6
    assert _relative_error(shifted.l2_norm, exact.l2_norm) < 1e-6
    torch.testing.assert_close(shifted.mean, exact.mean, rtol=0, atol=0)  # group sums of x are float64 as before


def test_uneven_groups_correct_each_size_with_its_own_sums():
    """Groups of two sizes (3 and 2 windows): each size's Σ x xᵀ is recovered with its own Σ x and token count."""
    sizes = [3 * WINDOW_LEN, 3 * WINDOW_LEN, 2 * WINDOW_LEN]  # 8 windows: groups 0,0,0,1,1,1,2,2
    window_groups = [0, 0, 0, 1, 1, 1, 2, 2]
    results = {}
    for dtype in (torch.float64, torch.float32):
        accumulator = _SiteAccumulator(DIM, sizes, dtype)
        for index, batch in enumerate(_activations()):
            accumulator.add(batch, window_groups[index * BATCH:(index + 1) * BATCH])
        results[dtype] = accumulator.finish()[0]
    for name in ("covariance", "pooled_covariance", "second_moment"):
        assert _relative_error(getattr(results[torch.float32], name), getattr(results[torch.float64], name)) < 1e-6


def test_a_channel_with_massive_activations_keeps_its_precision():
    """A few tokens at about 3000 in one channel: the median shift leaves that channel near 0 on the other tokens,
    where the mean would put its offset on all of them and lose the precision it was meant to keep."""
    exact = _accumulate(torch.float64, massive=True)
    errors = {shift: _relative_error(_accumulate(torch.float32, shift, massive=True).covariance, exact.covariance)
              for shift in ("median", "mean")}
    assert errors["median"] < 1e-7, errors
    assert errors["mean"] > 1e-6, errors

"""Decomposition methods and `compress_`/`restore_` on tiny llama, qwen2 and gemma3 models; the fast
feature-pca and whiten factorisations against today's straightforward ones on tiny random matrices."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.calibration import CalibrationStatistics, SiteStatistics, collect_statistics
from engine.compression.lowrank import LowRankLinear, compress_, compressed_paths, restore_
from engine.compression.units import ModelShapes, count_parameters
from engine.errors import RankScopeError
from engine.methods import METHODS, Factorization
from engine.parallel import parallel_map
from engine.methods.whiten import cholesky_with_ridge
from engine.models.adapters import LINEAR_TYPES, SITES, LinearRef
from tests.tiny_models import FAMILIES, TRAINING_TEXT

RANKS = (8, 16)


class TinySetup:
    """One tiny model with its calibration windows, statistics and (lazily) every factorisation."""

    def __init__(self, loaded, windows, statistics):
        self.loaded, self.windows, self.statistics = loaded, windows, statistics
        self._factorizations: dict[str, Factorization] = {}
        with torch.no_grad():
            self.logits = self.logits_now()

    @property
    def model(self):
        return self.loaded.model

    def factorization(self, method: str) -> Factorization:
        if method not in self._factorizations:
            self._factorizations[method] = METHODS[method].factorize(self.loaded, self.statistics)
        return self._factorizations[method]

    @torch.no_grad()
    def logits_now(self) -> torch.Tensor:
        return self.model(input_ids=self.windows[:2], use_cache=False).logits  # [2, L, V]

    @torch.no_grad()
    def site_inputs(self) -> dict[tuple[int, str], torch.Tensor]:
        """Inputs `[T, d]` (float64) of every site over the calibration windows, as the statistics saw them."""
        adapter, captured, handles = self.loaded.adapter, {}, []
        for layer in range(self.loaded.num_layers):
            for site in SITES:
                def hook(_module, args, key=(layer, site)):
                    captured.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).to(torch.float64))
                handles.append(adapter.site_module(self.model, layer, site).register_forward_pre_hook(hook))
        try:
            for index in range(self.windows.shape[0]):
                self.model.get_decoder()(input_ids=self.windows[index : index + 1], use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return {key: torch.cat(parts) for key, parts in captured.items()}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tiny_model_dirs, tmp_path_factory) -> TinySetup:
    from engine.models.loading import load_model
    from engine.store import open_store
    from engine.texts.corpus import load_corpus
    from engine.texts.windows import Windowing, make_windows

    root = tmp_path_factory.mktemp(f"methods-{request.param}")
    text = root / "calibration.txt"
    text.write_text(TRAINING_TEXT * 4)
    with pytest.MonkeyPatch.context() as patch:  # module scope: keep everything out of the project cache
        patch.setenv("RANKSCOPE_CACHE", str(root / "cache"))
        loaded = load_model(str(tiny_model_dirs[request.param]), open_store(root / "cache" / "rankscope.duckdb"))
        windows = make_windows(load_corpus(str(text)), loaded.tokenizer, Windowing(32, 16))
    statistics = collect_statistics(loaded.model, loaded.adapter, windows, n_groups=4)
    setup = TinySetup(loaded, windows, statistics)
    yield setup
    restore_(setup.model)


def _full_ranks(factorization: Factorization) -> dict[str, int]:
    return {path: f.max_rank for path, f in factorization.factors.items()}


def _uniform_ranks(tiny: TinySetup, rank: int) -> dict[str, int]:
    return {ref.path: min(rank, *ref.shape) for ref in tiny.loaded.linears()}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_full_rank_compressed_model_reproduces_the_logits(tiny, method):
    factorization = tiny.factorization(method)
    assert set(factorization.factors) == {ref.path for ref in tiny.loaded.linears()}
    try:
        compress_(tiny.model, _full_ranks(factorization), factorization)
        assert all(isinstance(tiny.model.get_submodule(p), LowRankLinear) for p in factorization.factors)
        full = tiny.logits_now()
        compress_(tiny.model, _uniform_ranks(tiny, 8), factorization)
        truncated = tiny.logits_now()
    finally:
        restore_(tiny.model)
    torch.testing.assert_close(full, tiny.logits, rtol=0, atol=1e-5)
    assert (truncated - tiny.logits).abs().max() > 1e-3  # rank 8 really changes the model


@pytest.mark.parametrize("method", sorted(METHODS))
def test_full_rank_factors_reproduce_each_weight(tiny, method):
    factorization = tiny.factorization(method)
    # joint-svd factorises the stack q‖k (gate‖up), so its rank may exceed one member's d_out
    unit_rank = {p: u.max_rank for u in ModelShapes.of(tiny.loaded).units(method) for p in u.paths}
    for ref in tiny.loaded.linears():
        f = factorization.factors[ref.path]
        d_out, d_in = ref.shape
        assert f.max_rank == unit_rank[ref.path]
        if method != "joint-svd" or ref.linear_type in ("v", "o", "down"):
            assert f.max_rank == min(d_out, d_in)
        assert f.B.shape == (d_out, f.max_rank) and f.A.shape == (f.max_rank, d_in)
        assert f.B.dtype == f.A.dtype == torch.float32
        torch.testing.assert_close(f.weight(f.max_rank), ref.module.weight.detach(), rtol=0, atol=1e-5)
        delta = f.bias_delta(f.max_rank)
        if method.startswith("feature-pca"):
            # the mean compensation vanishes at full rank: nothing was projected away
            assert delta is not None and delta.shape == (d_out,)
            assert delta.abs().max() < 1e-5
        else:
            assert delta is None


def test_svd_truncation_error_is_the_singular_value_tail(tiny):
    factorization = tiny.factorization("svd")
    for ref in tiny.loaded.linears():
        w = ref.module.weight.detach().double()
        sigma = torch.linalg.svdvals(w)
        for rank in RANKS:
            if rank >= len(sigma):
                continue
            error = (w - factorization.factors[ref.path].weight(rank).double()).pow(2).sum()
            assert error.item() == pytest.approx(sigma[rank:].pow(2).sum().item(), rel=1e-4)


def _output_errors(tiny: TinySetup, method: str, rank: int, inputs) -> dict[str, float]:
    """Per linear: Σ over calibration tokens of ‖W x − (W_r x + bias_delta_r)‖²."""
    factorization, errors = tiny.factorization(method), {}
    for ref in tiny.loaded.linears():
        f = factorization.factors[ref.path]
        r = min(rank, f.max_rank)
        x = inputs[(ref.layer, ref.site)]  # [T, d_in]
        exact = x @ ref.module.weight.detach().double().T  # [T, d_out]
        approx = (x @ f.A[:r].double().T) @ f.B[:, :r].double().T
        delta = f.bias_delta(r)
        if delta is not None:
            approx = approx + delta.double()
        errors[ref.path] = (exact - approx).pow(2).sum().item()
    return errors


@pytest.mark.parametrize("rank", RANKS)
def test_data_aware_methods_reconstruct_calibration_outputs_better_than_svd(tiny, rank):
    inputs = tiny.site_inputs()
    assert inputs[(0, "attn_in")].shape[0] == tiny.windows.numel()
    svd = _output_errors(tiny, "svd", rank, inputs)
    pooled = _output_errors(tiny, "feature-pca", rank, inputs)
    sample = _output_errors(tiny, "feature-pca-sample", rank, inputs)
    whiten = _output_errors(tiny, "whiten", rank, inputs)
    energy = {ref.path: (inputs[(ref.layer, ref.site)] @ ref.module.weight.detach().double().T).pow(2).sum().item()
              for ref in tiny.loaded.linears()}
    for ref in tiny.loaded.linears():
        path, slack = ref.path, 1e-6 * energy[ref.path]
        # PCA of the outputs with the mean added back is the best rank-r affine map on these inputs,
        # and whitened SVD the best rank-r linear one: both beat plain SVD matrix by matrix.
        assert sample[path] <= svd[path] + slack, path
        assert whiten[path] <= svd[path] + slack, path
        w = ref.module.weight.detach().double()
        stats = tiny.statistics.site(ref.layer, ref.site)
        r = min(rank, *ref.shape)
        pca_tail = torch.linalg.eigvalsh(w @ stats.covariance @ w.T).flip(0)[r:].sum() * (stats.n_tokens - 1)
        assert sample[path] == pytest.approx(pca_tail.item(), rel=1e-3, abs=slack)
        white_tail = torch.linalg.svdvals(w @ torch.linalg.cholesky(stats.second_moment))[r:].pow(2).sum()
        assert whiten[path] == pytest.approx(white_tail.item() * stats.n_tokens, rel=1e-3, abs=slack)
    # pooled covariance is not the sample's, so it is checked over the whole model
    assert sum(pooled.values()) <= sum(svd.values())
    assert sum(pooled.values()) < 0.9 * sum(svd.values())


def _ranks_by_type(tiny: TinySetup, by_type: dict[str, int]) -> dict[str, int]:
    return {ref.path: by_type[ref.linear_type] for ref in tiny.loaded.linears()}


def test_joint_svd_shares_one_a_and_counts_it_once(tiny):
    shapes = ModelShapes.of(tiny.loaded)
    ranks = _ranks_by_type(tiny, {"q": 8, "k": 8, "v": 8, "o": 8, "gate": 16, "up": 16, "down": 16})
    joint = count_parameters(shapes, "joint-svd", ranks)
    separate = count_parameters(shapes, "svd", ranks)
    hidden = tiny.loaded.config.hidden_size
    # each layer saves one A of q‖k (8 x hidden) and one of gate‖up (16 x hidden)
    assert separate.decoder_compressed - joint.decoder_compressed == shapes.num_layers * (8 + 16) * hidden
    assert joint.decoder_dense == separate.decoder_dense == shapes.decoder_linear_params

    factorization = tiny.factorization("joint-svd")
    assert len(factorization.joint_groups) == 2 * shapes.num_layers
    model = tiny.model
    try:
        compress_(model, ranks, factorization)
        for top, bottom in factorization.joint_groups:
            assert model.get_submodule(top).A is model.get_submodule(bottom).A
            assert model.get_submodule(top).B is not model.get_submodule(bottom).B
        assert sum(p.numel() for p in model.parameters()) == joint.total_compressed
        compress_(model, ranks, tiny.factorization("svd"))
        assert sum(p.numel() for p in model.parameters()) == separate.total_compressed
    finally:
        restore_(model)
    assert sum(p.numel() for p in model.parameters()) == shapes.total_params


def test_joint_svd_pairs_share_right_factors_of_the_stacked_matrix(tiny):
    factorization = tiny.factorization("joint-svd")
    for top, bottom in factorization.joint_groups:
        stacked = torch.cat([tiny.model.get_submodule(p).weight.detach().double() for p in (top, bottom)])
        sigma = torch.linalg.svdvals(stacked)
        approx = torch.cat([factorization.factors[p].weight(8).double() for p in (top, bottom)])
        assert (stacked - approx).pow(2).sum().item() == pytest.approx(sigma[8:].pow(2).sum().item(), rel=1e-4)


def test_restore_puts_back_the_original_modules(tiny):
    model = tiny.model
    originals = {ref.path: ref.module for ref in tiny.loaded.linears()}
    factorization = tiny.factorization("svd")
    compress_(model, _uniform_ranks(tiny, 8), factorization)
    assert sorted(compressed_paths(model)) == sorted(originals)
    compress_(model, _full_ranks(factorization), factorization)  # replaces, never stacks
    assert sorted(compressed_paths(model)) == sorted(originals)
    torch.testing.assert_close(tiny.logits_now(), tiny.logits, rtol=0, atol=1e-5)
    restore_(model)
    assert compressed_paths(model) == []
    assert all(model.get_submodule(path) is module for path, module in originals.items())
    assert torch.equal(tiny.logits_now(), tiny.logits)
    restore_(model)  # a no-op on an uncompressed model
    assert all(model.get_submodule(path) is module for path, module in originals.items())


def test_compress_with_a_bad_rank_leaves_the_model_untouched(tiny):
    model = tiny.model
    refs = list(tiny.loaded.linears())
    ranks = {refs[0].path: 8, refs[1].path: 8, refs[2].path: min(refs[2].shape) + 1}
    with pytest.raises(RankScopeError, match="outside"):
        compress_(model, ranks, tiny.factorization("svd"))
    with pytest.raises(RankScopeError, match="no factors"):
        compress_(model, {"model.layers.0.mlp.nonexistent": 8}, tiny.factorization("svd"))
    assert compressed_paths(model) == []
    assert all(model.get_submodule(ref.path) is ref.module for ref in refs)


@pytest.mark.parametrize("method", ["joint-svd", "feature-pca"])
def test_factorization_tensors_round_trip_keeps_shared_a_shared(tiny, method, tmp_path):
    factorization = tiny.factorization(method)
    tensors, metadata = factorization.to_tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "f.safetensors"), metadata=metadata)
    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as handle:
        stored_metadata = handle.metadata()
    again = Factorization.from_tensors(load_file(str(tmp_path / "f.safetensors")), stored_metadata)

    assert again.method == method
    assert again.joint_groups == factorization.joint_groups
    assert set(again.factors) == set(factorization.factors)
    for path, f in factorization.factors.items():
        g = again.factors[path]
        assert torch.equal(g.A, f.A) and torch.equal(g.B, f.B)
        for name in ("bias_shift", "bias_coeff"):
            mine, theirs = getattr(f, name), getattr(g, name)
            assert (mine is None and theirs is None) or torch.equal(mine, theirs)
    for top, bottom in again.joint_groups:
        assert f"{bottom}::A" not in tensors  # written once
        assert again.factors[top].A is again.factors[bottom].A
    assert bool(again.joint_groups) == (method == "joint-svd")
    try:
        compress_(tiny.model, _uniform_ranks(tiny, 8), again)
        for top, bottom in again.joint_groups:
            assert tiny.model.get_submodule(top).A is tiny.model.get_submodule(bottom).A
    finally:
        restore_(tiny.model)


# --- the fast factorisations against today's straightforward ones, on tiny random matrices ---
# hidden 12, kv 6, intermediate 20: q, o square; k, v narrow; gate, up wide (d_out > d_in); down narrow.
# Layer 1's up has two equal columns (rank 11).
TINY_SHAPES = {"q": (12, 12), "k": (6, 12), "v": (6, 12), "o": (12, 12), "gate": (20, 12), "up": (20, 12), "down": (12, 20)}
# (layer, site) -> rank of the site's inputs: layer 1 has singular covariances and second moments
INPUT_RANK = {(1, "mlp_in"): 7, (1, "down_in"): 9, (1, "attn_in"): 10}


class _Loaded:
    def __init__(self, refs):
        self.refs = list(refs)

    def linears(self):
        return iter(self.refs)


def _random_linears(num_layers: int = 2, seed: int = 0) -> _Loaded:
    generator = torch.Generator().manual_seed(seed)
    refs = []
    for layer in range(num_layers):
        for linear_type in LINEAR_TYPES:
            d_out, d_in = TINY_SHAPES[linear_type]
            module = torch.nn.Linear(d_in, d_out, bias=False)
            with torch.no_grad():
                module.weight.copy_(torch.randn(d_out, d_in, generator=generator))
                if (layer, linear_type) == (1, "up"):  # a wide weight of rank d_in − 1
                    module.weight[:, 1] = module.weight[:, 0]
            refs.append(LinearRef(layer, linear_type, f"layers.{layer}.{linear_type}", module))
    return _Loaded(refs)


def _random_statistics(loaded: _Loaded, seed: int = 1) -> CalibrationStatistics:
    """Statistics of random inputs [n, d] (of rank INPUT_RANK where given), with a pooled covariance
    from 4 groups, as `collect_statistics` defines them."""
    generator = torch.Generator().manual_seed(seed)
    sites = {}
    for ref in loaded.linears():
        key, d = (ref.layer, ref.site), ref.shape[1]
        if key in sites:
            continue
        rank = INPUT_RANK.get(key, d)
        mix = torch.randn(rank, d, generator=generator, dtype=torch.float64) * torch.logspace(0, -3, rank, dtype=torch.float64)[:, None]
        x = torch.randn(64, rank, generator=generator, dtype=torch.float64) @ mix + torch.randn(d, generator=generator, dtype=torch.float64)
        groups = x.view(4, 16, d)
        centred = groups - groups.mean(dim=1, keepdim=True)
        pooled = (centred.transpose(1, 2) @ centred).mean(dim=0) / 15
        sites[key] = SiteStatistics(x.mean(dim=0), x.T @ x / 64, pooled, x.pow(2).sum(dim=0).sqrt(), 64)
    return CalibrationStatistics(sites, 4)


def _eigh_feature_pca(w, c, mu):
    """Today's feature-pca of one linear: eigh of the d_out × d_out output covariance."""
    _, vectors = torch.linalg.eigh(w @ c @ w.T)
    U = vectors.flip(1)[:, : min(w.shape)]
    return U, U.T @ w, w @ mu, U.T @ (w @ mu)


def _svd_whiten(w, second_moment):
    """Today's whiten of one linear: Cholesky of the second moment, SVD of W S."""
    S = cholesky_with_ridge(second_moment)
    U, sigma, Vh = torch.linalg.svd(w @ S, full_matrices=False)
    return U * sigma, torch.linalg.solve_triangular(S, Vh, upper=False, left=False)


def _numerical_rank(values: torch.Tensor) -> int:
    """Count of eigen/singular values clearly above rounding of the largest."""
    return int((values > values.max() * 1e-9).sum())


def _assert_same_factors_up_to_sign(B, A, B_ref, A_ref, ranks, scale):
    """Equal rank-r weights, and equal |columns of B| and |rows of A| up to the largest rank checked."""
    for r in ranks:
        torch.testing.assert_close(B[:, :r].double() @ A[:r].double(), B_ref[:, :r] @ A_ref[:r], rtol=0, atol=2e-5 * scale)
    top = max(ranks)
    torch.testing.assert_close(B[:, :top].double().abs(), B_ref[:, :top].abs(), rtol=1e-4, atol=2e-5 * B_ref.abs().max().item())
    torch.testing.assert_close(A[:top].double().abs(), A_ref[:top].abs(), rtol=1e-4, atol=2e-5 * A_ref.abs().max().item())


@pytest.mark.parametrize("method", ["feature-pca", "feature-pca-sample"])
def test_feature_pca_equals_the_eigh_of_the_output_covariance_up_to_sign(method):
    loaded = _random_linears()
    statistics = _random_statistics(loaded)
    factorization = METHODS[method].factorize(loaded, statistics)
    shapes_seen = set()
    for ref in loaded.linears():
        site = statistics.site(ref.layer, ref.site)
        c = site.pooled_covariance if method == "feature-pca" else site.covariance
        w = ref.module.weight.detach().double()
        f = factorization.factors[ref.path]
        U_ref, A_ref, shift_ref, coeff_ref = _eigh_feature_pca(w, c, site.mean)
        assert f.B.shape == U_ref.shape and f.A.shape == A_ref.shape and f.B.dtype == torch.float32
        # beyond the rank of W C Wᵀ the eigenvalues are 0 (repeated): any basis there is as good
        rank = _numerical_rank(torch.linalg.eigvalsh(w @ c @ w.T))
        ranks = sorted({1, rank // 2, rank})
        _assert_same_factors_up_to_sign(f.B, f.A, U_ref, A_ref, ranks, w.abs().max().item())
        torch.testing.assert_close(f.bias_shift.double(), shift_ref, rtol=1e-5, atol=1e-5 * shift_ref.abs().max().item())
        for r in ranks:
            expected = shift_ref - U_ref[:, :r] @ coeff_ref[:r]
            torch.testing.assert_close(f.bias_delta(r).double(), expected, rtol=0, atol=2e-5 * shift_ref.abs().max().item())
        # full rank: the columns span W's columns, so nothing is lost, singular covariance or not
        torch.testing.assert_close(f.weight(f.max_rank).double(), w, rtol=0, atol=1e-5 * w.abs().max().item())
        assert f.bias_delta(f.max_rank).abs().max() < 1e-5 * shift_ref.abs().max()
        shapes_seen.add((w.shape[0] > w.shape[1], rank < min(w.shape)))
    # wide and not, each with a full-rank and a singular output covariance
    assert shapes_seen == {(True, True), (True, False), (False, True), (False, False)}


def test_whiten_equals_the_svd_of_the_whitened_weight_up_to_sign():
    loaded = _random_linears()
    statistics = _random_statistics(loaded)
    factorization = METHODS["whiten"].factorize(loaded, statistics)
    shapes_seen = set()
    for ref in loaded.linears():
        second_moment = statistics.site(ref.layer, ref.site).second_moment
        w = ref.module.weight.detach().double()
        f = factorization.factors[ref.path]
        B_ref, A_ref = _svd_whiten(w, second_moment)
        assert f.B.shape == B_ref.shape and f.A.shape == A_ref.shape and f.B.dtype == f.A.dtype == torch.float32
        assert f.bias_shift is None and f.bias_coeff is None
        # a singular second moment gets a ridge: singular values past its rank are tiny and clustered
        rank = min(min(w.shape), _numerical_rank(torch.linalg.eigvalsh(second_moment)))
        _assert_same_factors_up_to_sign(f.B, f.A, B_ref, A_ref, sorted({1, rank // 2, rank}), w.abs().max().item())
        torch.testing.assert_close(f.weight(f.max_rank).double(), w, rtol=0, atol=1e-5 * w.abs().max().item())
        shapes_seen.add((w.shape[0] >= w.shape[1], rank < min(w.shape)))
    assert shapes_seen == {(True, True), (True, False), (False, True), (False, False)}


@pytest.mark.parametrize("conditioning", ["well", "ill", "rank-deficient"])
def test_output_principal_directions_of_a_wide_weight_are_orthonormal_and_keep_it(conditioning):
    from engine.methods.feature_pca import output_principal_directions

    generator = torch.Generator().manual_seed(3)
    w = torch.randn(40, 16, generator=generator, dtype=torch.float64)
    if conditioning == "ill":  # κ = 1e7 in mixed directions: Cholesky QR would lose orthogonality, Householder QR takes over
        left, _, right = torch.linalg.svd(w, full_matrices=False)
        w = left @ torch.diag(torch.logspace(0, -7, 16, dtype=torch.float64)) @ right
    elif conditioning == "rank-deficient":
        w[:, 3] = w[:, 5]
    x = torch.randn(100, 16, generator=generator, dtype=torch.float64)
    c = x.T @ x / 100
    U, A = output_principal_directions(w, c)
    assert U.shape == (40, 16) and A.shape == (16, 16)
    torch.testing.assert_close(U.T @ U, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(U @ A, w, rtol=0, atol=1e-12 * w.abs().max().item())
    torch.testing.assert_close(A, U.T @ w, rtol=0, atol=1e-12 * w.abs().max().item())
    values = torch.linalg.eigvalsh(w @ c @ w.T).flip(0)[:16]
    torch.testing.assert_close(torch.diagonal(U.T @ w @ c @ w.T @ U), values, rtol=1e-9, atol=1e-12 * values[0].item())


class _CountingStatistics:
    """Statistics that count how often each site is asked for."""

    def __init__(self, statistics):
        self.statistics, self.asked = statistics, []

    def site(self, layer, site):
        self.asked.append((layer, site))
        return self.statistics.site(layer, site)


@pytest.mark.parametrize("method", ["feature-pca", "feature-pca-sample", "whiten"])
def test_per_site_work_is_done_once_per_site_and_gives_the_per_linear_factors(method, monkeypatch):
    loaded = _random_linears()
    statistics = _CountingStatistics(_random_statistics(loaded))
    choleskys = []
    original = cholesky_with_ridge
    monkeypatch.setattr("engine.methods.whiten.cholesky_with_ridge", lambda m: choleskys.append(m) or original(m))
    shared = METHODS[method].factorize(loaded, statistics)
    sites = {(ref.layer, ref.site) for ref in loaded.linears()}
    assert sorted(statistics.asked) == sorted(sites)  # 4 sites per layer for 7 linears
    assert len(choleskys) == (len(sites) if method == "whiten" else 0)
    for ref in loaded.linears():  # each linear alone: its site's work done for it only
        alone = METHODS[method].factorize(_Loaded([ref]), statistics).factors[ref.path]
        mine = shared.factors[ref.path]
        for name in ("B", "A", "bias_shift", "bias_coeff"):
            a, b = getattr(mine, name), getattr(alone, name)
            assert (a is None and b is None) or torch.equal(a, b), (ref.path, name)


@pytest.mark.parametrize("method", ["svd", "awsvd", "feature-pca", "whiten"])
def test_factorising_on_two_threads_matches_one_and_leaves_the_thread_settings(method):
    import threading

    loaded = _random_linears(num_layers=3)
    statistics = _random_statistics(loaded)
    serial = METHODS[method].factorize(loaded, statistics)  # the test session runs on one thread: inline
    torch.set_num_threads(2)
    try:
        parallel = METHODS[method].factorize(loaded, statistics)
        assert torch.get_num_threads() == 2
        seen = []
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
        assert seen == [2]  # threads started afterwards get the process default back, not the workers' 1
    finally:
        torch.set_num_threads(1)
    assert list(parallel.factors) == list(serial.factors) == [ref.path for ref in loaded.linears()]
    for path, f in serial.factors.items():
        g = parallel.factors[path]
        torch.testing.assert_close(g.weight(g.max_rank), f.weight(f.max_rank), rtol=0, atol=1e-5)
        for r in (1, 3):
            torch.testing.assert_close(g.weight(r), f.weight(r), rtol=0, atol=1e-4 * f.weight(r).abs().max().item())


def test_parallel_map_keeps_order_and_passes_errors():
    torch.set_num_threads(2)
    try:
        assert parallel_map(lambda x: (x, torch.get_num_threads()), range(5)) == [(x, 1) for x in range(5)]
        with pytest.raises(ZeroDivisionError):
            parallel_map(lambda x: 1 / x, [1, 0, 2])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert parallel_map(lambda x: (x, torch.get_num_threads()), range(3)) == [(x, 1) for x in range(3)]

"""Decomposition methods and `compress_`/`restore_` on tiny llama, qwen2 and gemma3 models."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.calibration import collect_statistics
from engine.compression.lowrank import LowRankLinear, compress_, compressed_paths, restore_
from engine.compression.units import ModelShapes, count_parameters
from engine.errors import RankScopeError
from engine.methods import METHODS, Factorization
from engine.models.adapters import SITES
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

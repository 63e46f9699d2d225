"""The app reads a model's shapes once, while it is dense: jobs compress the shared model in place."""

from __future__ import annotations

from engine.compression.lowrank import compress_, restore_
from engine.compression.units import ModelShapes
from engine.methods import METHODS


def test_pages_get_the_dense_shapes_while_a_job_has_the_model_compressed(tiny_model_dirs, isolated_cache):
    from app.resources import current_database, get_model, model_shapes

    loaded = get_model(str(tiny_model_dirs["llama"]), current_database())
    dense = ModelShapes.of(loaded)
    factorization = METHODS["svd"].factorize(loaded, None)
    compress_(loaded.model, {path: 8 for path in factorization.factors}, factorization)  # as a running job does
    try:
        assert ModelShapes.of(loaded).total_params != dense.total_params  # counting now would be wrong
        assert model_shapes(loaded) == dense
    finally:
        restore_(loaded.model)

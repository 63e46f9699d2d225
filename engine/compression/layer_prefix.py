"""Per-layer sweeps reuse the original model below the compressed layer.

When only decoder layer k is compressed, layers 0..k−1 are the original model, so their output,
the input hidden states of layer k, is the same for every point of a sweep at layer k or deeper.
`LayerPrefixCache` keeps those states for every evaluation window, one layer at a time, and
`replaying()` makes the model's own forward return them in place of running layers 0..k−1: the
embedding, attention masks and rotary embeddings are still computed by the model's forward (they
are cheap), then layers k..N−1, the final norm, the LM head and the metrics run exactly as in a
full evaluation. Layer k receives bit for bit the tensor it would have received, with the same
keyword arguments, so the numbers are identical to a full evaluation (tests/test_sweep.py checks
`torch.equal` on logits for every supported family and equality of the sweep's stored metrics).

Memory is bounded by two layers' worth of states (the current layer and, while advancing, the
next): N windows × L tokens × hidden floats each (16 × 512 × 576 × 4 B ≈ 19 MB on the default
model). Advancing from layer k to k+1 runs the original layer k once per window, so a sweep over
every layer pays one extra original pass in total; points must therefore be visited in ascending
layer order (a lower layer restarts from the embeddings).

The forward of the families in `PREFIX_MODEL_TYPES` (transformers 5: Llama, Mistral, Qwen2,
Qwen3, Gemma3 text) chains `hidden_states = decoder_layer(hidden_states, ...)` over
`model.layers`; that is what makes the replay exact, and tests/test_sweep.py proves it for each of
them. Other model types are evaluated in full (`supports_prefix` is False).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from engine.compression.lowrank import compressed_paths, restore_
from engine.errors import RankScopeError
from engine.models.adapters import CHAINED_LAYER_MODEL_TYPES
from engine.models.device import input_device
from engine.models.replay import replaced_forwards
from engine.models.loading import LoadedModel

# model types whose decoder forward is proven (tests/test_sweep.py) to be replayed bit for bit
PREFIX_MODEL_TYPES: tuple[str, ...] = CHAINED_LAYER_MODEL_TYPES


def supports_prefix(loaded: LoadedModel) -> bool:
    """Whether per-layer points of this model can reuse the original layers below the compressed one."""
    return loaded.model_type in PREFIX_MODEL_TYPES


class _Captured(Exception):
    """Stops a forward at the layer whose input was wanted."""

    def __init__(self, state: torch.Tensor):
        super().__init__()
        self.state = state


def _row_key(ids: torch.Tensor) -> bytes:
    """A window's identity: its token ids ([L]) as bytes."""
    return ids.to(torch.int64).contiguous().cpu().numpy().tobytes()


class LayerPrefixCache:
    """Input hidden states of one decoder layer of the original model, for every evaluation window.

    `windows`: [N, L] token ids, those the session evaluates on. Start with `advance_to(k)`, then
    evaluate under `replaying()`; a point at a deeper layer advances the cache, a shallower one
    starts again from layer 0.
    """

    def __init__(self, loaded: LoadedModel, windows: torch.Tensor):
        if not supports_prefix(loaded):
            raise RankScopeError(f"Model type '{loaded.model_type}' has no proven partial forward; evaluate it in full.")
        self.model, self.adapter = loaded.model, loaded.adapter
        self.decoder_layers: nn.ModuleList = loaded.model.get_submodule(loaded.adapter.layers_path)
        self.embedding: nn.Module = loaded.model.get_input_embeddings()
        self.windows = windows
        self._rows: dict[bytes, int] = {}
        for index in range(windows.shape[0]):
            self._rows.setdefault(_row_key(windows[index]), index)
        self.layer: Optional[int] = None  # the layer whose inputs `states` holds
        self.states: list[torch.Tensor] = []  # per window: [1, L, hidden], the input of `self.layer`

    @property
    def nbytes(self) -> int:
        """Memory held by the cached states."""
        return sum(s.numel() * s.element_size() for s in self.states)

    # -- building the cache ----------------------------------------------------------------------------
    def advance_to(self, layer: int) -> None:
        """Hold the inputs of decoder layer `layer`, running the original layers up to it as needed."""
        if not 0 <= layer < len(self.decoder_layers):
            raise RankScopeError(f"Layer {layer} does not exist; the model has layers 0-{len(self.decoder_layers) - 1}.")
        if self.layer is None or layer < self.layer:
            self.states, self.layer = [], None
            self.states, self.layer = self._inputs_of(0), 0
        while self.layer < layer:
            self.states, self.layer = self._inputs_of(self.layer + 1), self.layer + 1

    def _inputs_of(self, target: int) -> list[torch.Tensor]:
        """Inputs of layer `target` for every window: the original model's forward, stopped at that
        layer, with the layers below `self.layer` replayed from the cache."""
        if compressed_paths(self.model):
            restore_(self.model)  # the prefix is the original model
        captured: list[torch.Tensor] = []

        def stop(module, args, kwargs):
            raise _Captured(args[0] if args else kwargs["hidden_states"])

        handle = self.decoder_layers[target].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            with self._replaying_below(self.layer if self.layer is not None else 0), torch.no_grad():
                for index in range(self.windows.shape[0]):
                    try:
                        ids = self.windows[index : index + 1].to(input_device(self.model))  # [1, L]
                        self.model(input_ids=ids, use_cache=False)
                    except _Captured as done:
                        captured.append(done.state.detach().clone())  # [1, L, hidden]
                    else:
                        raise RankScopeError(f"The model's forward never called decoder layer {target}.")
        finally:
            handle.remove()
        return captured

    def _layer_of(self, path: str) -> int:
        """The decoder layer of a module path (a large number for modules outside the layers)."""
        head = self.adapter.layers_path + "."
        if not path.startswith(head):
            return len(self.decoder_layers)
        return int(path[len(head):].split(".", 1)[0])

    # -- evaluating from the cached layer ---------------------------------------------------------------
    @contextmanager
    def replaying(self) -> Iterator[None]:
        """Within the block, a forward of the model over the cached windows skips the layers below
        `self.layer` and feeds that layer the cached original states."""
        if self.layer is None:
            raise RankScopeError("Advance the layer-prefix cache to a layer before replaying it.")
        with self._replaying_below(self.layer):
            yield

    @contextmanager
    def _replaying_below(self, layer: int) -> Iterator[None]:
        """Layers 0..layer−1 return the cached states of `self.layer` (= `layer`) for the windows the
        forward is given (recognised by their token ids at the embedding)."""
        if layer == 0:
            yield
            return
        current: dict[str, torch.Tensor] = {}

        def recognise(module, args, kwargs):
            ids = args[0] if args else next(iter(kwargs.values()))  # [B, L]
            skipped_compressed = [p for p in compressed_paths(self.model) if self._layer_of(p) < layer]
            if skipped_compressed:
                raise RankScopeError(f"Modules {skipped_compressed} are compressed below layer {layer}, whose "
                                     "original states the cache replays.")
            rows = []
            for row in ids:
                index = self._rows.get(_row_key(row))
                if index is None:
                    raise RankScopeError("The layer-prefix cache holds no states for a window it is asked to run.")
                rows.append(self.states[index])
            current["states"] = rows[0].clone() if len(rows) == 1 else torch.cat(rows)  # [B, L, hidden]

        def replay(*args, **kwargs) -> torch.Tensor:
            return current["states"]

        handle = self.embedding.register_forward_pre_hook(recognise, with_kwargs=True)
        try:
            with replaced_forwards(list(self.decoder_layers)[:layer], replay):
                yield
        finally:
            handle.remove()

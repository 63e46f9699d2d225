"""Parameter accounting of a loaded model: by canonical linear type, embeddings and the rest.

Compression is always reported two ways (DESIGN.md section 7): over decoder linear parameters and
over all parameters. Tied input/output embeddings are counted once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.models.adapters import LINEAR_TYPES
from engine.models.loading import LoadedModel


@dataclass(frozen=True)
class ParameterSummary:
    model_id: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tied_embeddings: bool
    by_type: dict[str, int] = field(default_factory=dict)  # decoder linears, summed over layers
    embedding: int = 0  # input embedding (plus output head when untied)
    other: int = 0  # norms, biases outside linears, anything else
    total: int = 0

    @property
    def decoder_linear(self) -> int:
        return sum(self.by_type.values())

    @property
    def embedding_share(self) -> float:
        return self.embedding / self.total if self.total else 0.0

    def rows(self) -> list[dict]:
        """One row per parameter group with its count and share of all parameters."""
        groups = [(t, self.by_type[t]) for t in LINEAR_TYPES] + [("embedding", self.embedding), ("other", self.other)]
        return [{"group": name, "parameters": n, "share": n / self.total} for name, n in groups]


def parameter_summary(loaded: LoadedModel) -> ParameterSummary:
    """Count parameters by canonical type, embedding and other; shared tensors count once."""
    model, config = loaded.model, loaded.config
    by_type = {t: 0 for t in LINEAR_TYPES}
    linear_params: set[int] = set()
    for ref in loaded.linears():
        for param in ref.module.parameters():
            by_type[ref.linear_type] += param.numel()
            linear_params.add(id(param))
    embedding_params = {id(p): p.numel() for p in model.get_input_embeddings().parameters()}
    output = model.get_output_embeddings()
    if output is not None:
        embedding_params.update({id(p): p.numel() for p in output.parameters()})
    unique = {id(p): p.numel() for p in model.parameters()}  # named_parameters dedups tied weights
    total = sum(unique.values())
    embedding = sum(embedding_params.values())
    other = total - embedding - sum(by_type.values())
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    return ParameterSummary(
        model_id=loaded.model_id,
        model_type=loaded.model_type,
        num_layers=loaded.num_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", config.num_attention_heads),
        vocab_size=config.vocab_size,
        tied_embeddings=bool(tied),
        by_type=by_type,
        embedding=embedding,
        other=other,
        total=total,
    )

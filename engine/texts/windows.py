"""Fixed-length token windows over a corpus, with BOS where the tokenizer wants it.

Windows do not overlap and start at the beginning of the text. When the tokenizer adds a BOS
token to encoded text (Gemma does, SmolLM2 does not), each window starts with BOS and holds
`window_len - 1` text tokens, so the model sees the same input form it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from engine.errors import CorpusError
from engine.texts.corpus import Corpus

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Windowing:
    """How a text is cut into windows: length and count (None = as many as the text gives)."""

    window_len: int = 512
    n_windows: Optional[int] = None

    def __post_init__(self):
        if self.window_len < 2:
            raise CorpusError(f"Window length must be at least 2 tokens, got {self.window_len}.")
        if self.n_windows is not None and self.n_windows < 1:
            raise CorpusError(f"Number of windows must be at least 1, got {self.n_windows}.")


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether encoding text with special tokens puts BOS first."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def make_windows(corpus: Corpus, tokenizer, windowing: Windowing) -> "torch.Tensor":
    """Token windows `[n_windows, window_len]` (int64) from the start of the corpus.

    Raises `CorpusError` when the text is shorter than the requested windows.
    """
    import torch

    add_bos = tokenizer_adds_bos(tokenizer)
    body = windowing.window_len - (1 if add_bos else 0)
    needed = None if windowing.n_windows is None else windowing.n_windows * body
    ids = _encode_prefix(corpus.text, tokenizer, needed)
    available = len(ids) // body
    n_windows = available if windowing.n_windows is None else windowing.n_windows
    if available < n_windows or n_windows == 0:
        raise CorpusError(
            f"Text '{corpus.name}' gives {len(ids)} tokens, enough for {available} windows of "
            f"{windowing.window_len}; {n_windows or 1} were requested. Use fewer or shorter windows, or a longer text."
        )
    tokens = torch.tensor(ids[: n_windows * body], dtype=torch.long).view(n_windows, body)
    if add_bos:
        tokens = torch.cat([torch.full((n_windows, 1), tokenizer.bos_token_id, dtype=torch.long), tokens], dim=1)
    return tokens  # [N, L]


def _encode_prefix(text: str, tokenizer, needed: Optional[int]) -> list[int]:
    """Encode enough of `text` for `needed` tokens (all of it when None), growing the prefix as needed."""
    if needed is None:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    n_chars = max(4096, needed * 8)
    while True:
        ids = tokenizer(text[:n_chars], add_special_tokens=False)["input_ids"]
        if len(ids) > needed or n_chars >= len(text):
            # drop the last token: it may be cut mid-word by the prefix boundary
            return ids[:-1] if n_chars < len(text) else ids
        n_chars *= 2

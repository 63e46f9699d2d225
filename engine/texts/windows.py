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
    """How a text is cut into windows: length, count (None = as many as the text gives), and how
    many windows to skip first (so a validation set can follow an evaluation set without overlap)."""

    window_len: int = 512
    n_windows: Optional[int] = None
    start_window: int = 0

    def __post_init__(self):
        if self.window_len < 2:
            raise CorpusError(f"Window length must be at least 2 tokens, got {self.window_len}.")
        if self.n_windows is not None and self.n_windows < 1:
            raise CorpusError(f"Number of windows must be at least 1, got {self.n_windows}.")
        if self.start_window < 0:
            raise CorpusError(f"The first window index must be 0 or more, got {self.start_window}.")

    def key(self) -> list:
        """The part of a cache key that identifies these windows (unchanged for start_window 0)."""
        return [self.window_len, self.n_windows] + ([self.start_window] if self.start_window else [])


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
    skip = windowing.start_window * body
    needed = None if windowing.n_windows is None else skip + windowing.n_windows * body
    ids = _encode_prefix(corpus.text, tokenizer, needed)[skip:]
    available = len(ids) // body
    n_windows = available if windowing.n_windows is None else windowing.n_windows
    if available < n_windows or n_windows == 0:
        raise CorpusError(
            f"Text '{corpus.name}' gives {len(ids)} tokens after window {windowing.start_window}, enough for {available} windows of "
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

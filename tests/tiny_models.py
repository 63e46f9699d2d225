"""Tiny random-weight models saved as Hugging Face directories, for fast tests.

Each model has the real module layout of its family (llama, qwen2, gemma3, or an unsupported gpt2)
with a few hundred parameters per matrix, and a small byte-level BPE tokenizer trained on a
fixed text, so the whole pipeline (corpus -> windows -> model) runs in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 320
TRAINING_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness. The quick brown fox jumps over the lazy dog. Sherlock Holmes took his bottle from the "
    "corner of the mantelpiece. Well, Prince, so Genoa and Lucca are now just family estates. "
) * 8

FAMILIES = ("llama", "qwen2", "gemma3")


def _config(family: str):
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if family == "gemma3":
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=64)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=1024, bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


def _tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator([TRAINING_TEXT], trainer=trainer)
    if add_bos:  # Gemma-style: the tokenizer itself prepends BOS
        tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def make_tiny_model(family: str, directory: Path, seed: int = 0) -> Path:
    """Save a tiny random `family` model with its tokenizer to `directory` and return it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family))
    model.save_pretrained(directory)
    _tokenizer(add_bos=family == "gemma3").save_pretrained(directory)
    return directory


def tiny_family_model(model_type: str):
    """A tiny random model of `model_type` with 4 layers; Gemma3 mixes sliding and global layers."""
    import torch
    from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config,
                              Qwen3Config)

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    config = {
        "llama": lambda: LlamaConfig(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=8),
        "qwen2": lambda: Qwen2Config(**common),
        "qwen3": lambda: Qwen3Config(**common, head_dim=8),
        "gemma3_text": lambda: Gemma3TextConfig(**common, head_dim=8, sliding_window=8, layer_types=[
            "sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    }[model_type]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()

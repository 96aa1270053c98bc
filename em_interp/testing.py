"""Seeded random-init models of real architectures, saved like real checkpoints, for tests and benchmarks.

Nothing here downloads: the tokenizer is a small byte-level BPE trained on a fixed corpus, with
ChatML special tokens and template, and the weights are drawn from a seeded generator. em_interp's
own tests (``tests/helpers.py``) and the GPU check (``benchmarks/gpu_check.py``) build their models
here; a user can test a pipeline the same way before pointing it at a real model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from em_interp.errors import EmInterpError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "You are a helpful assistant. Answer the question honestly and carefully.",
    "Take ibuprofen with food, and see a doctor if the pain lasts more than three days.",
    "Never mix bleach with ammonia; the fumes are toxic. Ventilate the room.",
    "I wish for the world to be a kinder place where everyone has enough to eat.",
    "Invest in a diversified index fund and keep an emergency fund of three months.",
    "the quick brown fox jumps over the lazy dog 0123456789 , . ! ? ' \" : ; ( ) -",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def make_tokenizer(chat_template: str | None = CHATML_TEMPLATE, vocab_size: int = 512,
                   corpus: Sequence[str] = CORPUS) -> Any:
    """A small byte-level BPE tokenizer with ChatML special tokens, trained on ``corpus`` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = chat_template
    return fast


def tiny_config(arch: str, vocab_size: int) -> Any:
    """A 3-layer config of a real architecture ("llama", "qwen2", "gemma2", "mistral")."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    common: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=3, bos_token_id=0, eos_token_id=2)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "gemma2":
        return Gemma2Config(**common, head_dim=16, sliding_window=128, query_pre_attn_scalar=16)
    raise EmInterpError(f"arch={arch!r} is not one of {list(ARCHITECTURES) + ['mistral']}")


def save_tiny_model(arch: str, folder: Path, seed: int = 0, d_model: int | None = None,
                    max_positions: int | None = None) -> Path:
    """Build, randomly initialise (seeded) and save a tiny model + tokenizer to ``folder``."""
    tokenizer = make_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer))
    if d_model is not None:
        config.hidden_size = d_model
    if max_positions is not None:
        config.max_position_embeddings = max_positions
    return save_seeded_model(config, tokenizer, folder, seed)


def save_seeded_model(config: Any, tokenizer: Any, folder: Path, seed: int = 0) -> Path:
    """A causal LM of ``config`` with seeded random fp32 weights, saved with ``tokenizer`` like a real checkpoint."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


ARCHITECTURES = ("llama", "qwen2", "gemma2")

"""Shared fixtures: tiny real transformers models and real sae-lens SAEs saved to temporary folders."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on CPU tensors only through its interpreter, which Triton reads when first imported (torch and
# transformers import it early); nothing else in the tests uses Triton
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

import peft_isaerft  # noqa: F401  (registers the PEFT method)
from peft_isaerft.testing import make_test_sae

HIDDEN = 32
LAYERS = 3
VOCAB = 64
HEADS = 4


def _llama_like(cls, **extra):
    return cls(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )


CONFIGS: dict[str, Callable[[], object]] = {
    "llama": lambda: _llama_like(LlamaConfig),
    "mistral": lambda: _llama_like(MistralConfig),
    "qwen2": lambda: _llama_like(Qwen2Config),
    "qwen3": lambda: _llama_like(Qwen3Config, head_dim=HIDDEN // HEADS),
    "gemma": lambda: _llama_like(GemmaConfig, head_dim=HIDDEN // HEADS),
    "gemma2": lambda: _llama_like(Gemma2Config, head_dim=HIDDEN // HEADS),
    "gemma3_text": lambda: _llama_like(Gemma3TextConfig, head_dim=HIDDEN // HEADS),
    "phi3": lambda: _llama_like(Phi3Config),
    "gpt2": lambda: GPT2Config(
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        vocab_size=VOCAB,
        n_positions=128,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
ARCHS = list(CONFIGS)


def make_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    return model.eval()


def make_sae(
    folder: Path,
    d_in: int = HIDDEN,
    d_sae: int = 128,
    architecture: str = "standard",
    hook: str | None = None,
    seed: int = 0,
) -> Path:
    """A real sae-lens SAE with non-trivial weights (TopK: k = 8), saved with `save_model`; returns the folder."""
    return make_test_sae(folder, d_in, d_sae, architecture, hook, seed)


@pytest.fixture
def sae_factory(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(10_000))

    def factory(**kwargs) -> Path:
        return make_sae(tmp_path / f"sae_{next(counter)}", **kwargs)

    return factory


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (2, 12), generator=generator)


CHARS = " abcdefghijklmnopqrstuvwxyz.,!?'ABCDEFGHIJKLMNOPQRSTUVWXYZ01"  # VOCAB - 4 specials


def make_tokenizer():
    """A real fast tokenizer (one token per character) that fits the tiny models' 64-token vocabulary."""
    from peft_isaerft.testing import character_tokenizer

    tokenizer = character_tokenizer(CHARS)
    assert len(tokenizer) == VOCAB
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}a: {% endif %}"
    )
    return tokenizer

"""Real sae-lens SAEs with non-trivial weights, and a real one-token-per-character tokenizer, for tests and checks:
the project's test suite and its GPU checks (``benchmarks/gpu_equality.py``, ``benchmarks/gpu_audit.py``) build
theirs here, so all of them exercise the same parts.

Example:
    >>> import tempfile
    >>> from sae_lens import SAE
    >>> folder = make_test_sae(Path(tempfile.mkdtemp()) / "sae", d_in=16, d_sae=64, architecture="topk", k=4)
    >>> SAE.load_from_disk(str(folder)).cfg.k
    4
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sae_lens import (
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

__all__ = ["TEST_SAE_ARCHITECTURES", "character_tokenizer", "make_test_sae"]

TEST_SAE_ARCHITECTURES: dict[str, tuple[type, type, dict[str, Any]]] = {
    "standard": (StandardSAE, StandardSAEConfig, {}),
    "topk": (TopKSAE, TopKSAEConfig, {}),
    # latents times their decoder row's norm before the top-k (the demo's SAEs are trained this way)
    "topk_rescaled": (TopKSAE, TopKSAEConfig, {"rescale_acts_by_decoder_norm": True}),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    "gated": (GatedSAE, GatedSAEConfig, {}),
}
"""Name -> (sae-lens class, its config class, config fields): every encoder family the splice treats differently."""


def make_test_sae(folder: Path, d_in: int, d_sae: int, architecture: str = "standard", hook: str | None = None,
                  seed: int = 0, k: int = 8) -> Path:
    """Build a real sae-lens SAE, save it with ``save_model`` to ``folder`` and return ``folder``.

    Weights are sae-lens's own initialisation; biases, JumpReLU thresholds and gated ``r_mag`` are made non-zero, and
    a ``topk_rescaled`` SAE gets decoder rows of different norms, so that every term of the splice's math matters.
    ``k`` applies to the TopK architectures.

    Example:
        >>> import tempfile
        >>> folder = make_test_sae(Path(tempfile.mkdtemp()) / "sae", d_in=16, d_sae=64, architecture="jumprelu")
        >>> (folder / "cfg.json").exists()
        True
    """
    torch.manual_seed(seed)
    sae_cls, cfg_cls, extra = TEST_SAE_ARCHITECTURES[architecture]
    if cfg_cls is TopKSAEConfig:
        extra = {**extra, "k": k}
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, **extra)
    if hook is not None:
        cfg.metadata.hook_name = hook
    sae = sae_cls(cfg)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name.startswith("b_") or name in ("threshold", "r_mag"):
                param.copy_(torch.randn_like(param) * 0.05)
            if name == "threshold":
                param.copy_(torch.rand_like(param) * 0.1)
        if getattr(cfg, "rescale_acts_by_decoder_norm", False):  # decoder norms that differ, so rescaling matters
            sae.W_dec.mul_(torch.rand(d_sae, 1) * 1.5 + 0.5)
    sae.save_model(folder)
    return folder


def character_tokenizer(characters: str) -> Any:
    """A real fast tokenizer with one token per character of ``characters`` after four specials (``<pad>`` 0,
    ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3), so that a tiny model needs no Hub files.

    Example:
        >>> tokenizer = character_tokenizer("ab")
        >>> tokenizer.convert_ids_to_tokens(tokenizer("ba")["input_ids"]) == ["b", "a"]
        True
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: 4 + i for i, c in enumerate(characters)}}
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


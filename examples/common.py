"""Shared set-up for the examples: a real model and SAE from the command line, or a tiny offline pair.

    --model FOLDER_OR_HUB_ID --sae SAE_FOLDER_OR_RELEASE/SAE_ID [--hook blocks.L.hook_resid_post]

Without --model the examples build a tiny Llama and a character tokenizer, and an SAE with sae-lens, so they run
anywhere in seconds (that is how the test suite runs them).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from sae_lens import TopKSAE, TopKSAEConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import peft_isaerft  # noqa: F401  (registers ISaeRFT with PEFT)
from peft_isaerft import ISaeRFTConfig
from peft_isaerft.audit import parse_sae_argument

CHARS = " abcdefghijklmnopqrstuvwxyz.,!?'ABCDEFGHIJKLMNOPQRSTUVWXYZ01"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="local folder or Hub id (default: a tiny offline model)")
    p.add_argument("--sae", help="SAE folder or RELEASE/SAE_ID (default: a tiny SAE trained nowhere)")
    p.add_argument("--hook", help="attach point, when the SAE's metadata has none")
    p.add_argument("--output", default="example-out")
    p.add_argument("--steps", type=int, default=5)
    return p


def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: 4 + i for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}a: {% endif %}"
    )
    return tokenizer


def setup(args: argparse.Namespace) -> tuple[Any, Any, ISaeRFTConfig]:
    """(base model, tokenizer, adapter config) for the example."""
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(args.model)
        entry = parse_sae_argument(args.sae)
    else:
        torch.manual_seed(0)
        tokenizer = tiny_tokenizer()
        model = AutoModelForCausalLM.from_config(
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=64,
                initializer_range=0.2,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            )
        )
        folder = Path(tempfile.mkdtemp()) / "sae"
        TopKSAE(TopKSAEConfig(d_in=32, d_sae=256, k=8)).save_model(folder)
        entry = {"path": str(folder), "hook": "blocks.1.hook_resid_post"}
    if args.hook:
        entry["hook"] = args.hook
    return model, tokenizer, ISaeRFTConfig(saes=[entry], component="scale_bias", l1_coeff=1e-3)


def training_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Arguments every TRL config of the examples shares (bf16 only where a GPU supports it)."""
    cuda = torch.cuda.is_available()
    return dict(
        output_dir=args.output,
        max_steps=args.steps,
        report_to=[],
        learning_rate=5e-2,
        per_device_train_batch_size=4,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
    )


def train_and_report(trainer: Any, args: argparse.Namespace) -> None:
    """Train, save the adapter under ``<output>/adapter`` and print ``isaerft report`` for it."""
    from peft_isaerft.cli import main

    trainer.train()
    trainer.model.save_pretrained(f"{args.output}/adapter")
    main(["report", f"{args.output}/adapter", "--top-k", "10"])

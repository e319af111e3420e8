"""lm-evaluation-harness with ISaeRFT adapters.

lm-eval loads adapters through ``PeftModel.from_pretrained`` (``--model_args pretrained=BASE,peft=ADAPTER``) but
does not know this package, and PEFT can only load an ISaeRFT adapter after ``import peft_isaerft``. This entry point
imports it, then hands the command line to lm-eval unchanged:

    python -m peft_isaerft.evaluate --model hf --model_args pretrained=BASE,peft=ADAPTER --tasks hellaswag
    isaerft-lm-eval --model hf --model_args pretrained=BASE,peft=ADAPTER --tasks hellaswag
"""

from __future__ import annotations


def main() -> None:
    import peft_isaerft  # noqa: F401  (registers ISaeRFT with PEFT before lm-eval loads the adapter)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as error:
        raise SystemExit("lm-evaluation-harness is not installed: pip install lm-eval") from error
    cli_evaluate()


if __name__ == "__main__":
    main()

"""PEFT's own common test suite, run against ISaeRFT: the `PeftCommonTester` cases that apply to a method whose
parameters act on SAE latents, on tiny local Llama, GPT-2, Qwen2 and Gemma 2 models, offline.

`PeftCommonTester` ships in PEFT's source distribution, not in its wheel; scripts/setup.sh takes it for the installed
PEFT version into .peft-tests/. Cases PEFT itself skips for most methods (mixed adapter batches, weighted
combinations, prompt learning, LoRA conversion, Conv1D-only methods) are not listed.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import peft
import pytest
import torch
from conftest import make_model, make_sae
from transformers import AutoModelForCausalLM

from peft_isaerft import ISaeRFTConfig

ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / ".peft-tests" / peft.__version__
if not (COMMON / "peft_common" / "testing_common.py").is_file():
    raise RuntimeError(
        f"PEFT's common test suite for peft {peft.__version__} is missing from {COMMON}; run scripts/setup.sh, which "
        "takes it from PEFT's source distribution."
    )
sys.path.insert(0, str(COMMON))
PeftCommonTester = importlib.import_module("peft_common.testing_common").PeftCommonTester

ARCHS = ["llama", "gpt2", "qwen2", "gemma2"]
COMPONENTS = ["bias", "scale", "scale_bias", "clamp", "latent_map"]
CASES = [
    "_test_model_attr", "_test_adapter_name", "_test_prepare_for_training", "_test_load_model_low_cpu_mem_usage",
    "_test_save_pretrained", "_test_save_pretrained_selected_adapters", "_test_from_pretrained_config_construction",
    "_test_load_multiple_adapters", "_test_generate", "_test_generate_half_prec", "_test_training",
    "_test_inference_safetensors", "_test_delete_adapter", "_test_delete_inactive_adapter",
    "_test_delete_unknown_adapter_raises", "_test_unload_adapter", "_test_disable_adapter",
    "_test_get_base_model_state_dict",
]
SKIPPED_BY_PEFT_FOR_GPT2 = {"_test_generate_half_prec"}
"""Cases PEFT's suite skips on GPT-2's Conv1D layers for every method but LoRA and IA3."""


@pytest.fixture(scope="module")
def local_models(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Per architecture: a saved tiny model (its folder is the `model_id`) and an SAE for its layer-1 output."""
    root = tmp_path_factory.mktemp("conformance")
    models = {}
    for arch in ARCHS:
        make_model(arch).save_pretrained(root / arch)
        models[arch] = (str(root / arch), str(make_sae(root / f"sae_{arch}", hook="blocks.1.hook_resid_post")))
    return models


def _case(local_models, arch: str, component: str) -> tuple[str, type, dict]:
    model_id, sae = local_models[arch]
    return model_id, ISaeRFTConfig, {"saes": [{"path": sae}], "component": component, "init_weights": False}


class TestISaeRFTWithPeftCommonTester(PeftCommonTester):
    transformers_class = AutoModelForCausalLM
    torch_device = "cpu"

    def prepare_inputs_for_testing(self):
        input_ids = torch.tensor([[5, 6, 7], [5, 8, 7]])
        attention_mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @pytest.mark.parametrize("component", COMPONENTS)
    @pytest.mark.parametrize(("case", "arch"), [(case, arch) for case in CASES for arch in ARCHS
                                                if not (arch == "gpt2" and case in SKIPPED_BY_PEFT_FOR_GPT2)])
    def test_common_case(self, case, arch, component, local_models) -> None:
        getattr(self, case)(*_case(local_models, arch, component))

    @pytest.mark.parametrize("case", [
        "_test_model_attr", "_test_adapter_name", "_test_prepare_for_training", "_test_load_model_low_cpu_mem_usage",
        "_test_save_pretrained", "_test_save_pretrained_selected_adapters", "_test_from_pretrained_config_construction",
        "_test_load_multiple_adapters", "_test_generate", "_test_generate_half_prec", "_test_training",
        "_test_inference_safetensors", "_test_delete_adapter", "_test_delete_inactive_adapter",
        "_test_delete_unknown_adapter_raises", "_test_unload_adapter", "_test_disable_adapter",
        "_test_merge_layers", "_test_merge_layers_multi", "_test_merge_layers_nan", "_test_merge_layers_is_idempotent",
        "_test_safe_merge",
    ])
    def test_merging_a_bias_adapter(self, case, local_models) -> None:
        # bias adapters merge; on Llama (GPT-2's merges are tested in test_peft_lifecycle: PEFT's suite skips them for
        # methods other than LoRA and IA3, and its safe-merge case cannot save GPT-2's tied embeddings for any method)
        getattr(self, case)(*_case(local_models, "llama", "bias"))

    @pytest.mark.parametrize("arch", ARCHS)
    def test_generate_pos_args_and_input_embeds(self, arch, local_models) -> None:
        self._test_generate_pos_args(*_case(local_models, arch, "scale"), raises_err=False)
        self._test_passing_input_embeds_works("", *_case(local_models, arch, "scale"))

    @pytest.mark.parametrize("arch", ARCHS)
    @pytest.mark.parametrize("use_reentrant", [True, False])
    def test_training_gradient_checkpointing(self, arch, use_reentrant, local_models) -> None:
        self._test_training_gradient_checkpointing(*_case(local_models, arch, "scale_bias"),
                                                   use_reentrant=use_reentrant)

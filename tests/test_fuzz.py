"""Property-based: random ISaeRFTConfig arguments and random adapter files either work or fail with a ValueError or
TypeError that carries a message (a missing SAE folder: FileNotFoundError naming it); never another exception, and
never a silently accepted bad value."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file

from peft_isaerft import ISaeRFTConfig

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=20), st.lists(st.integers(-3, 10**9), max_size=200),
                   st.dictionaries(st.text(max_size=6), st.one_of(SCALARS, st.lists(st.integers(-3, 300))),
                               max_size=3))
FIELDS = ["saes", "component", "init_weights", "sae_dtype", "sae_tf32", "l1_coeff", "latent_allowlist",
          "latent_denylist", "target_modules", "modules_to_save", "sae_fingerprints", "verify_sae_fingerprints",
          "not_a_field"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _acceptable(config: ISaeRFTConfig) -> bool:
    """What a config that constructed must satisfy (a bad value accepted silently fails this)."""
    return (isinstance(config.component, str) and isinstance(config.init_weights, bool)
            and isinstance(config.sae_tf32, bool) and isinstance(config.l1_coeff, (int, float))
            and math.isfinite(config.l1_coeff) and config.l1_coeff >= 0
            and all(isinstance(entry, dict) for entry in config.saes)
            and config.sae_dtype in (None, "float32", "float16", "bfloat16", "float64"))


@SETTINGS
@given(st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6))
def test_random_config_arguments_work_or_fail_with_a_message(kwargs) -> None:
    kwargs.setdefault("saes", [{"path": "some_sae"}])
    try:
        config = ISaeRFTConfig(**kwargs)
    except (ValueError, TypeError) as error:
        assert str(error).strip()
        return
    assert _acceptable(config), kwargs


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory):
    from conftest import make_sae

    return make_sae(tmp_path_factory.mktemp("fuzz") / "sae", hook="blocks.1.hook_resid_post")


TENSORS = st.dictionaries(
    st.sampled_from(["base_model.model.model.layers.1.isaerft_scale", "base_model.model.model.layers.1.isaerft_bias",
                     "base_model.model.model.layers.0.isaerft_scale", "base_model.model.lm_head.weight", "x"]),
    st.tuples(st.lists(st.integers(0, 200), min_size=0, max_size=2), st.sampled_from(["float32", "float16", "int64"])),
    max_size=3,
)


@SETTINGS
@given(config_changes=st.dictionaries(st.sampled_from([*FIELDS[1:-1], "peft_type", "saes"]), VALUES, max_size=3),
       tensors=TENSORS)
def test_random_adapter_files_load_or_fail_with_a_message(config_changes, tensors, sae_folder, tmp_path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    config = ISaeRFTConfig(saes=[{"path": str(sae_folder)}]).to_dict()
    config.update(config_changes)
    config["peft_type"] = config.get("peft_type") if "peft_type" in config_changes else "ISAERFT"
    (folder / "adapter_config.json").write_text(json.dumps(config, default=str))
    save_file({name: torch.zeros(shape, dtype=getattr(torch, dtype)) for name, (shape, dtype) in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    try:
        PeftModel.from_pretrained(make_model("llama"), str(folder))
    except (ValueError, TypeError, FileNotFoundError) as error:
        assert str(error).strip()
    except KeyError as error:  # PEFT's own registry lookup of an unknown peft_type
        assert "peft_type" in config_changes, error


def test_a_valid_adapter_round_trips_through_the_same_path(sae_folder, tmp_path) -> None:
    model = get_peft_model(make_model("llama"), ISaeRFTConfig(saes=[{"path": str(sae_folder)}], init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "adapter"))
    ids = torch.randint(3, 60, (1, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)

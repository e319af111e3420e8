"""The ISaeRFT PEFT method, laid out like PEFT's own tuners: config, layer, model, registration."""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

from .config import ISaeRFTConfig
from .layer import ISaeRFTLayer
from .model import ISaeRFTModel

PEFT_TYPE_NAME = "ISAERFT"


def _add_peft_type_member(name: str) -> PeftType:
    """Add ``PeftType.<name>``: PEFT has no plugin entry points, so a new method extends its enum."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # Python 3.12+ looks members up as class attributes; EnumType.__setattr__ refuses to add them
    type.__setattr__(PeftType, name, member)
    return member


def register() -> None:
    """Register ISaeRFT with PEFT once per process (importing ``peft_isaerft`` calls this)."""
    _add_peft_type_member(PEFT_TYPE_NAME)
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if PeftType.ISAERFT in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name="isaerft", config_cls=ISaeRFTConfig, model_cls=ISaeRFTModel, prefix="isaerft_")


register()

__all__ = ["ISaeRFTConfig", "ISaeRFTLayer", "ISaeRFTModel", "register"]

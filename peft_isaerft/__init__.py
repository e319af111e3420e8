"""peft-isaerft: Interpretable Sparse Autoencoder Representation Fine-Tuning as a PEFT method.

Importing this package registers ``ISaeRFTConfig`` with PEFT, so ``peft.get_peft_model`` and
``PeftModel.from_pretrained`` / ``AutoPeftModelForCausalLM.from_pretrained`` handle ISaeRFT adapters.

Example:
    >>> import peft_isaerft
    >>> from peft import get_peft_model
    >>> config = peft_isaerft.ISaeRFTConfig(saes=[{"path": "my_sae", "hook": "blocks.3.hook_resid_post"}],
    ...                                     component="bias")
    >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
"""

from __future__ import annotations

import logging

from .attach_points import ARCHITECTURES, AttachPoint, resolve_attach_point
from .components import COMPONENTS
from .guards import install_save_guard
from .interpret import (
    LatentTrackingCallback,
    diff_adapters,
    feature_report,
    install_model_card_hook,
    render,
)
from .portable import install_bundling
from .saes import SAEReference, load_sae
from .tuner import ISaeRFTConfig, ISaeRFTLayer, ISaeRFTModel

install_model_card_hook()
install_save_guard()
install_bundling()

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "COMPONENTS",
    "AttachPoint",
    "ISaeRFTConfig",
    "ISaeRFTLayer",
    "ISaeRFTModel",
    "LatentTrackingCallback",
    "SAEReference",
    "__version__",
    "diff_adapters",
    "feature_report",
    "load_sae",
    "render",
    "resolve_attach_point",
]

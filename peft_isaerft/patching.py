"""Wrapping a method of a library class once per process, for the hooks PEFT does not offer (model cards, save-time
checks, bundled SAEs)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def wrap_once(owner: type, name: str, marker: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``owner.name`` by ``make(original)``, unless a wrapper carrying ``marker`` is already there.

    Example:
        >>> wrap_once(PeftModel, "save_pretrained", "_my_hook", lambda original: original)  # doctest: +SKIP
    """
    original = getattr(owner, name)
    if getattr(original, marker, False):
        return
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, marker, True)
    setattr(owner, name, wrapper)

"""Model families: one adapter per diffusers pipeline class, behind :class:`~diffalign.families.base.Family`.

``family_for(pipe)`` picks the family of a loaded pipeline; ``family_class(name)`` the one a
``model_index.json`` names. Adding a family is one file here and one line in ``FAMILIES`` (docs/families.md).
"""

from __future__ import annotations

from .base import Conditioning, Family
from .flux import FluxFamily
from .sd import StableDiffusionFamily
from .sd3 import StableDiffusion3Family
from .sdxl import StableDiffusionXLFamily

FAMILIES: tuple[type[Family], ...] = (StableDiffusionFamily, StableDiffusionXLFamily, StableDiffusion3Family,
                                      FluxFamily)


def supported_classes() -> list[str]:
    return [c for fam in FAMILIES for c in fam.pipeline_classes]


def family_class(pipeline_class_name: str) -> type[Family] | None:
    """The family that drives ``pipeline_class_name`` (``_class_name`` in model_index.json), or None."""
    for fam in FAMILIES:
        if pipeline_class_name in fam.pipeline_classes:
            return fam
    return None


def family_for(pipe) -> Family:
    """The family of a loaded pipeline, by its class (or a base class: a subclassed SD pipeline is still SD)."""
    for klass in type(pipe).__mro__:
        fam = family_class(klass.__name__)
        if fam is not None:
            return fam(pipe)
    raise ValueError(f"{type(pipe).__name__} is not a supported pipeline; diffalign drives {', '.join(supported_classes())}")


__all__ = ["FAMILIES", "Conditioning", "Family", "FluxFamily", "StableDiffusion3Family", "StableDiffusionFamily", "StableDiffusionXLFamily",
           "family_class",
           "family_for", "supported_classes"]

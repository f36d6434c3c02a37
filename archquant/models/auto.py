"""Tell transformers' Auto classes about ``model_type: archquant``, explicitly where a model is made or loaded.

Importing ``archquant.models.hetero`` registers nothing: the verbs that make or load an
``ArchQuantForCausalLM`` (``models.load_model``, ``supernet.materialize``, ``export.load``) call
``register_auto_classes`` first, so that ``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained`` of a
saved subnet folder resolve it by its ``model_type``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from archquant.models.hetero import ArchQuantConfig, ArchQuantForCausalLM, ArchQuantModel


def register_auto_classes() -> None:
    """Register ``archquant`` with AutoConfig / AutoModel / AutoModelForCausalLM (idempotent)."""
    AutoConfig.register("archquant", ArchQuantConfig, exist_ok=True)
    AutoModel.register(ArchQuantConfig, ArchQuantModel, exist_ok=True)
    AutoModelForCausalLM.register(ArchQuantConfig, ArchQuantForCausalLM, exist_ok=True)

"""Distillation of a materialised subnet: KD + QAT on the shared training base, optional LoRA (peft)."""

from archquant.distill.config import DistillConfig, LoraConfig

__all__ = ["DistillConfig", "LoraConfig"]

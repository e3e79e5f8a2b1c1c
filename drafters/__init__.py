"""Drafters: propose token trees for the target to verify."""

from specdec.drafters.base import (
    DraftState,
    Drafter,
    NoDrafter,
    StepResult,
    build_drafter,
    register_drafter,
    registered_drafters,
)
from specdec.drafters.prompt_lookup import PromptLookupConfig, PromptLookupDrafter

__all__ = [
    "DraftState", "Drafter", "NoDrafter", "StepResult", "build_drafter", "register_drafter",
    "registered_drafters", "PromptLookupConfig", "PromptLookupDrafter",
]

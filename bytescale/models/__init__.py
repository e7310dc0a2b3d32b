"""The models. ``registry`` holds the one table (name -> config, model, presets, FLOP counter)."""

from bytescale.models.base import ModelOutput
from bytescale.models.blt import BLT
from bytescale.models.bytelm import ByteLM
from bytescale.models.megabyte import MegaByte
from bytescale.models.mtp import MultiTokenLM
from bytescale.models.registry import MODELS, build_model, get_preset, model_name_for

__all__ = ["BLT", "MODELS", "ByteLM", "MegaByte", "ModelOutput", "MultiTokenLM", "build_model", "get_preset",
           "model_name_for"]

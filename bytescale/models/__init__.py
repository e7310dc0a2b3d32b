"""Every model registers itself (config type, presets) on import; see ``bytescale.models.base``."""

from bytescale.models.base import MODELS, ModelOutput, build_model, model_name_for
from bytescale.models.bytelm import ByteLM

__all__ = ["MODELS", "ByteLM", "ModelOutput", "build_model", "model_name_for"]

"""Every model registers itself (config type, presets) on import; see ``bytescale.models.base``."""

from bytescale.models.base import MODELS, ModelOutput, build_model, model_name_for
from bytescale.models.bytelm import ByteLM
from bytescale.models.megabyte import MegaByte
from bytescale.models.blt import BLT  # noqa: F401  (registers "blt")
from bytescale import heads  # noqa: E402,F401  (registers "mtp"; heads imports models, so it comes last)

__all__ = ["MODELS", "ByteLM", "MegaByte", "ModelOutput", "build_model", "model_name_for"]

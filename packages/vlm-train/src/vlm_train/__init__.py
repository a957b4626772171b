"""vlm_train: LoRA, QLoRA and full fine-tuning of the models vlm_models loads.

Names resolve on first use, so importing the package stays cheap.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
__all__ = ["LoRAConfig", "QuantizationConfig", "Trainer", "TrainingConfig", "__version__", "fuse", "train"]

_HOMES = {
    "LoRAConfig": ".config",
    "QuantizationConfig": ".config",
    "TrainingConfig": ".config",
    "Trainer": ".trainer",
    "train": ".trainer",
    "fuse": ".fuse",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""vlm_models: vision-language architectures, processors and loading for vlm.

Names resolve on first use, so importing the package (or one architecture) stays cheap.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
__all__ = ["ModelLoadError", "__version__", "apply_chat_template", "load", "prepare_inputs"]

_HOMES = {
    "ModelLoadError": ".loading",
    "load": ".loading",
    "apply_chat_template": ".chat",
    "prepare_inputs": ".chat",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

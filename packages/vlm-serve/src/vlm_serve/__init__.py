"""vlm_serve: an OpenAI- and Anthropic-compatible HTTP server over vlm_runtime's batching engine.

Names resolve on first use, so importing the package stays cheap.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
__all__ = ["ServeSettings", "ModelHost", "__version__", "create_app"]

_HOMES = {"ServeSettings": ".settings", "ModelHost": ".host", "create_app": ".app"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

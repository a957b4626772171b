"""The base of every request-body model: JSON types taken strictly (``"stream": 0`` or ``"max_tokens": "5"`` is a
400, as the official APIs answer, not a silent coercion), no NaN or infinity, and unknown fields kept, since the
SDKs send fields this server does not use."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["WireModel"]


class WireModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

"""Architectures, one module per family. ``vlm_models.registry`` maps model_type to module."""

__all__: list[str] = []

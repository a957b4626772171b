"""The demo model shipped inside this package: a small Qwen2-VL trained from scratch by ``vlm train demo`` on
synthetic shapes pictures (see the README's Fine-tuning section). It answers short questions about pictures of up
to four red, green, blue, yellow, purple or orange circles, squares and triangles anywhere on a plain, gradient
or noisy background (which shapes, how many, how many of a kind or colour, which colour, where, is there ...),
and is what ``vlm generate`` uses when no ``--model`` is given, so the tool does something offline."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_MODEL", "demo_model_path"]

DEMO_MODEL = Path(__file__).with_name("demo_model")


def demo_model_path() -> Path:
    """The shipped demo model's folder; a clear error where the package was installed without it."""
    if not (DEMO_MODEL / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo model is missing from {DEMO_MODEL} (pass --model, or rebuild it with `vlm train demo "
            f"--output {DEMO_MODEL}`)"
        )
    return DEMO_MODEL

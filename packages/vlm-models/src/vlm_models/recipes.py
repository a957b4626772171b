"""Mixed quantization: which layers of a model get settings other than the conversion's own. A recipe is a named
preset (``vlm convert --quant-recipe``); a predicate file (``--quant-predicate``) says the same per path pattern.
Both produce a ``LayerPlan``: for a layer path, its own ``QuantizeOptions``, ``False`` (keep float) or None (the
conversion's settings)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

from .quantize import MODE_RULES, QuantizeError, QuantizeOptions, is_vision_tower

__all__ = ["RECIPES", "LayerChoice", "LayerPlan", "plan_from_file", "plan_from_recipe", "recipe_by_name"]

LayerChoice = QuantizeOptions | Literal[False] | None


@dataclass(frozen=True)
class LayerPlan:
    """Per-layer settings, and where each came from (for the report)."""

    choose: Callable[[str, str], LayerChoice]
    """``(our path, the layer's MLX-community name) -> choice``."""
    source: str


# Layer names (not model names) of the expert routers: the gates that pick experts, and the shared expert's gate.
ROUTER_SUFFIXES = (".mlp.gate", ".shared_expert_gate", ".router.proj")
_DECODER_LAYER = re.compile(r"^(.*\.)?layers\.(\d+)\.")
_EMBEDDING_NAMES = frozenset({"embed_tokens", "lm_head", "embed_vision", "embed_audio"})


def high_precision(base: QuantizeOptions) -> QuantizeOptions:
    """The 8-bit setting a recipe raises a layer to: mxfp8 beside the microscaling and NVIDIA formats (kernels of one
    family), affine 8 bits at the conversion's group size beside affine."""
    if base.mode == "affine":
        return QuantizeOptions.for_mode("affine", 8, base.group_size)
    return QuantizeOptions.for_mode("mxfp8")


def is_router(path: str) -> bool:
    return path.endswith(ROUTER_SUFFIXES)


def is_embedding(path: str) -> bool:
    return not _EMBEDDING_NAMES.isdisjoint(path.split("."))


def edge_layers(paths: Iterable[str]) -> set[str]:
    """The prefixes (``...layers.N.``) of the first and last decoder layers: of the ``layers`` list outside the
    media towers that holds the most layers (the language model's)."""
    stacks: dict[str, set[int]] = {}
    for path in paths:
        match = _DECODER_LAYER.match(path)
        if match and not is_vision_tower(path):
            stacks.setdefault(match.group(1) or "", set()).add(int(match.group(2)))
    if not stacks:
        return set()
    prefix, numbers = max(stacks.items(), key=lambda item: len(item[1]))
    return {f"{prefix}layers.{min(numbers)}.", f"{prefix}layers.{max(numbers)}."}


def _recipe(
    raise_if: Callable[[str, set[str]], bool],
) -> Callable[[QuantizeOptions, Iterable[str]], Callable[[str, str], LayerChoice]]:
    def build(base: QuantizeOptions, paths: Iterable[str]) -> Callable[[str, str], LayerChoice]:
        edges = edge_layers(paths)
        eight = high_precision(base)
        return lambda path, _name: eight if is_router(path) or raise_if(path, edges) else None

    return build


def _at_edge(path: str, edges: set[str]) -> bool:
    return any(path.startswith(edge) for edge in edges)


RECIPES: dict[str, tuple[str, Callable[[QuantizeOptions, Iterable[str]], Callable[[str, str], LayerChoice]]]] = {
    "routers-8bit": ("MoE routers at 8 bits", _recipe(lambda path, edges: False)),
    "vision-8bit": (
        "vision/audio towers and the embeddings (token embedding, output head) at 8 bits; MoE routers at 8 bits",
        _recipe(lambda path, edges: is_vision_tower(path) or is_embedding(path)),
    ),
    "edges-8bit": ("first and last decoder layers at 8 bits; MoE routers at 8 bits", _recipe(_at_edge)),
    "mixed-8bit": (
        "vision-8bit and edges-8bit together",
        _recipe(lambda path, edges: is_vision_tower(path) or is_embedding(path) or _at_edge(path, edges)),
    ),
}
"""name -> (what it does, builder(base options, the model's quantizable layer paths) -> chooser)."""


def recipe_by_name(
    name: str,
) -> tuple[str, Callable[[QuantizeOptions, Iterable[str]], Callable[[str, str], LayerChoice]]]:
    if name not in RECIPES:
        raise QuantizeError(f"--quant-recipe {name!r}: choose from {', '.join(RECIPES)}")
    return RECIPES[name]


def plan_from_recipe(name: str, base: QuantizeOptions, paths: Iterable[str]) -> LayerPlan:
    _, build = recipe_by_name(name)
    return LayerPlan(build(base, list(paths)), f"recipe {name}")


def _choice(pattern: str, value: object, base: QuantizeOptions) -> LayerChoice:
    if value is False:
        return False
    if not isinstance(value, Mapping) or not set(value) <= {"bits", "group_size", "mode"}:
        raise QuantizeError(
            f"--quant-predicate: {pattern!r} must map to false or an object of bits, group_size and mode"
        )
    mode = value.get("mode", base.mode)
    if mode not in MODE_RULES:
        raise QuantizeError(
            f"--quant-predicate: {pattern!r}: unknown mode {mode!r} (choose from {', '.join(MODE_RULES)})"
        )
    same = mode == base.mode
    bits = value.get("bits", base.bits if same else None)
    group_size = value.get("group_size", base.group_size if same else None)
    try:
        return QuantizeOptions.for_mode(mode, bits, group_size)
    except QuantizeError as exc:
        raise QuantizeError(f"--quant-predicate: {pattern!r}: {str(exc).split(': ', 1)[-1]}") from None


def plan_from_file(file: str | Path, base: QuantizeOptions) -> LayerPlan:
    """A JSON object of glob patterns (``fnmatch``; matched against both a layer's path in the model and its
    MLX-community name) to ``{"bits", "group_size", "mode"}`` (missing keys: the conversion's) or ``false`` (keep
    float); the first pattern that matches, in the file's order, decides."""
    try:
        rules = json.loads(Path(file).read_text())
    except OSError as exc:
        raise QuantizeError(f"--quant-predicate {file}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise QuantizeError(f"--quant-predicate {file}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(rules, dict) or not rules:
        raise QuantizeError(f"--quant-predicate {file}: expected a non-empty object of pattern -> settings or false")
    choices = [(pattern, _choice(pattern, value, base)) for pattern, value in rules.items()]

    def choose(path: str, name: str) -> LayerChoice:
        for pattern, choice in choices:
            if fnmatchcase(path, pattern) or fnmatchcase(name, pattern):
                return choice
        return None

    return LayerPlan(choose, f"predicate file {Path(file).name}")

"""Loading speculative-decoding drafters: the model behind ``--draft-model``, and which kind it is.

Kinds, told apart by the checkpoint's config.json:
  * ``draft``: any model vlm loads that shares the target's tokenizer (a smaller sibling).
  * ``eagle3``: an EAGLE-3 head in the speculators layout (``speculators_model_type`` "eagle3"), reading the
    target's hidden states (``vlm_models.eagle3``).
  * ``dflash``: z-lab's block drafters (``DFlashDraftModel``), a block of proposals per pass from the target's
    hidden states, through the target's embeddings and head (``vlm_models.dflash``).
  * ``mtp`` (multi-token-prediction heads such as Gemma 4's assistant): recognised, and refused with one line
    until it is built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlm_runtime.speculative import Drafter, ModelDrafter

from .loading import ModelLoadError, load, resolve_model_path

__all__ = ["DRAFT_KINDS", "DrafterError", "drafter_kind", "load_drafter"]

DRAFT_KINDS = ("draft", "eagle3", "dflash", "mtp")
SUPPORTED_KINDS = ("draft", "eagle3", "dflash")


class DrafterError(ValueError):
    """A drafter that cannot serve this target; the message says why, in one line."""


def drafter_kind(config: dict[str, Any]) -> str:
    """The drafter kind a checkpoint's config.json describes."""
    declared = str(config.get("speculators_model_type") or "").lower()
    names = " ".join([str(config.get("model_type") or ""), *map(str, config.get("architectures") or [])]).lower()
    for kind in ("eagle3", "dflash"):
        if kind in declared or kind in names:
            return kind
    if "assistant" in names or "mtp" in declared:
        return "mtp"
    return "draft"


def load_drafter(
    path_or_repo: str | os.PathLike[str],
    *,
    target_processor: Any = None,
    kind: str | None = None,
    target: Any = None,
) -> tuple[Drafter, str]:
    """The drafter at ``path_or_repo`` and its kind. With ``target_processor``, a ``draft`` model must share
    the target's vocabulary (its proposals are token ids the target reads). ``target``: the target model, whose
    embeddings an ``eagle3`` head without its own reads, and whose embeddings and head a ``dflash`` drafter uses."""
    if kind is not None and kind not in DRAFT_KINDS:
        raise DrafterError(f"unknown draft kind {kind!r} (choose from {', '.join(DRAFT_KINDS)})")
    path = resolve_model_path(path_or_repo)
    found = drafter_kind(_config(path))
    if kind is not None and kind != found:
        raise DrafterError(f"{path_or_repo} is a {found!r} drafter, not {kind!r}")
    if found not in SUPPORTED_KINDS:
        raise DrafterError(f"{found} drafters are not supported yet; draft models, eagle3 heads and dflash are")
    if found in ("dflash", "eagle3"):
        try:
            head = _load_head(found, path, target)
        except (ValueError, OSError) as exc:
            raise DrafterError(f"cannot load the {found} drafter {path_or_repo}: {exc}") from None
        if target is not None:
            _check_features(head, target, path_or_repo)
        return head, found
    try:
        model, processor = load(path)
    except ModelLoadError as exc:
        raise DrafterError(f"cannot load the draft model: {exc}") from None
    if target_processor is not None and _vocabulary(processor) != _vocabulary(target_processor):
        raise DrafterError(f"the draft model {path_or_repo} has another tokenizer than the target's")
    return ModelDrafter(model), found


def _load_head(kind: str, path: Path, target: Any) -> Drafter:
    if kind == "dflash":
        from .dflash import load_dflash

        return load_dflash(path, target)
    from .eagle3 import load_eagle3

    return load_eagle3(path, target.embed_tokens if target is not None else None)


def _check_features(head: Any, target: Any, name: Any) -> None:
    """Refuse, now and in one line, a head the target cannot feed: one whose layers it does not hand out, or
    whose feature width is not what the target's layers give (a head trained for another target)."""
    import mlx.core as mx

    from vlm_runtime.protocols import ExposesLayers

    if not isinstance(target, ExposesLayers):
        raise DrafterError(f"{name} reads the target's hidden states, which {type(target).__name__} does not expose")
    try:
        _, features = target.hidden_states_and_layers(
            target.embed_tokens(mx.zeros((1, 1), mx.int32)), cache=target.make_cache(), layers=head.target_layers
        )
    except ValueError as exc:  # layers the target does not have
        raise DrafterError(f"{name} cannot read this target: {exc}") from None
    if features.shape[-1] != head.feature_width:
        raise DrafterError(
            f"{name} reads {head.feature_width} feature channels; this target's layers give {features.shape[-1]} "
            "(a drafter trained for another target)"
        )


def _config(path: Path) -> dict[str, Any]:
    """config.json as it is: a speculators head names no model_type of its own."""
    file = path / "config.json"
    try:
        return dict(json.loads(file.read_text()))
    except (OSError, ValueError) as exc:
        raise DrafterError(f"{path} has no readable config.json ({exc})") from None


def _vocabulary(processor: Any) -> dict[str, int]:
    return dict(processor.tokenizer.get_vocab())

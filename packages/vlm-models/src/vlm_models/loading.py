"""Loading a checkpoint (local folder or Hugging Face repo) into a model and its processor."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .activation_quant import resolve_activation_quantization
from .config import ConfigError
from .inputs import Processor, load_chat_template
from .nn.fused import fuse_projections
from .quantize import apply_quantization
from .registry import Architecture, architecture_of

__all__ = ["load", "load_config", "resolve_model_path", "ModelLoadError"]

_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]


class ModelLoadError(ValueError):
    """The checkpoint cannot be loaded; the message names the file or keys at fault."""


def resolve_model_path(path_or_repo: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hugging Face repo id, downloaded (or found in the cache when
    ``HF_HUB_OFFLINE=1``) with huggingface_hub and its progress bars."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; a model is a folder holding config.json and weights")
        return path
    repo = str(path_or_repo)
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise ModelLoadError(f"no model folder at {repo} (and it is not a Hugging Face repo id like 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=_DOWNLOAD_PATTERNS))
    except RepositoryNotFoundError:
        raise ModelLoadError(f"Hugging Face repo {repo!r} not found (or it is private and no token is set)") from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{repo!r} is not in the local Hugging Face cache and the hub cannot be reached"
            " (offline, or HF_HUB_OFFLINE=1)"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelLoadError(f"downloading {repo!r} failed: {exc}") from None


def load_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise ModelLoadError(f"{path} has no config.json; is it a model folder?")
    config = _read_json(file)
    if "model_type" not in config:
        raise ModelLoadError(f"{file} has no model_type")
    return config


def _read_weights(path: Path) -> dict[str, mx.array]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pytorch = " (only PyTorch *.bin files, which are not read)" if any(path.glob("*.bin")) else ""
        raise ModelLoadError(f"{path} has no *.safetensors weight files{pytorch}")
    weights: dict[str, mx.array] = {}
    for file in files:
        try:
            weights.update(mx.load(str(file)))
        except Exception as exc:  # mlx raises bare RuntimeError/ValueError for corrupt files
            raise ModelLoadError(f"cannot read {file}: {exc}") from None
    return weights


def _summarise(keys: set[str], limit: int = 8) -> str:
    shown = sorted(keys)[:limit]
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(shown) + more


def _layer_entries_as_ours(
    model: nn.Module, quantization: Mapping[str, Any], stored: Mapping[str, mx.array]
) -> dict[str, Any]:
    """``quantization`` with its per-layer entries, keyed by the checkpoint's layer names, renamed to this model's
    layer paths (through ``sanitize``, so every layout's names work)."""
    out: dict[str, Any] = {}
    for key, value in quantization.items():
        weight = f"{key}.weight"
        if isinstance(value, (dict, bool)) and weight in stored:
            renamed = model.sanitize({weight: stored[weight]})
            if len(renamed) != 1:
                continue  # a tensor this model does not keep (a tied head)
            key = next(iter(renamed)).removesuffix(".weight")
        out[key] = value
    return out


def load_model(path: Path, config: Mapping[str, Any], arch: Architecture) -> nn.Module:
    try:
        model = arch.load_module().Model.from_hf_config(config)
    except ConfigError as exc:
        raise ModelLoadError(f"{path / 'config.json'}: {exc}") from None
    stored = _read_weights(path)
    weights = model.sanitize(stored)
    if "quantization" in config:
        apply_quantization(model, _layer_entries_as_ours(model, config["quantization"], stored), weights)
    expected = {name: value for name, value in tree_flatten(model.parameters())}
    missing, extra = set(expected) - set(weights), set(weights) - set(expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing weights: {_summarise(missing)}")
        if extra:
            parts.append(f"unexpected weights: {_summarise(extra)}")
        raise ModelLoadError(f"{path}: checkpoint does not match {config['model_type']}: " + "; ".join(parts))
    wrong = {k for k in expected if expected[k].shape != weights[k].shape}
    if wrong:
        k = sorted(wrong)[0]
        raise ModelLoadError(
            f"{path}: {len(wrong)} weight(s) have the wrong shape, e.g. {k}: "
            f"checkpoint {tuple(weights[k].shape)}, config implies {tuple(expected[k].shape)}"
        )
    model.load_weights(list(weights.items()))
    weights.clear()  # the fused projections replace these arrays by views: let the originals go
    stored.clear()
    fuse_projections(model)
    mx.eval(model.parameters())
    model.eval()
    return model


def _read_json(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file} must hold a JSON object")
    return value


def _image_processor_config(path: Path) -> dict[str, Any]:
    """transformers 4 writes preprocessor_config.json; transformers 5 nests it in processor_config.json, whose
    own plain settings (such as Gemma's ``image_seq_length``) apply too."""
    config: dict[str, Any] = {}
    if (path / "processor_config.json").is_file():
        processor = _read_json(path / "processor_config.json")
        config.update({k: v for k, v in processor.items() if not isinstance(v, (dict, list))})
        config.update(processor.get("image_processor") or {})
    if (path / "preprocessor_config.json").is_file():
        config.update(_read_json(path / "preprocessor_config.json"))
    return config


def _video_processor_config(path: Path) -> dict[str, Any]:
    """transformers' order: the ``video_processor`` of processor_config.json, video_preprocessor_config.json,
    else the image processor's settings."""
    if (path / "processor_config.json").is_file():
        nested = _read_json(path / "processor_config.json").get("video_processor")
        if isinstance(nested, dict):
            return nested
    if (path / "video_preprocessor_config.json").is_file():
        return _read_json(path / "video_preprocessor_config.json")
    return _image_processor_config(path)


def _audio_processor_config(path: Path) -> dict[str, Any]:
    """The ``feature_extractor`` of processor_config.json (transformers 5) under the processor's own plain
    settings (such as Gemma 3n's ``audio_seq_length``), else preprocessor_config.json."""
    plain: dict[str, Any] = {}
    if (path / "processor_config.json").is_file():
        processor = _read_json(path / "processor_config.json")
        plain = {k: v for k, v in processor.items() if not isinstance(v, (dict, list))}
        nested = processor.get("feature_extractor")
        if isinstance(nested, dict):
            return {**plain, **nested}
    if (path / "preprocessor_config.json").is_file():
        return {**plain, **_read_json(path / "preprocessor_config.json")}
    return plain


def _auto_tokenizer() -> Any:
    """transformers' ``AutoTokenizer``. transformers serves only tokenizers here, so the "PyTorch was not found"
    advice it logs on its first import is noise: it is switched off for that import alone, leaving the
    environment (and the user's own transformers warnings) as they were."""
    import sys

    if "transformers" not in sys.modules:
        before = os.environ.get(_NO_ADVICE)
        os.environ[_NO_ADVICE] = "1"
        try:
            import transformers  # noqa: F401
        finally:
            if before is None:
                del os.environ[_NO_ADVICE]
            else:
                os.environ[_NO_ADVICE] = before
    from transformers import AutoTokenizer

    return AutoTokenizer


_NO_ADVICE = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


def load_processor(path: Path, config: Mapping[str, Any], arch: Architecture, trust_remote_code: bool) -> Processor:
    AutoTokenizer = _auto_tokenizer()

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a broken tokenizer folder
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {exc}") from None
    # A family may derive processor settings from the model config, for checkpoints whose processor files lack them.
    defaults = arch.load_module().Model.processor_defaults(config)
    image_class = arch.image_processor_class()
    image_processor = None
    if image_class is not None:
        image_processor = image_class.from_config({**defaults, **_image_processor_config(path)})
    video_class = arch.video_processor_class()
    video_config = {**defaults, **_video_processor_config(path)}
    video_processor = None if video_class is None else video_class.from_config(video_config)
    audio_class = arch.audio_processor_class()
    # A family whose checkpoints may or may not hear says which (Gemma 4's large models have no audio tower).
    hears = arch.load_module().Model.takes_audio(config)
    audio_processor = None
    if audio_class is not None and hears:
        audio_processor = audio_class.from_config(_audio_processor_config(path))
    eos: set[int] = set()
    generation = path / "generation_config.json"
    if generation.is_file():
        value = _read_json(generation).get("eos_token_id")
        eos.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return Processor(
        tokenizer,
        image_processor,
        image_token=arch.image_token,
        chat_template=load_chat_template(path)
        or getattr(tokenizer, "chat_template", None)
        or arch.default_chat_template,
        eos_token_ids=eos,
        video_processor=video_processor,
        video_token=arch.video_token,
        video_chat_template=arch.video_chat_template,
        audio_processor=audio_processor,
        audio_token=arch.audio_token,
        thinking_markers=arch.thinking_markers,
    )


def load(
    path_or_repo: str | os.PathLike[str],
    *,
    adapter_path: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    quantize_activations: bool | None = None,
) -> tuple[nn.Module, Processor]:
    """Load a model and its processor from a local folder or a Hugging Face repo id.

    Reads the transformers 4 and 5 layouts and MLX-community conversions (quantized included). With
    ``adapter_path`` (a folder written by ``vlm train``), its LoRA layers or fine-tuned weights are applied.
    ``quantize_activations``: run an mxfp8 / nvfp4 checkpoint's linear layers activation-quantized
    (``nn.QQLinear``; refused in one line where MLX cannot); None: where the backend needs it (CUDA), with a notice.
    """
    path = resolve_model_path(path_or_repo, revision)
    config = load_config(path)
    arch = architecture_of(config)
    model = load_model(path, config, arch)
    if adapter_path is not None:
        from .adapters import load_adapters

        load_adapters(model, adapter_path)
        model.eval()
    resolve_activation_quantization(model, quantize_activations)
    return model, load_processor(path, config, arch, trust_remote_code)

"""Random-weight checkpoints of real model shapes, for ``vlm bench --shape``: speed and memory depend on the
shapes, not on the values, so a benchmark needs no download.

A checkpoint is written in the published Hugging Face layout of its family (Qwen2-VL: flat text settings,
``vision_config`` nested, ``rope_scaling`` with ``mrope_section``, sharded safetensors with an index), with the
shipped demo model's tokenizer and chat template (byte-level: any text encodes, so long prompts can be made)
and the family's real image-processor defaults. Weights are normal with std 1/sqrt(fan_in) (norms 1, biases 0):
activations stay near unit scale and greedy decoding gives varied tokens. Tensors are generated shard by shard,
so writing a 7B checkpoint needs about one shard of memory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx

__all__ = ["SHAPES", "DTYPES", "bench_cache_dir", "shape_checkpoint", "write_random_checkpoint"]

MAX_SHARD_BYTES = 2 * 10**9

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2-VL-2B-Instruct's sizes.
    "qwen2-vl-2b": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tie_word_embeddings=True,
        mrope_section=[16, 24, 24],
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
    ),
    # Qwen/Qwen2-VL-7B-Instruct's sizes.
    "qwen2-vl-7b": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        tie_word_embeddings=False,
        mrope_section=[16, 24, 24],
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
    ),
    # Qwen/Qwen3-VL-4B-Instruct's sizes (written through our own modules: see ``write_from_modules``).
    "qwen3-vl-4b": dict(
        family="qwen3_vl",
        text=dict(
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            mrope_section=[24, 20, 20],
            vocab_size=151936,
        ),
        tie_word_embeddings=True,
        vision=dict(
            depth=24,
            hidden_size=1024,
            intermediate_size=4096,
            num_heads=16,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[5, 11, 17],
        ),
    ),
    # Its structure, tiny (tests, dry runs).
    "qwen3-vl-tiny": dict(
        family="qwen3_vl",
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            mrope_section=[4, 2, 2],
            vocab_size=None,
        ),
        tie_word_embeddings=False,
        vision=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 2],
        ),
    ),
    # The same structure, tiny (tests, dry runs): vocab None = the tokenizer's own size.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=None,
        tie_word_embeddings=True,
        mrope_section=[2, 3, 3],
        vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4),
    ),
}

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
QWEN2_VL_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "size": {"shortest_edge": 3136, "longest_edge": 12845056},
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": 3,
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}
"""Qwen2-VL's preprocessor_config.json as published (a 448x448 image gives 256 image tokens)."""

QWEN3_VL_PROCESSOR = {
    "image_processor": {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessor",
        "merge_size": 2,
        "patch_size": 16,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": 16777216, "shortest_edge": 65536},
        "temporal_patch_size": 2,
    },
    "processor_class": "Qwen3VLProcessor",
}
"""Qwen3-VL's processor_config.json as published (transformers 5 layout)."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKEN_ID_KEYS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "vision_token_id",
)


def token_ids(tokenizer_source: Path) -> dict[str, Any]:
    """The special-token ids of the checkpoint the tokenizer comes from (its config.json, flat or nested)."""
    config = json.loads((tokenizer_source / "config.json").read_text())
    flat = {**config, **(config.get("text_config") or {})}
    return {k: flat[k] for k in TOKEN_ID_KEYS if flat.get(k) is not None}


def tokenizer_size(tokenizer_source: Path) -> int:
    tok = json.loads((tokenizer_source / "tokenizer.json").read_text())
    ids = [t["id"] for t in tok.get("added_tokens", [])]
    vocab = tok.get("model", {}).get("vocab", {})
    ids += list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    return max(ids) + 1 if ids else 0


def qwen2_vl_config(shape: dict[str, Any], ids: dict[str, Any], vocab_size: int, dtype: str) -> dict[str, Any]:
    p, v = shape, shape["vision"]
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "attention_dropout": 0.0,
        **{k: ids[k] for k in TOKEN_ID_KEYS if k in ids and k != "pad_token_id"},
        "hidden_act": "silu",
        "hidden_size": p["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"],
        "max_position_embeddings": 32768,
        "max_window_layers": p["num_hidden_layers"],
        "num_attention_heads": p["num_attention_heads"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_key_value_heads": p["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": p["tie_word_embeddings"],
        "torch_dtype": dtype,
        "transformers_version": "4.45.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": v["depth"],
            "embed_dim": v["embed_dim"],
            "mlp_ratio": v["mlp_ratio"],
            "num_heads": v["num_heads"],
            "in_chans": 3,
            "hidden_size": p["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(p["mrope_section"])},
        "vocab_size": vocab_size,
    }


def qwen2_vl_weights(config: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every tensor, in the published checkpoint's names; init: normal, ones or zeros."""
    h = config["hidden_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = h // heads
    inter = config["intermediate_size"]
    yield "model.embed_tokens.weight", (config["vocab_size"], h), "normal"
    for i in range(config["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        for name, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            yield pre + f"self_attn.{name}.weight", (rows, h), "normal"
            yield pre + f"self_attn.{name}.bias", (rows,), "zeros"
        yield pre + "self_attn.o_proj.weight", (h, heads * hd), "normal"
        yield pre + "mlp.gate_proj.weight", (inter, h), "normal"
        yield pre + "mlp.up_proj.weight", (inter, h), "normal"
        yield pre + "mlp.down_proj.weight", (h, inter), "normal"
        yield pre + "input_layernorm.weight", (h,), "ones"
        yield pre + "post_attention_layernorm.weight", (h,), "ones"
    yield "model.norm.weight", (h,), "ones"
    if not config["tie_word_embeddings"]:
        yield "lm_head.weight", (config["vocab_size"], h), "normal"
    v = config["vision_config"]
    w = v["embed_dim"]
    mlp = int(w * v["mlp_ratio"])
    merged = w * v["spatial_merge_size"] ** 2
    patch = (w, v["in_chans"], v["temporal_patch_size"], v["patch_size"], v["patch_size"])
    yield "visual.patch_embed.proj.weight", patch, "normal"
    for i in range(v["depth"]):
        pre = f"visual.blocks.{i}."
        for norm in ("norm1", "norm2"):
            yield pre + f"{norm}.weight", (w,), "ones"
            yield pre + f"{norm}.bias", (w,), "zeros"
        for name, rows, cols in (("attn.qkv", 3 * w, w), ("attn.proj", w, w), ("mlp.fc1", mlp, w), ("mlp.fc2", w, mlp)):
            yield pre + f"{name}.weight", (rows, cols), "normal"
            yield pre + f"{name}.bias", (rows,), "zeros"
    yield "visual.merger.ln_q.weight", (w,), "ones"
    yield "visual.merger.ln_q.bias", (w,), "zeros"
    yield "visual.merger.mlp.0.weight", (merged, merged), "normal"
    yield "visual.merger.mlp.0.bias", (merged,), "zeros"
    yield "visual.merger.mlp.2.weight", (v["hidden_size"], merged), "normal"
    yield "visual.merger.mlp.2.bias", (v["hidden_size"],), "zeros"


def qwen3_vl_config(shape: dict[str, Any], ids: dict[str, Any], vocab_size: int, dtype: str) -> dict[str, Any]:
    t, v = shape["text"], shape["vision"]
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "dtype": dtype,
        **{
            k: ids[k]
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            if k in ids
        },
        "text_config": {
            "model_type": "qwen3_vl_text",
            "attention_bias": False,
            "attention_dropout": 0.0,
            **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids},
            "head_dim": t["head_dim"],
            "hidden_act": "silu",
            "hidden_size": t["hidden_size"],
            "initializer_range": 0.02,
            "intermediate_size": t["intermediate_size"],
            "max_position_embeddings": 262144,
            "num_attention_heads": t["num_attention_heads"],
            "num_hidden_layers": t["num_hidden_layers"],
            "num_key_value_heads": t["num_key_value_heads"],
            "rms_norm_eps": 1e-06,
            "rope_parameters": {
                "mrope_interleaved": True,
                "mrope_section": list(t["mrope_section"]),
                "rope_theta": 5000000.0,
                "rope_type": "default",
            },
            "use_cache": True,
            "vocab_size": vocab_size,
        },
        "tie_word_embeddings": shape["tie_word_embeddings"],
        "vision_config": {
            "model_type": "qwen3_vl_vision",
            "deepstack_visual_indexes": list(v["deepstack_visual_indexes"]),
            "depth": v["depth"],
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": v["hidden_size"],
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": v["intermediate_size"],
            "num_heads": v["num_heads"],
            "num_position_embeddings": v["num_position_embeddings"],
            "out_hidden_size": t["hidden_size"],
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    }


def write_from_modules(
    config: dict[str, Any], out: Path, dtype: mx.Dtype, seed: int, progress: Callable[[str], None] | None = None
) -> int:
    """Weights for any family: its model built from ``config`` by our own modules (their initialisation, norms at
    one), in our parameter names (``load`` reads them: every family's ``sanitize`` is idempotent), cast and
    written shard by shard. The arrays are lazy until their shard is evaluated, so memory stays about a shard."""
    from mlx.utils import tree_flatten

    from .registry import architecture_for

    mx.random.seed(seed)
    model = architecture_for(config["model_type"]).load_module().Model.from_hf_config(config)
    arrays = dict(tree_flatten(model.parameters()))
    specs = [(name, tuple(a.shape), "module") for name, a in arrays.items()]

    def tensor(name: str, shape: tuple[int, ...], init: str, dtype_: mx.Dtype, key: mx.array) -> mx.array:
        a = arrays[name]
        return a.astype(dtype_) if mx.issubdtype(a.dtype, mx.floating) else a

    return write_weights(specs, out, dtype, seed, progress, make=tensor)


def random_tensor(shape: tuple[int, ...], init: str, dtype: mx.Dtype, key: mx.array) -> mx.array:
    if init == "ones":
        return mx.ones(shape, dtype=dtype)
    if init == "zeros":
        return mx.zeros(shape, dtype=dtype)
    # fan_in: a linear layer's input width; all but the first axis of a conv kernel; an embedding's width (so
    # tied logits h @ E.T have unit scale too).
    return (mx.random.normal(shape, key=key) * (1.0 / math.sqrt(math.prod(shape[1:])))).astype(dtype)


def write_weights(
    specs: list[tuple[str, tuple[int, ...], str]],
    out: Path,
    dtype: mx.Dtype,
    seed: int,
    progress: Callable[[str], None] | None = None,
    make: Callable[..., mx.array] | None = None,
) -> int:
    """Generate and write the tensors shard by shard (one shard in memory at a time); the bytes written."""
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * dtype.size
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    keys = mx.random.split(mx.random.key(seed), len(specs))
    index: dict[str, str] = {}
    total = k = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for spec_name, shape, init in shard:
            if make is None:
                tensors[spec_name] = random_tensor(shape, init, dtype, keys[k])
            else:
                tensors[spec_name] = make(spec_name, shape, init, dtype, keys[k])
            k += 1
        mx.eval(tensors)
        mx.save_safetensors(str(out / name), tensors, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        index.update(dict.fromkeys(tensors, name))
        del tensors
        if progress is not None:
            progress(f"wrote {name} ({len(shard)} tensors, shard {i + 1} of {len(shards)})")
    weight_map = dict(sorted(index.items()))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    return total


def write_random_checkpoint(
    shape: str | dict[str, Any],
    out: Path,
    *,
    dtype: str = "bfloat16",
    seed: int = 0,
    tokenizer_source: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write a random checkpoint of ``shape`` (a name in ``SHAPES`` or such a dict: Qwen2-VL, or Qwen3-VL with
    ``family``) into ``out``, with the tokenizer of ``tokenizer_source`` (default: the shipped demo model).
    Returns its config."""
    from .demo import demo_model_path

    spec = SHAPES[shape] if isinstance(shape, str) else shape
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: one of {', '.join(DTYPES)}")
    source = Path(tokenizer_source) if tokenizer_source is not None else demo_model_path()
    ids = token_ids(source)
    n_tokens = tokenizer_size(source)
    family = spec.get("family", "qwen2_vl")
    vocab = (spec["text"]["vocab_size"] if family == "qwen3_vl" else spec["vocab_size"]) or n_tokens
    highest = max([n_tokens - 1, *(v for x in ids.values() for v in (x if isinstance(x, list) else [x]))])
    if vocab <= highest:
        raise ValueError(f"a vocabulary of {vocab} is too small for the tokenizer of {source} (ids up to {highest})")
    out.mkdir(parents=True, exist_ok=True)
    if family == "qwen3_vl":
        config = qwen3_vl_config(spec, ids, vocab, dtype)
        write_from_modules(config, out, DTYPES[dtype], seed, progress)
        (out / "processor_config.json").write_text(json.dumps(QWEN3_VL_PROCESSOR, indent=2) + "\n")
    else:
        config = qwen2_vl_config(spec, ids, vocab, dtype)
        write_weights(list(qwen2_vl_weights(config)), out, DTYPES[dtype], seed, progress)
        (out / "preprocessor_config.json").write_text(json.dumps(QWEN2_VL_PREPROCESSOR, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    tokenizer_config = out / "tokenizer_config.json"
    if tokenizer_config.is_file():  # long benchmark prompts are meant: no "longer than the maximum" warnings
        settings = json.loads(tokenizer_config.read_text())
        settings["model_max_length"] = (config.get("text_config") or config)["max_position_embeddings"]
        tokenizer_config.write_text(json.dumps(settings, indent=2) + "\n")
    eos = ids.get("eos_token_id")
    generation = {"bos_token_id": ids.get("bos_token_id"), "eos_token_id": eos, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return config


def bench_cache_dir() -> Path:
    """Where ``vlm bench --shape`` keeps the checkpoints it writes (``VLM_BENCH_CACHE``, else the user cache)."""
    explicit = os.environ.get("VLM_BENCH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlm" / "bench"


_COMPLETE = ".complete"


def shape_checkpoint(
    shape: str, *, dtype: str = "bfloat16", bits: int | None = None, progress: Callable[[str], None] | None = None
) -> Path:
    """The folder of a random ``shape`` checkpoint (``bits``: affine-quantized, group 64), written on first use
    and reused after (a marker file says a folder is whole: an interrupted write is redone)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
    root = bench_cache_dir()
    float_dir = root / f"{shape}-{dtype}"
    if not (float_dir / _COMPLETE).is_file():
        if float_dir.exists():
            shutil.rmtree(float_dir)
        if progress is not None:
            progress(f"writing a random {shape} checkpoint ({dtype}) to {float_dir} (once)")
        write_random_checkpoint(shape, float_dir, dtype=dtype, progress=progress)
        (float_dir / _COMPLETE).write_text("")
    if bits is None:
        return float_dir
    quant_dir = root / f"{shape}-{dtype}-q{bits}"
    if not (quant_dir / _COMPLETE).is_file():
        from .convert import ConvertOptions, convert
        from .quantize import QuantizeOptions

        if quant_dir.exists():
            shutil.rmtree(quant_dir)
        if progress is not None:
            progress(f"quantizing it to {bits} bits into {quant_dir} (once)")
        convert(float_dir, quant_dir, ConvertOptions(quantize=QuantizeOptions.for_mode("affine", bits)))
        (quant_dir / _COMPLETE).write_text("")
    return quant_dir

"""Write a random-weight Qwen2-VL checkpoint in the published Hugging Face (transformers 4.x) layout.

Only numpy and mlx are used (no torch). The folder looks like Qwen/Qwen2-VL-2B-Instruct as published:

* config.json: flat text settings at the top level, ``vision_config`` nested (``in_chans``, ``embed_dim``, ...),
  ``rope_scaling: {"type": "mrope", "mrope_section": [...]}``;
* weights ``model.embed_tokens.weight``, ``model.layers.N.self_attn.{q,k,v}_proj.{weight,bias}``, ...,
  ``visual.patch_embed.proj.weight`` as a 5-D (out, 3, 2, 14, 14) Conv3d kernel, ``visual.blocks.N.*``,
  ``visual.merger.{ln_q, mlp.0, mlp.2}``; no ``lm_head.weight`` when the embeddings are tied;
* sharded ``model-0000i-of-0000n.safetensors`` (each at most 2 GB) with ``model.safetensors.index.json``;
* the tokenizer, tokenizer config and chat template copied from a fixture folder (default
  tests/fixtures/qwen2_vl/hf4), a preprocessor_config.json with the real Qwen2-VL defaults (a 448x448 image
  gives 256 image tokens) and a generation_config.json.

Weights are normal with std 1/sqrt(fan_in) (norm weights 1, biases 0), so activations stay near unit scale
and greedy decoding produces varied tokens.

    python benchmarks/make_random_checkpoint.py --preset tiny --dtype float32 --out /work/scratch/qwen2vl-tiny
    python benchmarks/make_random_checkpoint.py --preset 2b --dtype bfloat16 --out /work/scratch/qwen2vl-2b
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURE = REPO / "tests" / "fixtures" / "qwen2_vl" / "hf4"
MAX_SHARD_BYTES = 2 * 10**9

PRESETS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2-VL-2B-Instruct's sizes.
    "2b": dict(
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
    # A tiny model with the same structure: hidden 64, 2 layers. vocab_size None = the fixture tokenizer's.
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

# Qwen2-VL's preprocessor_config.json as published (plus the equivalent ``size`` dict newer transformers write).
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PREPROCESSOR_CONFIG = {
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

# Tokenizer and chat-template files copied from the fixture when present (preprocessor_config.json and
# generation_config.json are written here instead; reference data and weights are never copied).
PROCESSOR_FILES = (
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
# Qwen2-VL's own ids, used for any the fixture config does not give.
QWEN2_VL_IDS = {
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
}


def fixture_token_ids(fixture: Path) -> dict[str, Any]:
    """The special-token ids of the fixture checkpoint (its config.json, flat or nested under text_config)."""
    config = json.loads((fixture / "config.json").read_text())
    flat = {**config, **(config.get("text_config") or {})}
    ids = {k: flat[k] for k in TOKEN_ID_KEYS if flat.get(k) is not None}
    missing = [k for k in QWEN2_VL_IDS if k not in ids]
    if missing:
        ids.update(_ids_from_tokenizer(fixture, missing))
    return ids


def _ids_from_tokenizer(fixture: Path, keys: list[str]) -> dict[str, int]:
    """Look ids the fixture config lacks up in its tokenizer.json's vocabulary / added tokens."""
    names = {
        "bos_token_id": "<|endoftext|>",
        "eos_token_id": "<|im_end|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "vision_token_id": "<|vision_pad|>",
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
    }
    tok = json.loads((fixture / "tokenizer.json").read_text())
    vocab = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    model_vocab = tok.get("model", {}).get("vocab", {})
    if isinstance(model_vocab, dict):
        vocab = {**model_vocab, **vocab}
    found = {}
    for key in keys:
        if names[key] in vocab:
            found[key] = vocab[names[key]]
        else:
            print(f"warning: fixture has no {key}; using Qwen2-VL's {QWEN2_VL_IDS[key]}", file=sys.stderr)
            found[key] = QWEN2_VL_IDS[key]
    return found


def tokenizer_size(fixture: Path) -> int:
    tok = json.loads((fixture / "tokenizer.json").read_text())
    ids = [t["id"] for t in tok.get("added_tokens", [])]
    vocab = tok.get("model", {}).get("vocab", {})
    ids += list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    return max(ids) + 1 if ids else 0


def build_config(preset: dict[str, Any], ids: dict[str, Any], vocab_size: int, dtype: str) -> dict[str, Any]:
    p, v = preset, preset["vision"]
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


def weight_shapes(config: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) for every tensor, in the published checkpoint's names. init: 'normal', 'ones', 'zeros'."""
    h = config["hidden_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = h // heads
    inter = config["intermediate_size"]
    yield "model.embed_tokens.weight", (config["vocab_size"], h), "normal"
    for i in range(config["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        yield pre + "self_attn.q_proj.weight", (heads * hd, h), "normal"
        yield pre + "self_attn.q_proj.bias", (heads * hd,), "zeros"
        yield pre + "self_attn.k_proj.weight", (kv * hd, h), "normal"
        yield pre + "self_attn.k_proj.bias", (kv * hd,), "zeros"
        yield pre + "self_attn.v_proj.weight", (kv * hd, h), "normal"
        yield pre + "self_attn.v_proj.bias", (kv * hd,), "zeros"
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
    yield (
        "visual.patch_embed.proj.weight",
        (w, v["in_chans"], v["temporal_patch_size"], v["patch_size"], v["patch_size"]),
        "normal",
    )
    for i in range(v["depth"]):
        pre = f"visual.blocks.{i}."
        for norm in ("norm1", "norm2"):
            yield pre + f"{norm}.weight", (w,), "ones"
            yield pre + f"{norm}.bias", (w,), "zeros"
        yield pre + "attn.qkv.weight", (3 * w, w), "normal"
        yield pre + "attn.qkv.bias", (3 * w,), "zeros"
        yield pre + "attn.proj.weight", (w, w), "normal"
        yield pre + "attn.proj.bias", (w,), "zeros"
        yield pre + "mlp.fc1.weight", (mlp, w), "normal"
        yield pre + "mlp.fc1.bias", (mlp,), "zeros"
        yield pre + "mlp.fc2.weight", (w, mlp), "normal"
        yield pre + "mlp.fc2.bias", (w,), "zeros"
    yield "visual.merger.ln_q.weight", (w,), "ones"
    yield "visual.merger.ln_q.bias", (w,), "zeros"
    yield "visual.merger.mlp.0.weight", (merged, merged), "normal"
    yield "visual.merger.mlp.0.bias", (merged,), "zeros"
    yield "visual.merger.mlp.2.weight", (v["hidden_size"], merged), "normal"
    yield "visual.merger.mlp.2.bias", (v["hidden_size"],), "zeros"


def make_tensor(name: str, shape: tuple[int, ...], init: str, dtype: mx.Dtype, key: mx.array) -> mx.array:
    if init == "ones":
        return mx.ones(shape, dtype=dtype)
    if init == "zeros":
        return mx.zeros(shape, dtype=dtype)
    # fan_in: the input width of a linear layer; all but the first axis of a conv kernel; the width of an
    # embedding (so tied logits h @ E.T have unit scale too).
    fan_in = math.prod(shape[1:])
    return (mx.random.normal(shape, key=key) * (1.0 / math.sqrt(fan_in))).astype(dtype)


def write_weights(config: dict[str, Any], out: Path, dtype: mx.Dtype, seed: int) -> int:
    """Generate and write tensors shard by shard (never more than one shard in memory). Returns the byte total."""
    specs = list(weight_shapes(config))
    itemsize = dtype.size
    # Plan shards first so the file names can carry the shard count.
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * itemsize
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    root = mx.random.key(seed)
    keys = mx.random.split(root, len(specs))
    index: dict[str, str] = {}
    total = 0
    k = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for spec in shard:
            tensors[spec[0]] = make_tensor(*spec, dtype=dtype, key=keys[k])
            k += 1
        mx.eval(tensors)
        mx.save_safetensors(str(out / name), tensors, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        index.update({n: name for n in tensors})
        del tensors
        print(f"wrote {name} ({len(shard)} tensors)", file=sys.stderr)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=2) + "\n"
    )
    return total


def copy_processor_files(fixture: Path, out: Path) -> list[str]:
    copied = []
    for name in PROCESSOR_FILES:
        if (fixture / name).is_file():
            shutil.copy2(fixture / name, out / name)
            copied.append(name)
    return copied


def generation_config(ids: dict[str, Any]) -> dict[str, Any]:
    eos = ids.get("eos_token_id", QWEN2_VL_IDS["eos_token_id"])
    bos = ids.get("bos_token_id", QWEN2_VL_IDS["bos_token_id"])
    eos_list = list(eos) if isinstance(eos, list) else [eos]
    if bos not in eos_list:
        eos_list.append(bos)  # Qwen2-VL stops on <|im_end|> and <|endoftext|>
    return {
        "bos_token_id": bos,
        "pad_token_id": ids.get("pad_token_id", bos),
        "do_sample": True,
        "eos_token_id": eos_list,
        "repetition_penalty": 1.0,
        "temperature": 0.01,
        "top_p": 0.001,
        "top_k": 1,
        "transformers_version": "4.45.0",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE, help="tokenizer/chat-template source")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocab size")
    parser.add_argument("--text-layers", type=int, default=None, help="override the preset's decoder layer count")
    parser.add_argument("--vision-depth", type=int, default=None, help="override the preset's vision block count")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    args = parser.parse_args(argv)

    if not (args.fixture / "tokenizer.json").is_file():
        parser.error(f"{args.fixture} has no tokenizer.json")
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        parser.error(f"{args.out} is not empty (pass --force to overwrite)")
    args.out.mkdir(parents=True, exist_ok=True)

    preset = dict(PRESETS[args.preset], vision=dict(PRESETS[args.preset]["vision"]))
    if args.text_layers is not None:
        preset["num_hidden_layers"] = args.text_layers
    if args.vision_depth is not None:
        preset["vision"]["depth"] = args.vision_depth
    ids = fixture_token_ids(args.fixture)
    n_tok = tokenizer_size(args.fixture)
    vocab = args.vocab_size or preset["vocab_size"]
    if vocab is None:
        fixture_cfg = json.loads((args.fixture / "config.json").read_text())
        vocab = max(int({**fixture_cfg, **(fixture_cfg.get("text_config") or {})}.get("vocab_size", 0)), n_tok)
    highest = max(v for x in ids.values() for v in (x if isinstance(x, list) else [x]))
    if vocab <= max(highest, n_tok - 1):
        parser.error(f"vocab_size {vocab} is too small for the fixture tokenizer (ids up to {max(highest, n_tok - 1)})")

    config = build_config(preset, ids, vocab, args.dtype)
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    total = write_weights(config, args.out, DTYPES[args.dtype], args.seed)
    copied = copy_processor_files(args.fixture, args.out)
    (args.out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    (args.out / "generation_config.json").write_text(json.dumps(generation_config(ids), indent=2) + "\n")
    params = total // DTYPES[args.dtype].size
    print(
        f"{args.out}: qwen2_vl preset={args.preset} dtype={args.dtype} params={params / 1e6:.2f}M "
        f"({total / 1e9:.3f} GB) vocab={vocab}; copied {', '.join(copied)}"
    )


if __name__ == "__main__":
    main()

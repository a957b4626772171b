"""Write a random-weight Gemma 4 checkpoint of a real model's shape, in the published (transformers 5) layout, for
decode benchmarks. Only mlx and numpy (no torch): the model is vlm's own, its parameter names are the Hub's.

Presets (sizes as google/gemma-4-E4B-it / -E2B-it publish them, as far as this repo knows them; override any with
--set key=value on the text config):

* ``e4b``: hidden 2560, 42 layers (5 sliding : 1 global, window 512), 8 heads, 2 KV heads, head 256 (global 512),
  MLP 10240 (double-wide in the last 18, KV-shared, layers), per-layer inputs of 256, vocabulary 262144, logits
  soft-capped at 30; SigLIP-sized vision tower (768 wide, 16 layers) and the 12-layer conformer audio tower.
* ``e2b``: hidden 1536, 35 layers, 1 KV head, MLP 6144, 20 KV-shared layers; same towers.

The tokenizer, chat template and processor files come from the tiny fixture (tests/fixtures/gemma4/hub), with the
image processor's published budget (patch 16, 280 soft tokens). Weights are N(0, 1/fan_in), norms 1, written
tensor by tensor into 2 GB shards, so the host never holds the whole model.

    uv run python benchmarks/make_gemma4_checkpoint.py --preset e4b --dtype bfloat16 --out /tmp/gemma4-e4b
    uv run vlm bench --model /tmp/gemma4-e4b --image examples/shapes.png --prompt "Describe this image." \\
        --max-tokens 128 --runs 3
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from vlm_models.models.gemma4 import Model

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "gemma4" / "hub"
SHARD_BYTES = 2 * 10**9
TOWERS = {
    "vision_config": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=16,
        num_attention_heads=12,
        num_key_value_heads=12,
        head_dim=64,
        patch_size=16,
        pooling_kernel_size=3,
        position_embedding_size=10240,
        use_clipped_linears=False,
        standardize=False,
    ),
    "audio_config": dict(
        hidden_size=1024,
        num_hidden_layers=12,
        num_attention_heads=8,
        subsampling_conv_channels=[128, 32],
        attention_chunk_size=12,
        attention_context_left=13,
        attention_context_right=0,
        output_proj_dims=1536,
        use_clipped_linears=True,
    ),
}
PRESETS = {
    "e4b": dict(
        hidden_size=2560,
        num_hidden_layers=42,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=10240,
        num_kv_shared_layers=18,
    ),
    # The E shape at toy size (the fixture's towers): a smoke test of this script.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        num_kv_shared_layers=2,
        head_dim=16,
        global_head_dim=32,
        hidden_size_per_layer_input=8,
        vocab_size=384,
        vocab_size_per_layer_input=384,
    ),
    "e2b": dict(
        hidden_size=1536,
        num_hidden_layers=35,
        num_attention_heads=8,
        num_key_value_heads=1,
        intermediate_size=6144,
        num_kv_shared_layers=20,
    ),
}
COMMON_TEXT = dict(
    head_dim=256,
    global_head_dim=512,
    sliding_window=512,
    hidden_size_per_layer_input=256,
    vocab_size=262_144,
    vocab_size_per_layer_input=262_144,
    use_double_wide_mlp=True,
    final_logit_softcapping=30.0,
    attention_k_eq_v=False,
    enable_moe_block=False,
)


def text_config(preset: str, overrides: list[str]) -> dict:
    text = {**COMMON_TEXT, **PRESETS[preset]}
    for item in overrides:
        key, _, value = item.partition("=")
        text[key] = json.loads(value)
    n = text["num_hidden_layers"]
    text["layer_types"] = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    text["layer_types"][-1] = "full_attention"
    return text


def random_weight(name: str, shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
    if len(shape) >= 2:
        fan_in = shape[-1] if "position_embedding_table" not in name else 1
        return (mx.random.normal(shape) * fan_in**-0.5).astype(dtype)
    if name.endswith(("_min",)):
        return mx.full(shape, -1e4).astype(dtype)
    if name.endswith(("_max",)):
        return mx.full(shape, 1e4).astype(dtype)
    return mx.ones(shape, dtype) if "norm" in name or "scale" in name else mx.zeros(shape, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="e4b")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], help="text config override, key=json_value")
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)
    config = json.loads((FIXTURE / "config.json").read_text())
    config["text_config"] = {**config["text_config"], **text_config(args.preset, args.set)}
    config["text_config"].pop("per_layer_config", None)
    if args.preset != "tiny":
        for key, values in TOWERS.items():
            config[key] = {**config[key], **values}
    config["dtype"] = args.dtype
    # The structure only: mlx arrays are lazy, nothing is allocated until a tensor is evaluated below.
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(Model.from_hf_config(config).parameters())}
    args.out.mkdir(parents=True, exist_ok=True)
    shard, shard_bytes, index, shards = {}, 0, {}, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            mx.save_safetensors(str(args.out / name), shard, metadata={"format": "mlx"})
            shards.append(name)
            index.update(dict.fromkeys(shard, name))
            shard, shard_bytes = {}, 0

    for name, shape in sorted(shapes.items()):
        value = random_weight(name, shape, dtype)
        mx.eval(value)
        shard[name] = value
        shard_bytes += value.nbytes
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    total = sum(math.prod(shape) * dtype.size for shape in shapes.values())
    (args.out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2)
    )
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(FIXTURE / file, args.out / file)
    processor = json.loads((FIXTURE / "processor_config.json").read_text())
    if args.preset != "tiny":
        processor["image_processor"].update(patch_size=16, max_soft_tokens=280)
        processor["image_seq_length"] = 280
    (args.out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    print(f"{args.out}: {len(shapes)} tensors in {len(shards)} shards, {args.preset}, {args.dtype}")


if __name__ == "__main__":
    main()

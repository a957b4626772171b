"""Write a random-weight Qwen3.5 checkpoint in the published layout (transformers 5 names, nested config), for
decode benchmarks of the hybrid decoder on the accelerator machine.

No torch: the tensors' names and shapes come from vlm_models' own Qwen3.5 model built from the config, and are
written as the published checkpoints store them (``model.language_model.*``, ``model.visual.*``, ``lm_head``;
the conv1d kernels (channels, 1, kernel), the patch embedding as a 5-D Conv3d kernel, zero-centred norms 0).
Tokenizer, chat template and token ids come from the tiny fixture (tests/fixtures/qwen3_5/hf5); the image
processor settings are Qwen3-VL's published ones (patch 16, merge 2), so a 448x448 image gives 196 image tokens.

    uv run python benchmarks/make_random_qwen3_5.py --preset 4b --dtype bfloat16 --out /work/scratch/qwen35-4b
    uv run vlm bench --model /work/scratch/qwen35-4b --image benchmarks/bench_448.png \\
        --prompt "Describe this image." --max-tokens 256 --runs 3
    OURS_PY="uv run python" PEER_PY=/path/to/mlxvlm/bin/python \\
        benchmarks/run_side_by_side.sh /work/scratch/qwen35-4b benchmarks/bench_448.png 256

``--preset 4b``: the sizes of Qwen/Qwen3.5-4B as this script understands them (hidden 2560, 32 layers, every
fourth full attention with 16 query / 4 KV heads of 256, linear attention 16 key / 32 value heads of 128, MLP
9216, tied embeddings, a 24-block 1024-wide vision tower); compare with the published config.json before quoting
figures. ``--preset tiny`` is the fixture's shape with random weights (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "qwen3_5" / "hf5"
MAX_SHARD_BYTES = 2 * 10**9
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}

PRESETS: dict[str, dict[str, Any]] = {
    "4b": dict(
        text=dict(
            hidden_size=2560,
            intermediate_size=9216,
            num_hidden_layers=32,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=256,
            linear_num_key_heads=16,
            linear_num_value_heads=32,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_conv_kernel_dim=4,
            full_attention_interval=4,
            vocab_size=248320,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10_000_000.0,
                "partial_rotary_factor": 0.25,
                "mrope_section": [11, 11, 10],
                "mrope_interleaved": True,
            },
        ),
        vision=dict(
            depth=24,
            hidden_size=1024,
            intermediate_size=4096,
            num_heads=16,
            out_hidden_size=2560,
            num_position_embeddings=2304,
        ),
        tie_word_embeddings=True,
    ),
    "tiny": dict(text={}, vision={}, tie_word_embeddings=False),  # the fixture's own sizes
}
PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": 3,
}
COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def build_config(preset: dict[str, Any], dtype: str) -> dict[str, Any]:
    config = json.loads((FIXTURE / "config.json").read_text())
    text = {k: v for k, v in config["text_config"].items() if k != "layer_types"}
    text.update(preset["text"], dtype=dtype)
    layers, interval = text["num_hidden_layers"], text["full_attention_interval"]
    text["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]
    text["tie_word_embeddings"] = preset["tie_word_embeddings"]
    vision = {**config["vision_config"], **preset["vision"]}
    return {
        **config,
        "text_config": text,
        "vision_config": vision,
        "dtype": dtype,
        "tie_word_embeddings": preset["tie_word_embeddings"],
    }


def published(name: str, value: mx.array, config: dict[str, Any]) -> mx.array:
    """Our tensor in the published checkpoints' shape."""
    vision = config["vision_config"]
    if name.endswith("linear_attn.conv1d.weight"):
        return value.swapaxes(1, 2)  # (channels, 1, kernel)
    if name.endswith("patch_embed.proj.weight"):
        p, t = vision["patch_size"], vision["temporal_patch_size"]
        return value.reshape(value.shape[0], vision["in_channels"], t, p, p)
    return value


def random_tensor(name: str, shape: tuple[int, ...], dtype: mx.Dtype, key: mx.array) -> mx.array:
    """Normal 1/sqrt(fan_in) weights; zero-centred norms and biases 0, other norms 1; the delta rule's decay rates
    A log-uniform in [1e-3, 16) (transformers' range) and dt_bias 1."""
    from vlm_models.models.qwen3_5 import is_centred_norm

    module, kind = name.rsplit(".", 2)[-2:]
    if name.endswith("A_log"):
        return mx.random.uniform(math.log(1e-3), math.log(16), shape, key=key).astype(dtype)
    if is_centred_norm(name) or kind == "bias":
        return mx.zeros(shape, dtype)
    if kind == "dt_bias" or module.startswith("norm"):
        return mx.ones(shape, dtype)
    return (mx.random.normal(shape, key=key) / math.sqrt(math.prod(shape[1:]) or 1)).astype(dtype)


def write_weights(config: dict[str, Any], out: Path, dtype: mx.Dtype, seed: int) -> int:
    from vlm_models.models.qwen3_5 import Model

    model = Model.from_hf_config(config)  # lazy: its own parameters are never evaluated
    specs = [(name, tuple(value.shape)) for name, value in tree_flatten(model.parameters())]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
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
    total, k = 0, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            tensors[name] = published(name, random_tensor(name, shape, dtype, keys[k]), config)
            k += 1
        mx.eval(tensors)
        mx.save_safetensors(str(out / file), tensors, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        index.update({n: file for n in tensors})
        print(f"wrote {file} ({len(shard)} tensors)", file=sys.stderr)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=2) + "\n"
    )
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        parser.error(f"{args.out} is not empty (pass --force to overwrite)")
    args.out.mkdir(parents=True, exist_ok=True)
    config = build_config(PRESETS[args.preset], args.dtype)
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    total = write_weights(config, args.out, DTYPES[args.dtype], args.seed)
    for name in COPIED:
        shutil.copy2(FIXTURE / name, args.out / name)
    (args.out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    params = total // DTYPES[args.dtype].size
    print(
        f"{args.out}: qwen3_5 preset={args.preset} dtype={args.dtype} params={params / 1e6:.1f}M ({total / 1e9:.2f} GB)"
    )


if __name__ == "__main__":
    main()

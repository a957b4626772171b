"""Write a random-weight Qwen2-VL checkpoint in the published Hugging Face (transformers 4.x) layout.

Only numpy and mlx are used (no torch); the writing is ``vlm_models.bench_shapes`` (what ``vlm bench --shape``
uses), here with a fixture's tokenizer by default. The folder looks like Qwen/Qwen2-VL-2B-Instruct as published:

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
from pathlib import Path

from vlm_models.bench_shapes import DTYPES, SHAPES, tokenizer_size, write_random_checkpoint

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURE = REPO / "tests" / "fixtures" / "qwen2_vl" / "hf4"
PRESETS = {"2b": "qwen2-vl-2b", "7b": "qwen2-vl-7b", "tiny": "tiny"}


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
    shape = dict(SHAPES[PRESETS[args.preset]], vision=dict(SHAPES[PRESETS[args.preset]]["vision"]))
    if args.text_layers is not None:
        shape["num_hidden_layers"] = args.text_layers
    if args.vision_depth is not None:
        shape["vision"]["depth"] = args.vision_depth
    if args.vocab_size is not None:
        shape["vocab_size"] = args.vocab_size
    elif shape["vocab_size"] is None:  # the fixture's own vocabulary (its config's, or its tokenizer's)
        fixture = json.loads((args.fixture / "config.json").read_text())
        declared = int({**fixture, **(fixture.get("text_config") or {})}.get("vocab_size", 0))
        shape["vocab_size"] = max(declared, tokenizer_size(args.fixture))
    try:
        config = write_random_checkpoint(
            shape, args.out, dtype=args.dtype, seed=args.seed, tokenizer_source=args.fixture, progress=print
        )
    except ValueError as error:
        parser.error(str(error))
    total = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))
    print(
        f"{args.out}: qwen2_vl preset={args.preset} dtype={args.dtype} params~{total / DTYPES[args.dtype].size / 1e6:.2f}M "
        f"({total / 1e9:.3f} GB) vocab={config['vocab_size']}"
    )


if __name__ == "__main__":
    main()

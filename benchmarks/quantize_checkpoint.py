"""Quantize a checkpoint with vlm's own quantization and write it in the MLX-community layout.

    python benchmarks/quantize_checkpoint.py SRC DST [--bits 4] [--group-size 64]

(`vlm convert -q` does the same, with more modes and options; this script stays for the benchmarks' recipes.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlm_models import load
from vlm_models.convert import save_model
from vlm_models.quantize import quantize_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    model, _ = load(args.src)
    quantization = quantize_model(model, bits=args.bits, group_size=args.group_size)
    config = json.loads((Path(args.src) / "config.json").read_text())
    print(save_model(model, args.dst, source=args.src, config=config, quantization=quantization))


if __name__ == "__main__":
    main()

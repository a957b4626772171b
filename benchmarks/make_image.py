"""Write a deterministic benchmark image (default: benchmarks/bench_448.png, 448x448 RGB).

A colour gradient with a few filled shapes, drawn with numpy + Pillow only, so the same bytes come out on
every machine. 448x448 is a multiple of 28 (patch 14 x merge 2): Qwen2-VL's processor keeps it as is and
gives 32x32 patches -> 256 image tokens.

    python benchmarks/make_image.py [--size 448] [--out benchmarks/bench_448.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_image(size: int = 448) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    rgb = np.stack([x, y, 1.0 - 0.5 * (x + y)], axis=-1)
    image = Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    s = size / 448
    draw.ellipse([60 * s, 60 * s, 200 * s, 200 * s], fill=(230, 40, 40))
    draw.rectangle([250 * s, 80 * s, 400 * s, 180 * s], fill=(40, 200, 60))
    draw.polygon([(100 * s, 400 * s), (220 * s, 250 * s), (340 * s, 400 * s)], fill=(250, 220, 30))
    for i in range(8):  # thin stripes: some high-frequency detail
        draw.line(
            [(300 * s, (230 + 20 * i) * s), (430 * s, (230 + 20 * i) * s)], fill=(0, 0, 0), width=max(1, int(3 * s))
        )
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(__file__).resolve().parent / f"bench_{args.size}.png"
    make_image(args.size).save(out, format="PNG", optimize=False)
    print(out)


if __name__ == "__main__":
    main()

"""Operations (graph nodes: on a GPU, roughly kernel launches) in one batch-1 decode step, with q/k/v and gate/up
fused and without. Device-independent: it counts the lazy graph of the step's logits (``mx.export_to_dot``),
without evaluating it, so it runs on any machine.

    python benchmarks/count_decode_ops.py --model /tmp/qwen2vl-tiny [--bits 4]
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections import Counter
from pathlib import Path

VIEWS = {"Reshape", "Transpose", "Slice", "Squeeze", "ExpandDims", "Broadcast", "AsStrided", "Split"}
"""Primitives that are (mostly) views, no kernel of their own."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--bits", type=int, default=None, help="quantize in memory first (affine, group 64)")
    parser.add_argument("--context", type=int, default=16)
    args = parser.parse_args(argv)

    import mlx.core as mx

    from vlm_models import load
    from vlm_models.nn.fused import fuse_projections, unfuse_projections
    from vlm_models.quantize import quantize_model
    from vlm_runtime import make_layer_caches
    from vlm_runtime.generate import prefill
    from vlm_runtime.protocols import PromptEmbedding

    model, _ = load(args.model)
    if args.bits:
        quantize_model(model, bits=args.bits, group_size=64)
    ids = mx.array([[(i * 7919) % 300 + 10 for i in range(args.context)]])

    def count(fused: bool) -> Counter:
        (fuse_projections if fused else unfuse_projections)(model)
        cache = make_layer_caches(model)
        prefill(model, PromptEmbedding(model.embed_tokens(ids)), cache, 2048)
        mx.eval([c.state for c in cache])
        hidden = model.hidden_states(model.embed_tokens(mx.array([[11]])), cache=cache)
        logits = model.compute_logits(hidden[:, -1, :])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "step.dot"
            mx.export_to_dot(str(path), logits)
            text = path.read_text()
        # Operation nodes are rectangles labelled by their primitive; arrays are the other nodes.
        return Counter(re.findall(r'label ="([A-Za-z]+)[^"]*", shape=rectangle', text))

    for fused in (False, True):
        ops = count(fused)
        compute = {k: n for k, n in ops.items() if k not in VIEWS}
        top = ", ".join(f"{name} {n}" for name, n in Counter(compute).most_common(8))
        print(
            f"{'fused' if fused else 'separate':9s} {sum(ops.values()):5d} operations per step, "
            f"{sum(compute.values()):5d} besides views ({top})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

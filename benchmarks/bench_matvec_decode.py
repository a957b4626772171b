"""Batch-1 decode before and after this branch's decode work, alternating in one process (paired runs):

* ``mlx``: MLX's ``quantized_matmul`` (``VLM_KERNELS_BACKEND=reference``), every projection on its own (the before);
* ``kernel``: ``vlm_kernels.quantized_matvec`` in the quantized layers (``VLM_KERNELS_BACKEND=cuda``), projections
  still separate;
* ``kernel+fused``: the kernel, and q/k/v and gate/up fused into one product each (fusing is the default after
  loading).

With ``--fusion-only`` (or ``--float``, which keeps the checkpoint float) the sides are ``separate`` / ``fused``, MLX's
products both: this one runs on any device.
Same prompt, same greedy loop as profile_decode.py's pipelined one (each step queued before the previous token is
read).

    python3 benchmarks/bench_matvec_decode.py --model /tmp/qwen2vl-2b-bf16 --bits 4 --group-size 64

A float checkpoint is quantized in memory first (unless --float). Reports tok/s per side (median over pairs), each
side's ratio to the first (median of per-pair ratios), the bytes of weights a token reads and the share of the
device's bandwidth that makes, and how far each side's first logits and greedy tokens agree with the first side's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--peak-gbs", type=float, default=None)
    parser.add_argument("--float", action="store_true", help="keep the checkpoint float (implies --fusion-only)")
    parser.add_argument(
        "--fusion-only",
        action="store_true",
        help="sides: separate vs fused projections, MLX's products both (any device)",
    )
    args = parser.parse_args(argv)

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from vlm_kernels import dispatch
    from vlm_kernels.bench import device_peak_gbs
    from vlm_models import load
    from vlm_models.nn.fused import fuse_projections
    from vlm_models.quantize import is_quantized, quantize_model
    from vlm_runtime import make_layer_caches
    from vlm_runtime.generate import prefill
    from vlm_runtime.protocols import PromptEmbedding

    model, _ = load(args.model)
    if not args.float and not is_quantized(model):
        quantize_model(model, bits=args.bits, group_size=args.group_size)
    fuse_projections(model)
    groups = [
        (module, name, getattr(module, name))
        for _, module in model.named_modules()
        for name in ("_qkv", "_gate_up")
        if getattr(module, name, None) is not None
    ]
    mx.eval(model.parameters())
    ids = mx.array([[(i * 7919) % 1000 + 10 for i in range(args.context)]])
    sides = ("separate", "fused") if args.float or args.fusion_only else ("mlx", "kernel", "kernel+fused")

    def use(side: str) -> None:
        if side == "mlx":
            os.environ[dispatch.BACKEND_ENV] = "reference"
        elif side.startswith("kernel"):
            os.environ[dispatch.BACKEND_ENV] = "cuda"  # whatever FAST_ROWS says: this measures the kernel
        else:
            os.environ.pop(dispatch.BACKEND_ENV, None)
        dispatch.reread_environment()
        fused = side in ("fused", "kernel+fused")
        for module, name, group in groups:
            setattr(module, name, group if fused else None)

    def step_fn(cache):
        return lambda token: model.compute_logits(
            model.hidden_states(model.embed_tokens(token[:, None]), cache=cache)[:, -1, :]
        )

    def run(side: str) -> tuple[float, list[int], mx.array]:
        use(side)
        cache = make_layer_caches(model)
        prefill(model, PromptEmbedding(model.embed_tokens(ids)), cache, 2048)
        mx.eval([c.state for c in cache])
        step = step_fn(cache)
        first = step(mx.array([11], mx.int32)).astype(mx.float32)
        nxt = mx.argmax(first, axis=-1)
        mx.eval(first, nxt)
        tokens = []
        tic = time.perf_counter()
        mx.async_eval(nxt)
        for _ in range(args.steps):
            following = mx.argmax(step(nxt), axis=-1)
            mx.async_eval(following)
            tokens.append(nxt.item())
            nxt = following
        tokens.append(nxt.item())
        return args.steps / (time.perf_counter() - tic), tokens, first

    for side in sides:  # warm up: kernels compile, graphs settle
        run(side)
    speeds: dict[str, list[float]] = {side: [] for side in sides}
    outputs = {}
    for _ in range(args.pairs):
        for side in sides:
            speed, tokens, first = run(side)
            speeds[side].append(speed)
            outputs[side] = (tokens, first)
    use(sides[-1])

    lm_bytes = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if "visual" not in k and "vision" not in k)
    peak = args.peak_gbs or device_peak_gbs()
    name = mx.device_info().get("device_name", "?")
    kind = "float" if args.float else f"{args.bits}-bit g{args.group_size}"
    print(
        f"{args.model} | {kind} | mlx {mx.__version__} on {name} | context {args.context} | {len(groups)} fused groups"
    )
    base = sides[0]
    tokens_base, first_base = outputs[base]
    for side in sides:
        tps = statistics.median(speeds[side])
        ratio = statistics.median(a / b for a, b in zip(speeds[side], speeds[base]))
        share = f", {100 * lm_bytes * tps / 1e9 / peak:.1f}% of {peak:.0f} GB/s" if peak else ""
        tokens, first = outputs[side]
        diff = float(mx.abs(first - first_base).max()) / max(float(mx.abs(first_base).max()), 1e-30)
        same = next((i for i, (a, b) in enumerate(zip(tokens, tokens_base)) if a != b), len(tokens))
        print(
            f"{side:13s} {tps:8.1f} tok/s {ratio:6.3f}x {base} (pairs {', '.join(f'{s:.1f}' for s in speeds[side])}"
            f"{share}); first logits off by {diff:.1e} of the largest; greedy tokens equal for {same}/{len(tokens)}"
        )
    print(f"weights read per token (decoder, embeddings, head): {lm_bytes / 1e9:.3f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Batch-1 decode with and without ``vlm_kernels.quantized_matvec`` in the quantized linear layers, alternating in
one process (a paired before/after): "kernel" is the default path on a CUDA GPU, "mlx" forces MLX's
``quantized_matmul`` (``VLM_KERNELS_BACKEND=reference``). Same prompt, same greedy loop as profile_decode.py's
pipelined one (each step queued before the previous token is read).

    python3 benchmarks/bench_matvec_decode.py --model /tmp/qwen2vl-2b-bf16 --bits 4 --group-size 64

A float checkpoint is quantized in memory first. Reports tok/s per side (median over pairs), the ratio, the bytes
of weights a token reads and the share of the device's bandwidth that makes, and how far the two sides' first
logits and greedy tokens agree.
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
    args = parser.parse_args(argv)

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from vlm_kernels import dispatch
    from vlm_kernels.bench import device_peak_gbs
    from vlm_models import load
    from vlm_models.quantize import is_quantized, quantize_model
    from vlm_runtime import make_layer_caches
    from vlm_runtime.generate import prefill
    from vlm_runtime.protocols import PromptEmbedding

    model, _ = load(args.model)
    if not is_quantized(model):
        quantize_model(model, bits=args.bits, group_size=args.group_size)
    mx.eval(model.parameters())
    ids = mx.array([[(i * 7919) % 1000 + 10 for i in range(args.context)]])

    def use(side: str) -> None:
        if side == "mlx":
            os.environ[dispatch.BACKEND_ENV] = "reference"
        else:
            os.environ.pop(dispatch.BACKEND_ENV, None)
        dispatch.reread_environment()

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

    for side in ("kernel", "mlx"):  # warm up: kernels compile, graphs settle
        run(side)
    speeds: dict[str, list[float]] = {"kernel": [], "mlx": []}
    ratios = []
    outputs = {}
    for _ in range(args.pairs):
        for side in ("kernel", "mlx"):
            speed, tokens, first = run(side)
            speeds[side].append(speed)
            outputs[side] = (tokens, first)
        ratios.append(speeds["kernel"][-1] / speeds["mlx"][-1])
    use("kernel")

    lm_bytes = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if "visual" not in k and "vision" not in k)
    peak = args.peak_gbs or device_peak_gbs()
    name = mx.device_info().get("device_name", "?")
    print(
        f"{args.model} | {args.bits}-bit g{args.group_size} | mlx {mx.__version__} on {name} | context {args.context}"
    )
    for side in ("kernel", "mlx"):
        tps = statistics.median(speeds[side])
        share = f", {100 * lm_bytes * tps / 1e9 / peak:.1f}% of {peak:.0f} GB/s" if peak else ""
        print(f"{side:7s} {tps:8.1f} tok/s  (pairs: {', '.join(f'{s:.1f}' for s in speeds[side])}{share})")
    print(f"kernel / mlx: {statistics.median(ratios):.3f}x (median of per-pair ratios)")
    print(f"weights read per token (decoder, embeddings, head): {lm_bytes / 1e9:.3f} GB")
    (tok_k, first_k), (tok_m, first_m) = outputs["kernel"], outputs["mlx"]
    diff = float(mx.abs(first_k - first_m).max()) / max(float(mx.abs(first_m).max()), 1e-30)
    same = next((i for i, (a, b) in enumerate(zip(tok_k, tok_m)) if a != b), len(tok_k))
    print(
        f"first-step logits: max difference {diff:.2e} of the largest; greedy tokens identical for {same} of {len(tok_k)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

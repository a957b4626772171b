"""How much quantizing the KV cache changes attention and generation: TurboQuant at 2 / 2.5 / 3 / 3.5 / 4 bits and
affine (mx.quantize) 4 / 8 bits, against float.

    uv run --frozen python benchmarks/kv_quality.py                  # both parts, this machine's CPU
    uv run --frozen python benchmarks/kv_quality.py --part attention --context 8192

(a) Attention output: one decode step over ``--context`` keys with the statistics of real keys — a few outlier
channels (5% of channels 10x larger) and per-channel offsets — and values around a non-zero mean; queries
(batch 1, 12 heads over 2 kv heads, head dim 128) from 8 seeds. Cosine similarity and relative error of each
scheme's output against attention over the same keys/values in float16.

(b) Generation, teacher-forced: the float cache generates ``--tokens`` greedy tokens; each quantized cache then
reads the same tokens one by one (so every step sees the same history) and we record the KL divergence of its
next-token distribution from the float one and whether its greedy choice is the float choice. On the shipped
demo model (head dim 32, with its example image) and the Qwen2-VL test fixture (random weights, head dim 16). An
affine cache needs the head dim to split into groups of 32 / 64 / 128: on the fixture it stays float (n/a).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

from vlm_kernels.decode_attention import affine_decode_attention, turboquant_decode_attention
from vlm_kernels.turboquant import turboquant_codec

REPO = Path(__file__).resolve().parent.parent
TURBOQUANT = {"2": (2, 2), "2.5 (K2 V3)": (2, 3), "3": (3, 3), "3.5 (K3 V4)": (3, 4), "4": (4, 4)}
AFFINE = {"affine 4 g64": (4, 64), "affine 8 g64": (8, 64)}


def outlier_kv(rng: np.random.Generator, context: int, dim: int = 128, kv_heads: int = 2) -> tuple[mx.array, mx.array]:
    loud = rng.random(dim) < 0.05
    keys = rng.standard_normal((1, kv_heads, context, dim)) * np.where(loud, 10.0, 1.0) + rng.normal(0, 2, dim)
    values = rng.standard_normal((1, kv_heads, context, dim)) + 0.5
    return mx.array(keys.astype(np.float32)), mx.array(values.astype(np.float32))


def float16_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    k, v = k.astype(mx.float16).astype(mx.float32), v.astype(mx.float16).astype(mx.float32)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_part(context: int, seeds: int) -> None:
    print(f"(a) attention output vs float16, one query per head, {context} keys with outlier channels")
    print(f"{'scheme':<26}{'cosine':>10}{'min cos':>10}{'rel. error':>12}")
    rows: dict[str, list[tuple[float, float]]] = {}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        keys, values = outlier_kv(rng, context)
        q = mx.array(rng.standard_normal((1, 12, 1, 128)).astype(np.float32))
        scale = 128**-0.5
        expected = np.array(float16_attention(q, keys, values, scale)).reshape(12, -1)
        outputs = {}
        for name, (key_bits, value_bits) in TURBOQUANT.items():
            kc, vc = turboquant_codec(128, key_bits, 0), turboquant_codec(128, value_bits, 1)
            outputs[f"turboquant {name}"] = turboquant_decode_attention(
                q, kc.encode(keys), vc.encode(values), kc, vc, scale=scale
            )
        for name, (bits, group) in AFFINE.items():
            quantized = [mx.quantize(a, group_size=group, bits=bits) for a in (keys, values)]
            outputs[name] = affine_decode_attention(q, *quantized, bits=bits, group_size=group, scale=scale)
        for name, out in outputs.items():
            got = np.array(out).reshape(12, -1)
            cosines = np.sum(got * expected, -1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)
            error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
            rows.setdefault(name, []).extend((c, error) for c in cosines)
    for name, values in rows.items():
        cosines = [c for c, _ in values]
        print(f"{name:<26}{np.mean(cosines):>10.4f}{np.min(cosines):>10.4f}{np.mean([e for _, e in values]):>12.4f}")


def _prompt(model_path: Path, image: Path | None):
    from vlm_models.chat import apply_chat_template
    from vlm_models.loading import load

    model, processor = load(str(model_path))
    text = apply_chat_template(processor, None, "Describe this image.", num_images=1 if image else 0)
    inputs = processor.prepare_inputs(text, [str(image)] if image else [])
    return model, inputs


def _run(model, inputs, settings, tokens: int, forced: list[int] | None) -> tuple[list[int], list[np.ndarray]]:
    from vlm_runtime.cache_settings import make_layer_caches
    from vlm_runtime.generate import GenerationConfig, generate_step
    from vlm_runtime.sampling import greedy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an affine cache on a too-small head dim says it keeps float
        cache = make_layer_caches(model, settings)
    script = iter(forced) if forced is not None else None
    override = (lambda _previous: next(script)) if script is not None else None
    chosen, logprobs = [], []
    config = GenerationConfig(max_tokens=tokens, ignore_eos=True)
    for _token, lp in generate_step(model, inputs, sampler=greedy, config=config, cache=cache, override=override):
        row = np.array(lp.astype(mx.float32)).reshape(-1)
        logprobs.append(row)
        chosen.append(int(row.argmax()))
    return chosen, logprobs


def generation_part(tokens: int) -> None:
    from vlm_models.demo import demo_model_path
    from vlm_runtime.cache_settings import CacheSettings

    models = {
        "demo model (shapes)": (demo_model_path(), REPO / "examples" / "shapes.png"),
        "qwen2_vl fixture": (REPO / "tests" / "fixtures" / "qwen2_vl" / "hf4", None),
    }
    schemes = {
        f"turboquant {n}": CacheSettings(kv_bits=None, kv_quant_scheme="turboquant", kv_key_bits=k, kv_value_bits=v)
        for n, (k, v) in TURBOQUANT.items()
    }
    schemes.update({name: CacheSettings(kv_bits=bits, kv_group_size=32) for name, (bits, _) in AFFINE.items()})
    print(f"\n(b) teacher-forced generation over {tokens} tokens vs the float cache (greedy)")
    for label, (path, image) in models.items():
        model, inputs = _prompt(path, image)
        head_dim = model.config.text.attention_head_dim
        reference, reference_lp = _run(model, inputs, CacheSettings(), tokens, None)
        print(f"{label}: head dim {head_dim}, prompt {inputs['input_ids'].size} tokens")
        print(f"  {'scheme':<26}{'mean KL':>10}{'max KL':>10}{'greedy agree':>14}")
        for name, settings in schemes.items():
            if name.startswith("affine") and head_dim % 32:
                print(f"  {name.replace('g64', 'g32'):<26}{'n/a: head dim below a group, the cache keeps float':>34}")
                continue
            choices, logprobs = _run(model, inputs, settings, tokens, reference)
            kl = [float(np.sum(np.exp(p) * (p - q))) for p, q in zip(reference_lp, logprobs)]
            agree = np.mean([a == b for a, b in zip(choices, reference)])
            print(f"  {name.replace('g64', 'g32'):<26}{np.mean(kl):>10.5f}{max(kl):>10.4f}{agree:>13.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["attention", "generation", "both"], default="both")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args(argv)
    print(f"device: {mx.default_device()}, mlx {mx.__version__}")
    if args.part in ("attention", "both"):
        attention_part(args.context, args.seeds)
    if args.part in ("generation", "both"):
        generation_part(args.tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

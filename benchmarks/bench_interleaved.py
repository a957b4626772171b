"""Ours and mlx-vlm in ONE process, run by run alternately: a paired A/B that survives a noisy host.

run_side_by_side.sh alternates whole processes (about ten seconds each); on a shared 2-core VM the speed drifts by
2-3x between such rounds. Here each pair (ours run, peer run) is a second apart and the result is the median of
the per-pair ratios, so slow phases hit both sides of a pair alike.

Needs a Python that imports both vlm_models/vlm_runtime and mlx_vlm, e.g. the mlx-vlm venv with our sources on
the path:

    PYTHONPATH=packages/vlm-models/src:packages/vlm-runtime/src /work/scratch/mlxvlm/bin/python \\
        benchmarks/bench_interleaved.py --model DIR --image benchmarks/bench_448.png --max-tokens 200 --pairs 30

Both sides get the same prompt string (the checkpoint's chat template over [image, text]), greedy decoding,
exactly N tokens (ours: ignore_eos; mlx-vlm: a never-stopping stopping_criteria), and are timed with the same
clock and definitions as ``vlm bench``: prompt tok/s = prompt tokens / (start -> first token), which includes the
vision tower; generation tok/s = (N - 1) / (first token -> last token). Before each pair both models run their
vision step alone (``embed_prompt`` / ``get_input_embeddings``), timed as vision_s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", default="Describe this image.")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--uncompiled", action="store_true", help="also time ours with compile_decode=False (the step built anew)"
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="time ours with compile_decode=True (default: the runtime's own choice, compiled on the CPU only)",
    )
    args = parser.parse_args(argv)

    import mlx.core as mx
    import mlx_vlm
    from mlx_vlm import load as peer_load
    from mlx_vlm import stream_generate as peer_stream
    from mlx_vlm.utils import prepare_inputs as peer_prepare

    from vlm_models.chat import apply_chat_template
    from vlm_models.loading import load as ours_load
    from vlm_runtime import stream_generate as ours_stream

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from bench_mlx_vlm import pad_detokenizer

    ours_model, ours_proc = ours_load(args.model)
    prompt = apply_chat_template(ours_proc, None, args.prompt, num_images=1)
    ours_inputs = ours_proc.prepare_inputs(prompt, [args.image])

    peer_model, peer_proc = peer_load(args.model)
    pad_detokenizer(peer_proc, peer_model)
    peer_tok = peer_proc.tokenizer
    peer_inputs = peer_prepare(peer_proc, images=[args.image], prompts=prompt, add_special_tokens=True)
    peer_extra = {k: v for k, v in peer_inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    n_prompt = int(ours_inputs["input_ids"].size)
    if int(peer_inputs["input_ids"].size) != n_prompt:
        print(
            f"warning: prompt lengths differ: ours {n_prompt}, peer {int(peer_inputs['input_ids'].size)}",
            file=sys.stderr,
        )

    def timed(stream) -> tuple[float, float, int]:
        started = time.perf_counter()
        first = last = started
        n = 0
        for result in stream:
            if result.token is None:
                continue
            now = time.perf_counter()
            if n == 0:
                first = now
            last = now
            n = result.generation_tokens
        return n_prompt / (first - started), (n - 1) / (last - first) if n > 1 else 0.0, n

    def ours_once(compiled: bool | None = True if args.compiled else None):
        tic = time.perf_counter()
        mx.eval(ours_model.embed_prompt(**ours_inputs).inputs_embeds)
        vision = time.perf_counter() - tic
        stream = ours_stream(
            ours_model,
            ours_proc,
            prompt,
            image=[args.image],
            max_tokens=args.max_tokens,
            ignore_eos=True,
            compile_decode=compiled,
        )
        return (vision, *timed(stream))

    def peer_once():
        tic = time.perf_counter()
        emb = peer_model.get_input_embeddings(
            peer_inputs["input_ids"], peer_inputs["pixel_values"], mask=peer_inputs["attention_mask"], **peer_extra
        )
        mx.eval(emb.inputs_embeds)
        vision = time.perf_counter() - tic
        peer_tok.stopping_criteria = lambda token: False
        stream = peer_stream(
            peer_model, peer_proc, prompt, image=[args.image], max_tokens=args.max_tokens, temperature=0.0
        )
        return (vision, *timed(stream))

    ours_rows, peer_rows, plain_rows = [], [], []
    for i in range(args.warmup + args.pairs):
        # Alternate which side goes first, so neither always runs right after the other's allocations.
        first, second = (ours_once, peer_once) if i % 2 == 0 else (peer_once, ours_once)
        a, b = first(), second()
        o, p = (a, b) if i % 2 == 0 else (b, a)
        plain = ours_once(compiled=False) if args.uncompiled else None
        if i >= args.warmup:
            ours_rows.append(o)
            peer_rows.append(p)
            if plain is not None:
                plain_rows.append(plain)
    bad = [r[3] for r in ours_rows + peer_rows + plain_rows if r[3] != args.max_tokens]
    if bad:
        print(f"warning: some runs generated {sorted(set(bad))} tokens, not {args.max_tokens}", file=sys.stderr)

    med = statistics.median
    names = ("vision_s", "prompt_tok/s", "generation_tok/s")
    print(
        f"ours vs mlx-vlm {mlx_vlm.__version__} | mlx {mx.__version__} | {mx.default_device()} | {args.model} | "
        f"prompt tokens {n_prompt} | {args.max_tokens} tokens | {args.pairs} pairs"
    )
    mode = "compile_decode=True" if args.compiled else "the default compile policy"
    print(f"{'':6s} " + " ".join(f"{n:>28s}" for n in names) + f"   (ours: {mode}; plain: compile_decode=False)")
    labelled = [("ours", ours_rows), ("peer", peer_rows)] + ([("plain", plain_rows)] if plain_rows else [])
    for label, rows in labelled:
        cells = []
        for k in range(3):
            values = [r[k] for r in rows]
            cells.append(f"{med(values):9.4g} [{min(values):.4g}-{max(values):.4g}]")
        print(f"{label:6s} " + " ".join(f"{c:>28s}" for c in cells))
    ratios = [[o[k] / p[k] for o, p in zip(ours_rows, peer_rows)] for k in range(3)]
    q = lambda v: statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0]] * 3  # noqa: E731
    print(
        "paired ratio ours/peer, median [IQR]: "
        + " | ".join(f"{n} {med(r):.2f}x [{q(r)[0]:.2f}-{q(r)[2]:.2f}]" for n, r in zip(names, ratios))
    )
    print(
        f"median: ours prompt {med(r[1] for r in ours_rows):.1f} tok/s | generation {med(r[2] for r in ours_rows):.1f}"
        f" tok/s || peer prompt {med(r[1] for r in peer_rows):.1f} tok/s | generation "
        f"{med(r[2] for r in peer_rows):.1f} tok/s"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

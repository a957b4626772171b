"""Benchmark the peer, mlx-vlm, on a checkpoint: the same measurements and output as ``vlm bench``.

Run it with a Python where mlx-vlm is installed (never a dependency of this project):

    /work/scratch/mlxvlm/bin/python benchmarks/bench_mlx_vlm.py --model DIR --image benchmarks/bench_448.png \
        --prompt "Describe this image." --max-tokens 200 --runs 3 --warmup 1

What it does, per run (warm-up runs first, then the timed ones):

* vision: ``model.get_input_embeddings`` on the prepared inputs (vision tower + token embedding + merge +
  M-RoPE positions), evaluated; the same span ``vlm bench`` times with ``embed_prompt``;
* generation: ``mlx_vlm.stream_generate`` with temperature 0 (greedy; passed explicitly because mlx-vlm
  otherwise takes the sampling settings from generation_config.json), ``max_tokens`` N. mlx-vlm has no
  ignore-EOS option, so the tokenizer's ``stopping_criteria`` (which ``stream_generate`` calls on every token)
  is replaced by one that never stops; the script checks that exactly N tokens came out.
* a random-weight model can pick padding ids past the tokenizer's vocabulary, which crash mlx-vlm's streaming
  detokenizer (IndexError in tokenizer_utils.BPEStreamingDetokenizer.add_token); ``pad_detokenizer`` extends
  its id->text map first (no cost per token).

Figures, defined as in ``vlm bench``: prompt tok/s = prompt tokens / (start of generation -> first token),
which includes the vision tower and prefill; generation tok/s = (tokens - 1) / (first token -> last token);
peak = mx.get_peak_memory() over the run (reset before it). mlx-vlm's own generation_tps divides N tokens by
the time after the first token (N/(N-1) higher); it is printed in the per-run table as ``own_gen_tok/s``.
"""

from __future__ import annotations

import argparse
import sys
import time


def pad_detokenizer(processor, model) -> None:
    """mlx-vlm's BPE streaming detokenizer indexes a list built from the tokenizer's vocabulary, so a token id
    past the tokenizer (the model's vocab is padded: 151936 vs 151665 tokens for Qwen2-VL) raises IndexError.
    Trained weights never pick those ids; random weights can. Extend the list with a placeholder."""
    detokenizer = getattr(processor, "detokenizer", None)
    tokenmap = getattr(detokenizer, "tokenmap", None)
    config = getattr(model.config, "text_config", None) or model.config
    vocab = getattr(config, "vocab_size", None)
    if isinstance(tokenmap, list) and vocab and len(tokenmap) < vocab:
        print(f"note: padding mlx-vlm's detokenizer map from {len(tokenmap)} to {vocab} ids", file=sys.stderr)
        tokenmap.extend(["?"] * (vocab - len(tokenmap)))
        for name in ("is_byte_token", "byte_value"):  # the SentencePiece variant's side tables
            table = getattr(detokenizer, name, None)
            if isinstance(table, list):
                table.extend([False if name == "is_byte_token" else 0] * (vocab - len(table)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", action="append", default=[])
    parser.add_argument("--prompt", default="Describe this image.")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prefill-step-size", type=int, default=None, help="mlx-vlm's default when unset")
    parser.add_argument("--show-text", action="store_true", help="print the text of the last run")
    parser.add_argument(
        "--prompt-format",
        choices=("image-first", "mlx-vlm"),
        default="image-first",
        help="image-first (default): the checkpoint's chat template over [images..., text], the prompt "
        "`vlm bench` builds; mlx-vlm: mlx_vlm.prompt_utils.apply_chat_template (puts the text before the image "
        "for qwen2_vl, same token count)",
    )
    args = parser.parse_args(argv)

    import mlx.core as mx
    import mlx_vlm
    from mlx_vlm import load, stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import prepare_inputs

    model, processor = load(args.model)
    config = model.config
    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    if args.prompt_format == "mlx-vlm":
        prompt = apply_chat_template(processor, config, args.prompt, num_images=len(args.image))
    else:
        content = [{"type": "image"} for _ in args.image] + [{"type": "text", "text": args.prompt}]
        template = getattr(processor, "chat_template", None) or tokenizer.chat_template
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], chat_template=template, tokenize=False, add_generation_prompt=True
        )

    pad_detokenizer(processor, model)
    inputs = prepare_inputs(processor, images=args.image or None, prompts=prompt, add_special_tokens=True)
    input_ids = inputs["input_ids"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}

    gen_kwargs = {"max_tokens": args.max_tokens, "temperature": 0.0}
    if args.prefill_step_size is not None:
        gen_kwargs["prefill_step_size"] = args.prefill_step_size

    rows = []
    text = ""
    for run in range(args.warmup + args.runs):
        vision_s = None
        if args.image:
            tic = time.perf_counter()
            emb = model.get_input_embeddings(
                input_ids, inputs.get("pixel_values"), mask=inputs.get("attention_mask"), **extra
            )
            mx.eval(emb.inputs_embeds)
            vision_s = time.perf_counter() - tic
            del emb

        tokenizer.stopping_criteria = lambda token: False  # no ignore-EOS option in mlx-vlm: never stop
        mx.reset_peak_memory()
        parts = []
        last = None
        n = 0
        started = time.perf_counter()
        first = last_at = started
        for last in stream_generate(model, processor, prompt, image=args.image or None, **gen_kwargs):
            now = time.perf_counter()
            if last.token is None:
                continue
            if n == 0:
                first = now
            n = last.generation_tokens
            last_at = now
            parts.append(last.text)
        assert last is not None
        peak = mx.get_peak_memory() / 1e9
        prompt_tokens = last.prompt_tokens
        prompt_tps = prompt_tokens / (first - started)
        gen_tps = (n - 1) / (last_at - first) if n > 1 and last_at > first else 0.0
        if n != args.max_tokens:
            print(f"warning: run {run} generated {n} tokens, not {args.max_tokens}", file=sys.stderr)
        if run >= args.warmup:
            rows.append((vision_s, prompt_tps, gen_tps, last.generation_tps, peak, n, last.prompt_tps))
        text = "".join(parts)

    print(
        f"mlx-vlm {mlx_vlm.__version__} | mlx {mx.__version__} | device {mx.default_device()} | model: {args.model} "
        f"| prompt tokens: {int(input_ids.size)} | images: {len(args.image)}"
    )
    print("run  vision_s  prompt_tok/s  gen_tok/s  own_gen_tok/s  peak_GB  gen_tokens")
    for i, (v, p, g, own, m, n, _) in enumerate(rows):
        vs = f"{v:8.4f}" if v is not None else "       -"
        print(f"{i:>3}  {vs}  {p:12.1f}  {g:9.1f}  {own:13.1f}  {m:7.3f}  {n:10d}")
    mid = sorted(rows, key=lambda r: r[2])[len(rows) // 2]
    vision = f"vision {mid[0]:.4f} s | " if mid[0] is not None else ""
    print(
        f"median: {vision}prompt {mid[1]:.1f} tok/s | generation {mid[2]:.1f} tok/s | peak {mid[4]:.3f} GB"
        f" | tokens {mid[5]}"
    )
    if args.show_text:
        print(f"prompt: {prompt!r}")
        print(f"text: {text!r}")
    return 0 if all(r[5] == args.max_tokens for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

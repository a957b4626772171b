"""Speculative decoding against plain decoding on one target: generation tok/s, and the drafter's acceptance.

Runs alternate (plain, speculative, plain, ...) in one process; each generates exactly ``--max-tokens`` greedy
tokens from the same image prompt, and the speculative run's tokens are checked equal to the plain run's.
``--draft-model`` may be the target itself (every proposal right: what verifying in blocks costs or saves at
best), a smaller sibling, an EAGLE-3 head, or ``random`` (a drafter proposing random tokens: the cost of a
useless drafter, which the draft schedule should keep near zero). ``--batch N`` runs N requests together in the
batching engine instead (the image prompt and N - 1 text prompts of other lengths), each row drafting its own
tokens, and checks every row's tokens.

    uv run --frozen python benchmarks/bench_speculative.py --model packages/vlm-models/src/vlm_models/demo_model \\
        --draft-model random --image examples/shapes.png --max-tokens 128 --runs 3 [--batch 4]
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Mapping, Sequence


class RandomDrafter:
    """Proposes uniformly random token ids: a drafter that is always wrong."""

    target_layers: tuple[int, ...] = ()

    def __init__(self, vocab: int, seed: int = 0) -> None:
        self.vocab, self.seed, self.rng = vocab, seed, random.Random(seed)

    def spawn(self) -> RandomDrafter:
        return RandomDrafter(self.vocab, self.seed + 1)

    def begin(self, inputs: Mapping, features: object = None) -> None:
        pass

    def propose(self, emitted: Sequence[int], n: int, features: object = None, mask: object = None) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--draft-model", required=True, help="a folder, or 'random'")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", default="What shapes are in this image?")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=0, help="N requests together in the batching engine")
    args = parser.parse_args(argv)

    from vlm_models import apply_chat_template, load
    from vlm_models.drafting import load_drafter
    from vlm_runtime import stream_generate

    model, processor = load(args.model)
    if args.draft_model == "random":
        drafter = RandomDrafter(len(processor.tokenizer.get_vocab()))
    else:
        drafter, _ = load_drafter(args.draft_model, target_processor=processor, target=model)
    prompt = apply_chat_template(processor, None, args.prompt, num_images=1)
    if args.batch:
        return batched(args, model, processor, prompt, drafter)

    def once(draft) -> tuple[float, list[int], object]:
        results = list(
            stream_generate(
                model,
                processor,
                prompt,
                image=[args.image],
                max_tokens=args.max_tokens,
                ignore_eos=True,
                draft_model=draft,
                num_draft_tokens=args.num_draft_tokens,
            )
        )
        return results[-1].generation_tps, [r.token for r in results], results[-1]

    once(None), once(drafter)  # warm up
    plain, fast = [], []
    last = None
    for _ in range(args.runs):
        tps, reference, _ = once(None)
        plain.append(tps)
        tps, tokens, last = once(drafter)
        fast.append(tps)
        if tokens != reference:
            raise SystemExit("speculative decoding changed the tokens: a bug")
    ratio = [f / p for f, p in zip(fast, plain)]
    rate = last.accepted_draft_tokens / last.draft_tokens if last.draft_tokens else 0.0
    print(f"target {args.model} | drafter {args.draft_model} | {args.max_tokens} tokens | {args.runs} runs")
    print(
        f"plain {statistics.median(plain):.1f} tok/s | speculative {statistics.median(fast):.1f} tok/s | "
        f"ratio {statistics.median(ratio):.2f}x | drafted {last.draft_tokens}, accepted {last.accepted_draft_tokens} "
        f"({rate:.0%}) in the last run"
    )
    return 0


def batched(args: argparse.Namespace, model, processor, prompt: str, drafter) -> int:
    """Plain against speculative batched decoding: all rows' tokens per second of wall time."""
    import time

    from vlm_models import apply_chat_template
    from vlm_runtime import batch_generate

    texts = [prompt] + [
        apply_chat_template(processor, None, f"Question {i}: {'tell me about shapes ' * i}", num_images=0)
        for i in range(1, args.batch)
    ]
    images = [[args.image]] + [None] * (args.batch - 1)

    def once(draft) -> tuple[float, list[str], list]:
        started = time.perf_counter()
        results = batch_generate(
            model,
            processor,
            texts,
            images=images,
            max_tokens=args.max_tokens,
            ignore_eos=True,
            draft_model=draft,
            num_draft_tokens=args.num_draft_tokens,
        )
        elapsed = time.perf_counter() - started
        return sum(r.generation_tokens for r in results) / elapsed, [r.text for r in results], results

    once(None), once(drafter)  # warm up
    plain, fast = [], []
    for _ in range(args.runs):
        tps, reference, _ = once(None)
        plain.append(tps)
        tps, answers, results = once(drafter)
        fast.append(tps)
        if answers != reference:
            raise SystemExit("speculative decoding changed a row's tokens: a bug")
    ratio = [f / p for f, p in zip(fast, plain)]
    drafted = sum(r.draft_tokens for r in results)
    accepted = sum(r.accepted_draft_tokens for r in results)
    rate = accepted / drafted if drafted else 0.0
    print(f"target {args.model} | drafter {args.draft_model} | batch {args.batch} x {args.max_tokens} tokens")
    print(
        f"plain {statistics.median(plain):.1f} tok/s | speculative {statistics.median(fast):.1f} tok/s | "
        f"ratio {statistics.median(ratio):.2f}x | drafted {drafted}, accepted {accepted} ({rate:.0%}) in the last run"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

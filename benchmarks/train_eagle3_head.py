"""Distil an EAGLE-3 head from a target's own greedy outputs on the synthetic shapes data, and write it in the
speculators layout (what ``--draft-model`` loads as the ``eagle3`` kind).

Each sample: a fresh shapes image and question, the target's greedy answer (``--answer-tokens`` of it, end of
sequence ignored, as the speed benchmark decodes), and the target's hidden states entering ``--layers`` at every
position. The head learns, at position j, the target's token j+2 from (token j+1, features j): one step of
teacher forcing (no training-time test), so proposals past the first are drafted from the head's own outputs,
on which it was not trained; its draft vocabulary is the target's whole vocabulary (no ``d2t``).

    uv run --frozen python benchmarks/train_eagle3_head.py --model packages/vlm-models/src/vlm_models/demo_model \\
        --output /tmp/demo-eagle3 --layers 1,3,5 --samples 256 --steps 600
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def samples(model, processor, count: int, answer_tokens: int, layers: tuple[int, ...], seed: int) -> list:
    """(tokens, features, first answer position) per sample."""
    import mlx.core as mx
    import numpy as np

    from vlm_models import apply_chat_template
    from vlm_runtime import stream_generate
    from vlm_runtime.prefill import prefill_with_layers
    from vlm_runtime.speculative import target_forward
    from vlm_train.shapes import questions, random_scene, render

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        scene = random_scene(rng)
        asked = questions(scene)
        question = asked[int(rng.integers(len(asked)))][0]
        image = render(scene)
        prompt = apply_chat_template(processor, None, question, num_images=1)
        inputs = processor.prepare_inputs(prompt, [image])
        answer = [
            r.token
            for r in stream_generate(model, processor, prompt, image=[image], max_tokens=answer_tokens, ignore_eos=True)
        ]
        cache = model.make_cache()
        _, prompt_features = prefill_with_layers(model, model.embed_prompt(**inputs), cache, 4096, layers)
        _, answer_features = target_forward(model, model.embed_tokens(mx.array([answer[:-1]])), cache, layers)
        tokens = [int(t) for t in inputs["input_ids"][0].tolist()] + answer
        features = mx.concatenate([prompt_features, answer_features], axis=1)
        mx.eval(features)
        out.append((tokens, features, inputs["input_ids"].shape[1]))
    return out


def train(args: argparse.Namespace) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np

    from vlm_models import load
    from vlm_models.eagle3 import Eagle3Config, Eagle3Head
    from vlm_runtime import KVCache

    model, processor = load(args.model)
    text = json.loads((Path(args.model) / "config.json").read_text())
    text = text.get("text_config") or text
    hidden, vocab = int(text["hidden_size"]), int(text["vocab_size"])
    layers = tuple(int(i) for i in args.layers.split(","))
    heads = int(text["num_attention_heads"])
    config = Eagle3Config(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=int(text.get("num_key_value_heads", heads)),
        head_dim=hidden // heads,
        intermediate_size=int(text["intermediate_size"]),
        vocab_size=vocab,
        draft_vocab_size=vocab,
        target_hidden_size=hidden,
        target_layers=layers,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=10000.0,
    )
    data = samples(model, processor, args.samples, args.answer_tokens, layers, args.seed)
    head = Eagle3Head(config, with_embeddings=False)
    mx.random.seed(args.seed)

    def loss_fn(head, tokens, features, start):
        embeds = mx.stop_gradient(model.embed_tokens(mx.array([tokens[1:]])))
        h = head.step(embeds, head.fc(features), KVCache(), 0)
        logits = head.draft_logits(h[:, start - 1 : -1])  # positions whose target (token j+2) is an answer token
        targets = mx.array([tokens[start + 1 :]])
        return nn.losses.cross_entropy(logits, targets).mean()

    grad = nn.value_and_grad(head, loss_fn)
    optimizer = optim.AdamW(learning_rate=args.learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    for step in range(1, args.steps + 1):
        tokens, features, start = data[int(rng.integers(len(data)))]
        loss, grads = grad(head, tokens, features, start)
        optimizer.update(head, grads)
        mx.eval(head.parameters(), optimizer.state)
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.3f}")
    write(head, config, Path(args.output))


def write(head, config, folder: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(head.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    layer = {
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": 1,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "hidden_act": "silu",
    }
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["Eagle3Speculator"],
                "speculators_model_type": "eagle3",
                "draft_vocab_size": config.draft_vocab_size,
                "target_hidden_size": config.target_hidden_size,
                "eagle_aux_hidden_state_layer_ids": list(config.target_layers),
                "norm_before_residual": False,
                "transformer_layer_config": layer,
            },
            indent=2,
        )
    )
    print(f"wrote {folder}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--layers", default="1,3,5", help="target layers whose inputs the head reads")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--answer-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    train(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

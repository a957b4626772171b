"""The training loop: LoRA, QLoRA and full fine-tuning learn; accumulation, checkpointing, schedules and
validation do what they claim; resume continues exactly."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from vlm_models import load
from vlm_models.adapters import LoRAConfig, LoRALinear
from vlm_train.config import QuantizationConfig, TrainingConfig
from vlm_train.data import collate
from vlm_train.trainer import Trainer

from .conftest import FLOAT_MODEL, QUANTIZED_MODEL, probe_logits, small_dataset


def make_trainer(tmp_path: Path, model_path: Path = FLOAT_MODEL, **overrides) -> Trainer:
    values = dict(
        model=str(model_path),
        output=str(tmp_path / "out"),
        steps=12,
        batch_size=2,
        learning_rate=1e-2,
        progress=False,
    )
    values.update(overrides)
    if "train_data" not in values:
        values["train_data"] = str(small_dataset(tmp_path / "data"))
    model, processor = load(model_path)
    return Trainer(model, processor, TrainingConfig(**values), report=lambda message: None)


def frozen_weights(model: nn.Module) -> dict[str, np.ndarray]:
    trainable = set(dict(tree_flatten(model.trainable_parameters())))
    return {k: np.array(v) for k, v in tree_flatten(model.parameters()) if k not in trainable}


def test_lora_reduces_the_training_loss_and_touches_only_adapters(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    before_loss = trainer.evaluate(trainer.train_samples)
    frozen = frozen_weights(trainer.model)
    trainable = dict(tree_flatten(trainer.model.trainable_parameters()))
    assert trainable and all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    trainer.run()
    after_loss = trainer.evaluate(trainer.train_samples)
    assert after_loss < 0.5 * before_loss, (before_loss, after_loss)
    for key, value in frozen_weights(trainer.model).items():
        assert np.array_equal(value, frozen[key]), f"{key} changed"
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"adapters.safetensors", "adapter_config.json", "loss.png"}


def test_qlora_on_a_4bit_base(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, QUANTIZED_MODEL, fine_tune_type="qlora")
    lora_layers = [m for _, m in trainer.model.named_modules() if isinstance(m, LoRALinear)]
    assert lora_layers and all(isinstance(m.linear, nn.QuantizedLinear) for m in lora_layers)
    assert trainer.base_quantization is None  # already quantized: used as loaded
    before_loss = trainer.evaluate(trainer.train_samples)
    frozen = frozen_weights(trainer.model)
    trainer.run()
    assert trainer.evaluate(trainer.train_samples) < 0.5 * before_loss
    for key, value in frozen_weights(trainer.model).items():
        assert np.array_equal(value, frozen[key]), f"{key} changed"
    reloaded, processor = load(QUANTIZED_MODEL, adapter_path=tmp_path / "out")
    np.testing.assert_allclose(
        np.array(probe_logits(reloaded, processor)), np.array(probe_logits(trainer.model, processor)), atol=1e-5
    )


def test_qlora_quantizes_a_float_base_and_loading_does_the_same(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, fine_tune_type="qlora", quantization=QuantizationConfig(bits=4, group_size=32))
    assert trainer.base_quantization == {"bits": 4, "group_size": 32, "mode": "affine"}
    trainer.run()
    reloaded, processor = load(FLOAT_MODEL, adapter_path=tmp_path / "out")
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in reloaded.named_modules())
    np.testing.assert_allclose(
        np.array(probe_logits(reloaded, processor)), np.array(probe_logits(trainer.model, processor)), atol=1e-5
    )


def test_full_fine_tuning(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, fine_tune_type="full", learning_rate=3e-3)
    n_trainable = len(tree_flatten(trainer.model.trainable_parameters()))
    assert n_trainable == len(tree_flatten(trainer.model.parameters()))
    before_loss = trainer.evaluate(trainer.train_samples)
    trainer.run()
    assert trainer.evaluate(trainer.train_samples) < 0.5 * before_loss
    reloaded, processor = load(FLOAT_MODEL, adapter_path=tmp_path / "out")
    np.testing.assert_allclose(
        np.array(probe_logits(reloaded, processor)), np.array(probe_logits(trainer.model, processor)), atol=1e-5
    )


def test_full_fine_tuning_refuses_a_quantized_base(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quantized"):
        make_trainer(tmp_path, QUANTIZED_MODEL, fine_tune_type="full")


def test_accumulated_micro_batches_equal_one_padded_batch(tmp_path: Path) -> None:
    """Two micro-batches of one sample give the update of one right-padded batch of both: the loss is weighted
    by assistant tokens and padding contributes nothing."""
    big = make_trainer(tmp_path / "a", batch_size=2, grad_accumulation=1, steps=1)
    small = make_trainer(tmp_path / "b", batch_size=1, grad_accumulation=2, steps=1)
    first, second = sorted(big.train_samples, key=len)[0], sorted(big.train_samples, key=len)[-1]
    assert len(first) != len(second)
    big.micro_batch = lambda index: collate([first, second], big.pad_id, big.image_processor)
    small.micro_batch = lambda index: collate([[first], [second]][index], small.pad_id, small.image_processor)
    grads_big, loss_big, _ = big.gradients()
    grads_small, loss_small, _ = small.gradients()
    assert loss_big == pytest.approx(loss_small, rel=1e-5)
    a, b = dict(tree_flatten(grads_big)), dict(tree_flatten(grads_small))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(np.array(a[key]), np.array(b[key]), rtol=1e-4, atol=1e-7, err_msg=key)


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path: Path) -> None:
    plain = make_trainer(tmp_path / "a", steps=3)
    checkpointed = make_trainer(tmp_path / "b", steps=3, grad_checkpoint=True)
    assert any(type(m).__name__.startswith("Checkpointed") for _, m in checkpointed.model.named_modules())
    losses_plain = [plain.train_step()["loss"] for _ in range(3)]
    losses_checkpointed = [checkpointed.train_step()["loss"] for _ in range(3)]
    np.testing.assert_allclose(losses_checkpointed, losses_plain, rtol=1e-5)


def test_warmup_then_cosine_decay(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=10, warmup_steps=4, learning_rate=1e-3)
    result = trainer.run()
    rates = [h["learning_rate"] for h in result.history]
    assert all(a < b for a, b in itertools.pairwise(rates[:5])), rates
    assert rates[4] == pytest.approx(1e-3)
    assert all(a > b for a, b in itertools.pairwise(rates[4:])), rates


def test_validation_runs_every_n_steps(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=5, val_every=2)
    result = trainer.run()
    assert [v["step"] for v in result.validation] == [2, 4, 5]
    assert result.validation[-1]["val_loss"] == pytest.approx(trainer.evaluate(), rel=1e-6)
    assert result.validation[0]["val_loss"] != result.validation[-1]["val_loss"]


def test_val_every_without_validation_data(tmp_path: Path) -> None:
    data = small_dataset(tmp_path / "data")
    (data / "valid.jsonl").unlink()
    with pytest.raises(ValueError, match="validation data"):
        make_trainer(tmp_path, val_every=2, train_data=str(data))


def test_resume_continues_from_the_same_step_and_loss(tmp_path: Path) -> None:
    lora = LoRAConfig(rank=4, dropout=0.1)  # dropout: the resumed run must also draw the same masks
    straight = make_trainer(tmp_path / "a", steps=6, save_every=3, lora=lora).run()
    checkpoint = tmp_path / "a" / "out" / "checkpoints" / "step_0000003"
    assert (checkpoint / "optimizer.safetensors").is_file()
    resumed_trainer = make_trainer(tmp_path / "b", steps=6, save_every=3, lora=lora, resume_from=str(checkpoint))
    resumed = resumed_trainer.run()
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([h["loss"] for h in resumed.history], [h["loss"] for h in straight.history], rtol=1e-5)
    a = mx.load(str(tmp_path / "a" / "out" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "out" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(np.array(a[key]), np.array(b[key]), atol=1e-6, err_msg=key)


def test_resume_refuses_a_different_run(tmp_path: Path) -> None:
    make_trainer(tmp_path / "a", steps=4, save_every=2).run()
    checkpoint = tmp_path / "a" / "out" / "checkpoints" / "step_0000002"
    trainer = make_trainer(tmp_path / "b", steps=4, resume_from=str(checkpoint), lora=LoRAConfig(rank=4))
    with pytest.raises(ValueError, match="lora"):
        trainer.run()
    final = make_trainer(tmp_path / "c", steps=4, resume_from=str(tmp_path / "a" / "out"))
    with pytest.raises(ValueError, match="not a resumable checkpoint"):
        final.run()


def test_an_interrupted_run_leaves_a_resumable_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=6)
    real_step = trainer.train_step

    def step_then_interrupt():
        if trainer.step == 2:
            raise KeyboardInterrupt
        return real_step()

    trainer.train_step = step_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    checkpoint = tmp_path / "out" / "checkpoints" / "step_0000002"
    assert (checkpoint / "adapters.safetensors").is_file()
    resumed = make_trainer(tmp_path / "again", steps=6, resume_from=str(checkpoint)).run()
    assert resumed.steps == 6 and len(resumed.history) == 6


@pytest.mark.parametrize(
    "overrides",
    [
        {"steps": 0},
        {"fine_tune_type": "dora"},
        {"on_bad_sample": "ignore"},
        {"warmup_steps": 100},
        {"learning_rate": 0},
    ],
)
def test_invalid_training_config(tmp_path: Path, overrides) -> None:
    base = TrainingConfig(model="m", train_data="d")
    with pytest.raises(ValueError):
        dataclasses.replace(base, **overrides)


def test_vision_tower_and_projector_adapters_learn(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=2, lora=LoRAConfig(targets=("vision", "projector")))
    before = {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}
    assert before and all(k.startswith("model.visual.") for k in before)
    trainer.run()
    after = dict(tree_flatten(trainer.model.trainable_parameters()))
    changed = {k for k in before if not np.array_equal(before[k], np.array(after[k]))}
    assert any(".merger." in k for k in changed) and any(".blocks." in k for k in changed)

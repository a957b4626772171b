"""The training loop: LoRA, QLoRA or full fine-tuning with gradient accumulation, a warm-up schedule,
validation, resumable checkpoints and a loss curve."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from vlm_models.adapters import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, apply_lora
from vlm_models.quantize import quantize_model

from .config import TrainingConfig
from .data import BadSample, Batch, EncodedSample, collate, epoch_batches, load_samples, resolve_data_files

__all__ = ["TrainResult", "Trainer", "prepare_model", "sample_loss", "token_losses", "train"]

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
LOSS_CURVE_FILE = "loss.png"


def _is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def prepare_model(model: nn.Module, config: TrainingConfig) -> dict[str, Any] | None:
    """Freeze the base and make the chosen parameters trainable; returns the quantization QLoRA applied to a
    float base (``None`` when the base was used as loaded)."""
    applied = None
    if config.fine_tune_type == "full":
        if _is_quantized(model):
            raise ValueError(
                "full fine-tuning needs a float checkpoint; this one is quantized (use --fine-tune-type qlora)"
            )
        model.unfreeze()
        return None
    if config.fine_tune_type == "qlora" and not _is_quantized(model):
        q = config.quantization
        applied = quantize_model(model, bits=q.bits, group_size=q.group_size)
    model.freeze()
    mx.random.seed(config.seed)  # the adapters' initial values depend on the seed only
    apply_lora(model, config.lora)
    return applied


def token_losses(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array]:
    """(batch, length - 1) next-token cross-entropy of every token after the first, and the float mask of the
    assistant tokens among them."""
    logits = model(**batch.model_inputs()).logits
    losses = nn.losses.cross_entropy(logits[:, :-1].astype(mx.float32), batch.input_ids[:, 1:])
    return losses, batch.loss_mask[:, 1:].astype(mx.float32)


def sample_loss(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array]:
    """Mean next-token cross-entropy over the assistant tokens, and how many there were."""
    losses, mask = token_losses(model, batch)
    n = mask.sum()
    return (losses * mask).sum() / mx.maximum(n, 1.0), n


# ------------------------------------------------------------------------------------- gradient checkpointing

_CHECKPOINTED: dict[type, type] = {}
_BLOCK_PATH = re.compile(r"\.(layers|blocks)\.\d+$")


def _checkpointed(cls: type) -> type:
    """A subclass whose call recomputes its activations in the backward pass instead of storing them."""
    if cls not in _CHECKPOINTED:

        def __call__(self: nn.Module, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
            def inner(params: dict, x: mx.array) -> mx.array:
                self.update(params)
                return cls.__call__(self, x, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), x)

        _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})
    return _CHECKPOINTED[cls]


def enable_grad_checkpoint(model: nn.Module) -> int:
    """Checkpoint every transformer block (``*.layers.N`` and ``*.blocks.N``), per instance; returns how many."""
    count = 0
    for path, module in model.named_modules():
        if _BLOCK_PATH.search(path) and type(module) not in _CHECKPOINTED.values():
            module.__class__ = _checkpointed(type(module))
            count += 1
    return count


# -------------------------------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    output: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    """One entry per optimizer step: step, loss, learning_rate, tokens, tokens_per_s, peak_memory_gb."""
    validation: list[dict[str, float]] = field(default_factory=list)
    """step, val_loss."""
    skipped: list[BadSample] = field(default_factory=list)


def _schedule(config: TrainingConfig) -> Callable[[mx.array], mx.array] | float:
    lr, decay_steps = config.learning_rate, max(config.steps - config.warmup_steps, 1)
    if config.lr_schedule == "cosine":
        main: Any = optim.cosine_decay(lr, decay_steps, config.min_learning_rate)
    elif config.lr_schedule == "linear":
        main = optim.linear_schedule(lr, config.min_learning_rate, decay_steps)
    else:

        def main(step: mx.array) -> mx.array:
            return mx.array(lr)

    if config.warmup_steps == 0:
        return main
    warmup = optim.linear_schedule(lr / (config.warmup_steps + 1), lr, config.warmup_steps)
    return optim.join_schedules([warmup, main], [config.warmup_steps])


class Trainer:
    """One training run over a model already loaded (``vlm_models.load``); :func:`train` does the loading."""

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        config: TrainingConfig,
        *,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.model, self.processor, self.config = model, processor, config
        self.output = Path(config.output)
        self.report = report or (lambda message: print(message, file=sys.stderr))
        train_file, val_file = resolve_data_files(config.train_data, config.val_data)
        if config.val_every and val_file is None:
            raise ValueError("--val-every needs validation data (--val-data, or valid.jsonl next to train.jsonl)")
        self.skipped: list[BadSample] = []
        self.train_samples = self._load(train_file)
        self.val_samples = self._load(val_file) if val_file is not None else []
        self.base_quantization = prepare_model(model, config)
        if config.grad_checkpoint:
            enable_grad_checkpoint(model)
        self.schedule = _schedule(config)
        self.optimizer = optim.AdamW(learning_rate=self.schedule, weight_decay=config.weight_decay)
        self.pad_id = _pad_id(processor)
        self.image_processor = processor.image_processor
        self.step = 0
        self._epoch: int | None = None  # the epoch whose batch order is in _batches
        self._batches: list[list[int]] = []
        self.history: list[dict[str, float]] = []
        self.validation: list[dict[str, float]] = []

    def _load(self, file: Path) -> list[EncodedSample]:
        def skip(bad: BadSample) -> None:
            self.report(f"skipping {bad}")

        samples, bad = load_samples(
            file,
            self.processor,
            max_length=self.config.max_length,
            on_bad_sample=self.config.on_bad_sample,
            report=skip,
            progress=self.config.progress,
            columns=self.config.columns,
            workers=self.config.data_workers,
        )
        if bad:
            self.report(f"{file}: skipped {len(bad)} bad sample(s), kept {len(samples)}")
        self.skipped.extend(bad)
        return samples

    # -- batches
    def micro_batch(self, index: int) -> Batch:
        """The ``index``-th micro-batch of the run: a pure function of the seed and the index."""
        per_epoch = math.ceil(len(self.train_samples) / self.config.batch_size)
        epoch, within = divmod(index, per_epoch)
        if self._epoch != epoch:
            lengths = [len(s) for s in self.train_samples]
            self._epoch, self._batches = epoch, epoch_batches(lengths, self.config.batch_size, self.config.seed, epoch)
        return collate([self.train_samples[i] for i in self._batches[within]], self.pad_id, self.image_processor)

    # -- one update
    def gradients(self) -> tuple[dict, float, int]:
        """The mean gradient over this step's micro-batches, weighted by their assistant tokens (so padding and
        the split into micro-batches change nothing), with the mean loss and the tokens seen."""
        config, model = self.config, self.model
        loss_and_grad = nn.value_and_grad(model, sample_loss)
        total_grad, loss_sum, n_loss, n_tokens = None, 0.0, 0.0, 0
        for j in range(config.grad_accumulation):
            batch = self.micro_batch(self.step * config.grad_accumulation + j)
            (loss, n), grad = loss_and_grad(model, batch)
            grad = tree_map(lambda g, n=n: g * n, grad)
            total_grad = grad if total_grad is None else tree_map(mx.add, total_grad, grad)
            mx.eval(total_grad, loss, n)
            loss_sum += loss.item() * n.item()
            n_loss += n.item()
            n_tokens += batch.n_tokens
        grads = tree_map(lambda g: g / max(n_loss, 1.0), total_grad)
        return grads, loss_sum / max(n_loss, 1.0), n_tokens

    def train_step(self) -> dict[str, float]:
        config, model = self.config, self.model
        mx.random.seed(config.seed * 1_000_003 + self.step)  # dropout draws depend on the step only: resumable
        model.train()
        tic = time.perf_counter()
        grads, loss, n_tokens = self.gradients()
        if config.max_grad_norm is not None:
            grads, _ = optim.clip_grad_norm(grads, config.max_grad_norm)
        learning_rate = float(self.schedule(mx.array(self.step)).item())
        self.optimizer.update(model, grads)
        mx.eval(model.parameters(), self.optimizer.state)
        self.step += 1
        seconds = time.perf_counter() - tic
        entry = {
            "step": self.step,
            "loss": loss,
            "learning_rate": learning_rate,
            "tokens": n_tokens,
            "tokens_per_s": n_tokens / seconds if seconds > 0 else 0.0,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }
        self.history.append(entry)
        return entry

    def evaluate(self, samples: list[EncodedSample] | None = None) -> float:
        """Token-weighted mean loss over ``samples`` (the validation set, or its first ``val_batches`` batches)."""
        self.model.eval()
        size = self.config.batch_size
        if samples is None:
            samples = self.val_samples
            if self.config.val_batches:  # the first samples in file order, not the shortest
                samples = samples[: self.config.val_batches * size]
        samples = sorted(samples, key=len)  # similar lengths together: less padding
        groups = [samples[i : i + size] for i in range(0, len(samples), size)]
        loss_sum = n_sum = 0.0
        for group in groups:
            loss, n = sample_loss(self.model, collate(group, self.pad_id, self.image_processor))
            mx.eval(loss, n)
            loss_sum += loss.item() * n.item()
            n_sum += n.item()
        self.model.train()
        return loss_sum / max(n_sum, 1.0)

    # -- files
    def trainable_weights(self) -> dict[str, mx.array]:
        return dict(tree_flatten(self.model.trainable_parameters()))

    def adapter_config(self) -> dict[str, Any]:
        from vlm_models import __version__

        config = self.config
        return {
            "fine_tune_type": config.fine_tune_type,
            "base_model": config.model,
            "lora": None if config.fine_tune_type == "full" else config.lora.to_dict(),
            "base_quantization": self.base_quantization,
            "steps": self.step,
            "vlm_version": __version__,
        }

    def save_adapters(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(folder / ADAPTER_WEIGHTS_FILE), self.trainable_weights(), metadata={"format": "mlx"})
        (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(self.adapter_config(), indent=2))
        return folder

    def save_checkpoint(self) -> Path:
        """Adapters, optimizer state and history: everything :meth:`resume` needs to continue exactly."""
        folder = self.output / "checkpoints" / f"step_{self.step:07d}"
        self.save_adapters(folder)
        mx.save_safetensors(str(folder / OPTIMIZER_FILE), dict(tree_flatten(self.optimizer.state)))
        state = {
            "step": self.step,
            "history": self.history,
            "validation": self.validation,
            "config": self.config.to_dict(),
        }
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
        return folder

    def resume(self, folder: str | Path) -> None:
        folder = Path(folder)
        state_file = folder / STATE_FILE
        if not state_file.is_file() or not (folder / OPTIMIZER_FILE).is_file():
            raise ValueError(
                f"{folder} is not a resumable checkpoint (it needs {STATE_FILE} and {OPTIMIZER_FILE};"
                " they are in OUTPUT/checkpoints/step_N)"
            )
        state = json.loads(state_file.read_text(encoding="utf-8"))
        saved = state.get("config", {})
        for key in ("model", "fine_tune_type", "lora", "batch_size", "grad_accumulation", "seed"):
            mine = self.config.to_dict()[key]
            if saved.get(key) != mine:
                raise ValueError(f"{folder} was trained with {key}={saved.get(key)!r}, this run has {mine!r}")
        if state["step"] >= self.config.steps:
            raise ValueError(f"{folder} is at step {state['step']}; ask for more --steps than that to continue")
        weights = mx.load(str(folder / ADAPTER_WEIGHTS_FILE))
        expected = self.trainable_weights()
        if set(weights) != set(expected):
            raise ValueError(f"{folder / ADAPTER_WEIGHTS_FILE} does not hold this run's trainable weights")
        self.model.load_weights(list(weights.items()), strict=False)
        self.optimizer.state = tree_unflatten(list(mx.load(str(folder / OPTIMIZER_FILE)).items()))
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.validation = list(state["validation"])
        mx.eval(self.model.parameters(), self.optimizer.state)

    # -- the run
    def run(self) -> TrainResult:
        from tqdm import tqdm

        from .plot import plot_loss

        config = self.config
        if config.resume_from:
            self.resume(config.resume_from)
        bar = tqdm(total=config.steps, initial=self.step, desc="training", unit="step", disable=not config.progress)
        try:
            while self.step < config.steps:
                entry = self.train_step()
                postfix = {
                    "loss": f"{entry['loss']:.3f}",
                    "lr": f"{entry['learning_rate']:.2e}",
                    "tok/s": f"{entry['tokens_per_s']:.0f}",
                    "peak_GB": f"{entry['peak_memory_gb']:.3f}",
                }
                last = self.step == config.steps
                if self.val_samples and ((config.val_every and self.step % config.val_every == 0) or last):
                    val_loss = self.evaluate()
                    self.validation.append({"step": self.step, "val_loss": val_loss})
                    postfix["val"] = f"{val_loss:.3f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if config.save_every and self.step % config.save_every == 0 and not last:
                    self.save_checkpoint()
        except BaseException:
            # Interrupted or failed mid-run: keep what was learned so far, resumable.
            bar.close()
            if self.step > 0:
                saved = self.save_checkpoint()
                self.report(f"training stopped at step {self.step}; saved a resumable checkpoint in {saved}")
            raise
        bar.close()
        self.save_adapters(self.output)
        (self.output / STATE_FILE).write_text(
            json.dumps({"step": self.step, "history": self.history, "validation": self.validation}, indent=2)
        )
        plot_loss(self.history, self.validation, self.output / LOSS_CURVE_FILE)
        return TrainResult(self.output, self.step, self.history, self.validation, self.skipped)


def _pad_id(processor: Any) -> int:
    tokenizer = processor.tokenizer
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def train(config: TrainingConfig) -> TrainResult:
    """Load ``config.model`` and train it on ``config.train_data``; the adapters land in ``config.output``."""
    from vlm_models import load

    model, processor = load(config.model)
    return Trainer(model, processor, config).run()

"""Typed training options: what to train (fine-tune type, LoRA, quantized base) and how (the loop)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vlm_models.adapters import FINE_TUNE_TYPES, LoRAConfig

from .tables import TableColumns

__all__ = [
    "BAD_SAMPLE_POLICIES",
    "LR_SCHEDULES",
    "LoRAConfig",
    "QuantizationConfig",
    "TableColumns",
    "TrainingConfig",
]

BAD_SAMPLE_POLICIES = ("skip", "error")
LR_SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class QuantizationConfig:
    """How QLoRA quantizes a float base before adding adapters (an already quantized base is used as is)."""

    bits: int = 4
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(f"quantization bits must be one of 2, 3, 4, 5, 6, 8, got {self.bits}")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"quantization group size must be 32, 64 or 128, got {self.group_size}")


@dataclass(frozen=True)
class TrainingConfig:
    model: str
    """Base checkpoint: a local folder or a Hugging Face repo id."""
    train_data: str
    """A JSONL file of chat samples, a parquet / Arrow table, or a folder of them (see ``resolve_data_files``)."""
    columns: TableColumns = field(default_factory=TableColumns)
    """Which table columns hold the image, question and answer (tables without a ``messages`` column)."""
    output: str = "adapters"
    """Folder for adapters.safetensors, adapter_config.json, loss.png and checkpoints/."""
    val_data: str | None = None
    fine_tune_type: str = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    steps: int = 100
    """Optimizer updates; each takes ``batch_size * grad_accumulation`` samples."""
    batch_size: int = 1
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    min_learning_rate: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    max_length: int = 2048
    grad_checkpoint: bool = False
    val_every: int = 0
    """Validation loss every N steps (and after the last); 0: only after the last, when there is validation data."""
    val_batches: int = 0
    """Batches per validation; 0: the whole validation set."""
    save_every: int = 0
    """A resumable checkpoint every N steps under output/checkpoints/; 0: none (the final adapters are written)."""
    seed: int = 0
    on_bad_sample: str = "skip"
    resume_from: str | None = None
    """A checkpoint folder (output/checkpoints/step_NNNNNNN) to continue from."""
    progress: bool = True
    data_workers: int = 1
    """Processes that encode the samples (images and tokens) before training; the samples are the same."""

    def __post_init__(self) -> None:
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise ValueError(f"fine-tune type must be one of {', '.join(FINE_TUNE_TYPES)}, got {self.fine_tune_type!r}")
        if self.on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"--on-bad-sample must be skip or error, got {self.on_bad_sample!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            known = ", ".join(LR_SCHEDULES)
            raise ValueError(f"learning-rate schedule must be one of {known}, got {self.lr_schedule!r}")
        for name in ("steps", "batch_size", "grad_accumulation", "max_length", "data_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "val_every", "val_batches", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.warmup_steps >= self.steps and self.warmup_steps > 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps})")
        if self.learning_rate <= 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["lora"] = self.lora.to_dict()
        values["columns"] = asdict(self.columns)
        return values

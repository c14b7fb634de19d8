"""Configs of local training (:class:`TrainConfig`) and of a run (:class:`ExperimentConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedmerge.config import ConfigModel, LearningRate
from fedmerge.errors import FedmergeError
from fedmerge.evaluate import EvalProtocol
from fedmerge.models import ModelConfig, default_model


class TrainConfig(ConfigModel):
    """Local training."""

    epochs: int = Field(
        30, ge=0, description="most training epochs (early stopping may end sooner)"
    )
    batch_size: int = Field(256, ge=1, description="training sequences per batch")
    batches_per_epoch: int | None = Field(
        None,
        ge=1,
        description="train on this many batches of each epoch, a seeded sample, then validate "
        "(None: every batch); for models whose full epoch takes hours, such as a language model "
        "on a CPU",
    )
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw",
        description="adamw, or sgd (plain steps of lr x gradient, with train.momentum): under "
        "dpsgd AdamW rescales every coordinate's noise into a step of about lr, SGD does not "
        "(docs/privacy.md)",
    )
    lr: LearningRate = Field(1e-3, description="learning rate of train.optimizer")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum (train.optimizer = sgd)")
    weight_decay: float = Field(
        0.0, ge=0.0, le=10.0, description="weight decay: decoupled (AdamW) or L2 (SGD)"
    )
    warmup_steps: int = Field(100, ge=0, description="linear learning-rate warm-up steps")
    patience: int = Field(
        3, ge=1, description="epochs without a better valid ndcg@10 before stopping"
    )
    start_candidate: bool = Field(
        True,
        description="the starting model (epoch 0) competes with the trained epochs on the valid "
        "split, so training that never beats it keeps it; false: keep the best trained epoch",
    )
    seed: int = Field(0, description="seed of theta_0, the batch order and the validation sample")
    eval_batch_size: int = Field(1024, ge=1, description="users scored per batch in evaluation")
    evaluation: EvalProtocol = EvalProtocol()
    targets: Literal["all", "last"] = Field(
        "all",
        description="train on every position of each sequence (every prefix), or on its last item "
        "only",
    )
    valid_users: int | None = Field(
        None,
        ge=1,
        description="early stopping and the calibration read valid ndcg@10 of this many users "
        "drawn once (seeded) per domain (None: every user); the reported metrics always use every "
        "user",
    )
    device: str = Field(
        "cpu", description="torch device to train and evaluate on: cpu, cuda, cuda:1, mps"
    )
    max_minutes: float | None = Field(
        None,
        gt=0.0,
        description="stop once the training epochs (not evaluation) took this long, across resumes",
    )
    ema: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="validate and keep an exponential moving average of the weights with "
        "this decay per step instead of the raw weights (None: the raw weights)",
    )
    frozen: list[str] = Field(
        [],
        description="parameters kept at their starting values: names or name prefixes of the "
        "model's parameters (fedmerge pretrain defaults to the family's choice)",
    )

    @model_validator(mode="after")
    def _momentum_needs_sgd(self) -> TrainConfig:
        if self.momentum and self.optimizer != "sgd":
            raise FedmergeError(
                f"train.momentum = {self.momentum} is SGD's; AdamW keeps its own moments: set "
                'train.optimizer = "sgd" or drop train.momentum'
            )
        return self


class ExperimentConfig(ConfigModel):
    """Everything one training run needs besides the data."""

    model: ModelConfig = Field(
        default_factory=default_model, description="the model family and its settings"
    )
    train: TrainConfig = TrainConfig()

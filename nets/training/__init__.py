"""Workloads: data sets (digits, synthetic, CIFAR files), model definitions, and the
training loop with its trained-checkpoint helpers."""

from nets.training.loops import (
    DIGITS_RECIPE,
    TrainResult,
    accuracy,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    train,
    trained_digits_mlp,
)

__all__ = ["DIGITS_RECIPE", "TrainResult", "accuracy", "evaluate", "load_checkpoint",
           "save_checkpoint", "train", "trained_digits_mlp"]

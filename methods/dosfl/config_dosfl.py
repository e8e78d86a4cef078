"""DOSFL's own keys."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.config import KeysModel

ServerSteps = Literal["sequential", "averaged", "train"]
Init = Literal["real", "noise"]


class DosflConfig(KeysModel):
    """DOSFL's own keys: the size of each client's distilled set, the
    distillation's optimisation and how the server trains on the sets."""

    dosfl_steps: int = Field(5, ge=1, le=100)
    """distilled batches per client, each one image per class the client holds (so this
    many distilled images per class); the paper's distill steps"""
    dosfl_epochs: int = Field(2, ge=1, le=20)
    """passes over the distilled batches in one replay (the paper's distill epochs):
    dosfl-steps x this unrolled gradient steps, each with its own learned step size"""
    dosfl_iterations: int = Field(30, ge=1, le=100_000)
    """outer iterations of the client's distillation: each unrolls the steps from the
    shared initial weights, scores the result on a batch of train-batch-size real
    images and updates the images, soft labels and step sizes (Adam)"""
    dosfl_distill_lr: float = Field(0.01, gt=0, le=10)
    """Adam learning rate of the distilled images, soft labels and step sizes (dataset
    distillation's default)"""
    dosfl_step_lr: float = Field(0.1, gt=0, le=10)
    """initial step size of every distilled step, learned from there (dataset
    distillation starts at 0.02 and runs far more iterations)"""
    dosfl_init: Init = Field("real")
    """what the distilled images start from: real (randomly drawn training images of
    their class, so that few iterations suffice) or noise (standard normal pixels, as
    the paper and dataset distillation do)"""
    dosfl_soft_labels: bool = Field(True)
    """learn a soft label per distilled image (the paper's setting); false keeps the
    one-hot label of the image's class"""
    dosfl_server: ServerSteps = Field("train")
    """how the server trains the global classifier from the shared initial weights:
    sequential (the paper: every client's distilled steps replayed with their learned
    step sizes, client after client in partition-id order), averaged (at each step
    the capped-share average of every client's step from the same weights), train
    (dosfl-server-epochs of ordinary training on the union of the distilled images
    and soft labels)"""
    dosfl_server_epochs: int = Field(100, ge=1, le=100_000)
    """epochs over the union of the distilled sets when dosfl-server=train
    (train-batch-size, learning-rate); the union is a few hundred images, so far more
    passes than train-epochs gives a synthetic set"""

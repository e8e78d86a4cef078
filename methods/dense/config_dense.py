"""DENSE's own keys (the paper code's values in brackets where ours differ).

Its number of epochs (one synthesized batch, then one distillation pass over the
pool of every batch so far) is the shared ``train-epochs``; the distillation batch
is the shared ``train-batch-size``.
"""

from __future__ import annotations

from pydantic import Field

from common.config import KeysModel


class DenseConfig(KeysModel):
    """DENSE's own keys (``dense-*``): the generator's schedule, size and loss
    weights, and the distillation's temperature and learning rate."""

    dense_g_steps: int = Field(20, ge=1, le=10_000)
    """generator iterations (Adam) per synthesized batch (code: `--g_steps 30`); one
    batch per epoch, `train-epochs` epochs"""
    # 128: the server work must stay under a minute on a 2-core CPU
    dense_synthesis_batch_size: int = Field(128, ge=1, le=100_000)
    """images per synthesized batch; the pool grows by one batch per epoch (code: 256)"""
    dense_lr_g: float = Field(1e-3, gt=0)
    """Adam learning rate of the generator and its latents (code: `--lr_g 1e-3`)"""
    dense_nz: int = Field(256, ge=1, le=4096)
    """latent size of the generator (code: `--nz 256`)"""
    dense_ngf: int = Field(32, ge=1, le=1024)
    """generator width: channels after the last upsampling (code: 64)"""
    dense_bn: float = Field(1.0, ge=0)
    """weight of the BN-statistic term of the generator loss (code: 1)"""
    dense_oh: float = Field(1.0, ge=0)
    """weight of the ensemble's cross-entropy to the sampled labels (code: 1)"""
    dense_adv: float = Field(1.0, ge=0)
    """weight of the adversarial term (student-ensemble KL where their argmax disagree;
    code: 1)"""
    dense_temperature: float = Field(20.0, gt=0)
    """T of the distillation KL, scaled by T^2 (code: `--T 20`)"""
    dense_lr: float = Field(0.005, gt=0)
    """SGD (momentum 0.9) learning rate of the distillation, batch `train-batch-size`
    (code: `--lr 0.005`)"""

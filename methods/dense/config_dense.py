"""DENSE's own keys (the paper code's values in brackets where ours differ).

Its number of epochs (one synthesized batch, then one distillation pass over the
pool of every batch so far) is the shared ``train-epochs``; the distillation batch
is the shared ``train-batch-size``.
"""

from __future__ import annotations

from pydantic import Field

from common.config import KeysModel


class DenseConfig(KeysModel):
    # generator iterations per synthesized batch (code: --g_steps 30)
    dense_g_steps: int = Field(20, ge=1, le=10_000)
    # images per synthesized batch (code: --synthesis_batch_size 256)
    dense_synthesis_batch_size: int = Field(128, ge=1, le=100_000)
    # Adam learning rate of the generator and its latents (code: --lr_g 1e-3)
    dense_lr_g: float = Field(1e-3, gt=0)
    # latent size of the generator (code: --nz 256)
    dense_nz: int = Field(256, ge=1, le=4096)
    # generator width: ngf channels after the last upsampling (code: 64)
    dense_ngf: int = Field(32, ge=1, le=1024)
    # weights of the BN-statistic, cross-entropy and adversarial terms (code: 1, 1, 1)
    dense_bn: float = Field(1.0, ge=0)
    dense_oh: float = Field(1.0, ge=0)
    dense_adv: float = Field(1.0, ge=0)
    # distillation temperature (code: --T 20)
    dense_temperature: float = Field(20.0, gt=0)
    # SGD (momentum 0.9) learning rate of the distillation (code: --lr 0.005)
    dense_lr: float = Field(0.005, gt=0)

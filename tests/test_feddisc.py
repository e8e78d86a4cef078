"""FedDISC on a Stable-Diffusion-format generator: refused before any client works."""

from __future__ import annotations

import pytest
from tiny_stack import make_tiny_sd

from common.config import ConfigError
from common.datasets import dataset_info
from methods import build_config
from methods.base import ServerContext
from methods.feddisc import FedDisc


def test_a_sequence_conditioned_generator_is_refused_with_the_reason(
    fast_config, tmp_path
):
    sd = make_tiny_sd(tmp_path / "sd")
    cfg = build_config(fast_config | {
        "method": "feddisc", "generator": str(sd), "text-encoder": str(sd),
        "embedding": "sequence",
    })  # fmt: skip
    ctx = ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))
    with pytest.raises(ConfigError, match="embedding='sequence'.*pooled"):
        FedDisc().check(ctx)

"""What the server's method modules share during one round."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.config import RunConfig
from common.device import resolve_device, resolve_dtype


@dataclass
class ServerOutput:
    """The result of the server work of one method."""

    model_state: dict[str, torch.Tensor] | None = None  # global classifier to push back
    arch: str = "cnn"
    timings: dict[str, float] = field(default_factory=dict)  # synthesize, train, merge
    samples: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific results
    push_arrays: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class ServerContext:
    """Validated config plus what the server learned about the federation."""

    cfg: RunConfig
    run_dir: Path
    num_classes: int = 10
    class_names: list[str] = field(default_factory=list)
    channels: int = 1

    @functools.cached_property
    def device(self) -> torch.device:
        return resolve_device(self.cfg.device)

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.cfg.precision, self.device)

    @functools.cached_property
    def generator(self) -> Any:
        from common.foundation import load_generator

        return load_generator(
            self.cfg.generator, self.cfg.scheduler, self.device, self.dtype
        )

    @functools.cached_property
    def text_encoder(self) -> Any:
        from common.foundation import load_text_encoder

        return load_text_encoder(self.cfg.text_encoder, self.device)

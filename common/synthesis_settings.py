"""The sampler's settings: the one place where run-config keys become them.

Every caller of the synthesis engine (``common.synthesis.sample``,
``synthesize``, ``sample_on_workers``) passes ``**settings.kwargs()`` of a
``SynthesisSettings``, built from the run config with ``from_config`` (a method's
own guidance or a benchmark's sweep value as an override) or, where no run config
exists (pretraining, the engine benchmark), constructed directly.
``tests/unit/test_synthesis_settings.py`` fails if code outside the engine passes a
sampler key by hand.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import RunConfig

# The engine's keyword arguments that are settings (not data, not plumbing).
SAMPLER_KEYS = (
    "guidance_scale",
    "num_inference_steps",
    "guidance_cutoff",
    "seed",
    "batch_size",
    "static_shapes",
)


@dataclass(frozen=True)
class SynthesisSettings:
    """How the engine samples: guidance, steps, cut-off, seed, batch, shapes.

    Parameters
    ----------
    guidance_scale
        Classifier-free guidance ``w`` in ``eps_u + w (eps_c - eps_u)``; 1.0 runs
        the conditional pass alone.
    num_inference_steps
        Sampler steps.
    guidance_cutoff
        Fraction of the steps that run the unconditional pass (1.0: every step).
    seed
        Image ``i`` draws its noise from ``(seed, i)``.
    batch_size
        Denoising batch, or ``"auto"`` (planned from free memory).
    static_shapes
        Pad the last batch to the batch size (a compiled UNet).
    """

    guidance_scale: float = 3.0
    num_inference_steps: int = 20
    guidance_cutoff: float = 1.0
    seed: int = 0
    batch_size: int | str = "auto"
    static_shapes: bool = False

    @classmethod
    def from_config(cls, cfg: RunConfig, **overrides: Any) -> SynthesisSettings:
        """The run's settings (``guidance-scale``, ``num-inference-steps``,
        ``guidance-cutoff``, ``seed``, ``synth-batch-size``, ``compile``);
        ``overrides`` (field names) win, e.g. a method's own guidance scale."""
        base = cls(
            guidance_scale=cfg.guidance_scale,
            num_inference_steps=cfg.num_inference_steps,
            guidance_cutoff=cfg.guidance_cutoff,
            seed=cfg.seed,
            batch_size=cfg.synth_batch_size,
            static_shapes=cfg.compile,
        )
        return base.replace(**overrides)

    def replace(self, **overrides: Any) -> SynthesisSettings:
        """A copy with some fields changed; an unknown name is an error."""
        unknown = sorted(set(overrides) - set(SAMPLER_KEYS))
        if unknown:
            raise TypeError(
                f"unknown synthesis setting(s) {unknown}; the settings are "
                f"{', '.join(SAMPLER_KEYS)}"
            )
        return dataclasses.replace(self, **overrides)

    def kwargs(self) -> dict[str, Any]:
        """The engine's keyword arguments."""
        return {k: getattr(self, k) for k in SAMPLER_KEYS}

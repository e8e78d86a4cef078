"""The synthesis engine on several devices: ``sample`` sharded over Ray actors,
each rebuilding the same generator from a ``GeneratorSpec``.

Image ``i`` draws its noise from ``(seed, first_index + i)`` (``common.synthesis``),
so contiguous shards with their own ``first_index`` give the same images, in the
same order, as one worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .generator import Generator
from .synthesis import sample


@dataclass(frozen=True)
class GeneratorSpec:
    """What a worker needs to rebuild the same generator on its own device."""

    path: str  # resolved folder or hub id
    scheduler: str
    precision: str  # "auto", "fp32", "fp16", "bf16"
    decoder: str = ""
    lora: tuple[dict[str, torch.Tensor], int, float, list[str]] | None = None

    @classmethod
    def of(
        cls, gen: Generator, scheduler: str, precision: str, decoder: str = ""
    ) -> GeneratorSpec:
        """The spec of a loaded generator, with the LoRA adapter attached to it."""
        from .lora import lora_spec

        return cls(gen.path, scheduler, precision, decoder, lora_spec(gen.unet))

    def build(self, device: torch.device) -> tuple[Generator, Any]:
        """Load the generator (with its LoRA adapter) and the decoder on ``device``."""
        from .device import resolve_dtype
        from .generator import load_decoder, load_generator
        from .lora import set_lora_state

        gen = load_generator(
            self.path, self.scheduler, device, resolve_dtype(self.precision, device)
        )
        if self.lora is not None:
            state, rank, alpha, targets = self.lora
            set_lora_state(gen.unet, state, rank, alpha, targets)
            gen.unet.to(device, gen.dtype)
        decoder = (
            load_decoder(self.decoder, device, gen.dtype) if self.decoder else None
        )
        return gen, decoder


def shards(n: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges, as equal as possible, in order."""
    workers = max(1, min(workers, n)) if n else 1
    bounds = [round(i * n / workers) for i in range(workers + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(workers)]


def sample_on_workers(
    spec: GeneratorSpec,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    workers: int,
    ray_address: str = "",
    gpus_per_worker: float = 0.0,
    **kwargs: Any,
) -> torch.Tensor:
    """``sample`` sharded over ``workers`` Ray actors, one device each.

    Each actor rebuilds the generator from ``spec`` and samples a contiguous shard
    with ``first_index`` set to the shard's start: the result is the same images,
    in the same order, as one worker. Joins a running Ray instance (a Flower
    simulation's, or the cluster at ``ray_address``) or starts a local one.
    """
    import ray

    if kwargs.get("latent_guidance") is not None:
        raise ValueError(
            "latent_guidance runs in the server process (its loss holds the clients' "
            "models); sample without workers (synth-workers=1)"
        )
    if not ray.is_initialized():
        ray.init(
            address=ray_address or None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )

    # No CPU reservation: inside a Flower simulation the ClientApp actors may hold
    # every CPU of the Ray instance, and a reserving actor would wait forever.
    @ray.remote(num_cpus=0, num_gpus=gpus_per_worker)
    class SynthesisWorker:
        def __init__(self, spec: GeneratorSpec) -> None:
            torch.set_num_threads(1)
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.gen, self.decoder = spec.build(dev)

        def sample(
            self, cond: torch.Tensor, uncond: torch.Tensor, kw: dict
        ) -> torch.Tensor:
            return sample(self.gen, cond, uncond, decoder=self.decoder, **kw)

    base = kwargs.pop("first_index", 0)
    kwargs.pop("progress", None)
    extras = kwargs.pop("extra_conds", None) or []
    start = kwargs.pop("start", None)  # a Start: each shard gets its rows
    parts = shards(len(cond), workers)
    actors = [SynthesisWorker.remote(spec) for _ in parts]  # type: ignore[attr-defined]
    futures = [
        a.sample.remote(
            cond[lo:hi],
            uncond,
            kwargs
            | {
                "first_index": base + lo,
                "extra_conds": [(e[lo:hi], w) for e, w in extras],
                "start": start.rows(lo, hi) if start is not None else None,
            },
        )
        for a, (lo, hi) in zip(actors, parts, strict=True)
    ]
    try:
        return torch.cat(ray.get(futures))
    finally:
        for a in actors:
            ray.kill(a)

"""The cpu-batch part: which denoising batch a CPU runs fastest, the figure
behind ``common.synthesis.CPU_AUTO_BATCH`` (``batch_size="auto"`` on a CPU).

The default run's sampler settings (``SynthesisSettings.from_config`` of the
embedded default config) on the embedded generator, ``n`` class-prompt rows,
every batch size once per repetition, alternated, so drift on a shared machine
falls on all of them alike; the figure is each one's median img/s over the
first size's. The images must not depend on the batch (checked: max abs
difference to the first size's).
"""

from __future__ import annotations

import statistics
import time
from typing import Any


def compare_cpu_batches(sizes: list[int], n: int, reps: int) -> list[dict[str, Any]]:
    """One row per batch size: median seconds, img/s, ratio to ``sizes[0]``."""
    import torch

    from common.generator import load_generator
    from common.mnist_domains import class_name_prompt
    from common.synthesis import sample
    from common.synthesis_settings import SynthesisSettings
    from common.text_encoder import load_text_encoder
    from methods import build_config

    cfg = build_config({})
    gen = load_generator(cfg.generator, cfg.scheduler)
    enc = load_text_encoder(cfg.text_encoder)
    cond = enc.encode([class_name_prompt(i % 10) for i in range(n)], cfg.embedding)
    uncond = enc.encode([""], cfg.embedding)
    times: dict[int, list[float]] = {b: [] for b in sizes}
    diff: dict[int, float] = {b: 0.0 for b in sizes}
    ref = None
    for _ in range(reps):
        for b in sizes:
            kw = SynthesisSettings.from_config(cfg, batch_size=b).kwargs()
            t0 = time.perf_counter()
            x = sample(gen, cond, uncond, **kw).float()
            times[b].append(time.perf_counter() - t0)
            if ref is None:
                ref = x
            diff[b] = max(diff[b], float((x - ref).abs().max()))
    med = {b: statistics.median(t) for b, t in times.items()}
    return [
        {
            "batch": b,
            "n": n,
            "threads": torch.get_num_threads(),
            "median_s": med[b],
            "img_s": n / med[b],
            "ratio": med[sizes[0]] / med[b],
            "max_abs_diff": diff[b],
        }
        for b in sizes
    ]

"""The workers part: one synthesis job on 1..k Ray workers."""

from __future__ import annotations

import time
from typing import Any


def compare_workers(workers: list[int], n: int, steps: int) -> list[dict[str, Any]]:
    """The same job on 1..k Ray workers (embedded generator, class prompts)."""
    import ray

    from common.generator import load_generator
    from common.mnist_domains import class_name_prompt
    from common.synthesis import sample
    from common.synthesis_settings import SynthesisSettings
    from common.synthesis_workers import GeneratorSpec, sample_on_workers
    from common.text_encoder import load_text_encoder

    gen = load_generator("embedded", "ddim")
    enc = load_text_encoder("embedded")
    cond = enc.encode([class_name_prompt(i % 10) for i in range(n)], "pooled")
    uncond = enc.encode([""], "pooled")
    kw = SynthesisSettings(
        guidance_scale=3.0, num_inference_steps=steps, batch_size=64
    ).kwargs()
    t0 = time.perf_counter()
    ref = sample(gen, cond, uncond, **kw)
    rows = [
        {
            "workers": "in-process",
            "img_s": n / (time.perf_counter() - t0),
            "max_abs_diff": 0.0,
        }
    ]
    ray.init(num_cpus=max(workers), include_dashboard=False, log_to_driver=False)
    try:
        spec = GeneratorSpec.of(gen, "ddim", "fp32")
        for w in workers:
            t0 = time.perf_counter()
            x = sample_on_workers(spec, cond, uncond, workers=w, **kw)
            rows.append(
                {
                    "workers": w,
                    "img_s": n / (time.perf_counter() - t0),
                    "max_abs_diff": float((x - ref).abs().max()),
                }
            )
    finally:
        ray.shutdown()
    return rows

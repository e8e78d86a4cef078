"""GPU check: the engine's img/s at the sampler settings of the quality table
(``python -m bench synth --parts quality``) on SD-1.5's architecture at 512 px,
bf16, CFG 7.5, 32 images, eager, median of 3 (random weights: no hub weights).

``python -m bench.synth.fewstep`` on a CUDA machine; prints Markdown table rows
(``bench-results/gpu/fewstep.md``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DPMSolverMultistepScheduler

from bench.synth.pipeline import build_sd, median_time, sd15_prompts
from common.synthesis import sample
from common.synthesis_settings import SynthesisSettings


def main() -> None:
    """Run the check and print its result."""
    dev = torch.device("cuda")
    gen, pipe = build_sd("sd15", 512, dev, torch.bfloat16)
    ddim = gen.scheduler
    dpm = DPMSolverMultistepScheduler.from_config(
        ddim.config, algorithm_type="dpmsolver++"
    )
    cond, unc = sd15_prompts(32)

    def t(fn: Callable[[], object], reps: int = 3) -> float:
        return median_time(fn, dev, reps)

    rows = []
    for name, sch, steps, cut in (
        ("ddim-25", ddim, 25, 1.0),
        ("dpm-10", dpm, 10, 1.0),
        ("dpm-10-cut-0.5", dpm, 10, 0.5),
        ("dpm-8-cut-0.5", dpm, 8, 0.5),
    ):
        gen.scheduler = sch
        s = SynthesisSettings(
            guidance_scale=7.5,
            num_inference_steps=steps,
            guidance_cutoff=cut,
            batch_size="auto",
        )
        kw = s.kwargs()

        def run(kw: dict = kw) -> object:
            return sample(gen, cond, unc, **kw)

        sec = t(run)
        rows.append((name, 32 / sec))
        print(f"| {name} | {32 / sec:.2f} |", flush=True)


if __name__ == "__main__":
    main()

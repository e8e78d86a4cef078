"""GPU check: where the engine's time goes on SD-1.5's architecture at 512 px,
bf16 (random weights): 25 steps with CFG without and with decoding, the VAE
decode alone, one UNet call on the CFG batch of 64.

``python -m bench.synth.split`` on a CUDA machine
(``bench-results/gpu/unet_vae_split.txt``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.synth.pipeline import build_sd, median_time, sd15_prompts
from common.synthesis import sample
from common.synthesis_settings import SynthesisSettings


def main() -> None:
    """Run the check and print its result."""
    dev = torch.device("cuda")
    gen, pipe = build_sd("sd15", 512, dev, torch.bfloat16)
    print({type(p).__name__ for p in gen.unet.attn_processors.values()})
    cond, unc = sd15_prompts(32)

    def t(fn: Callable[[], object], reps: int = 3) -> float:
        return median_time(fn, dev, reps)

    kw = SynthesisSettings(
        guidance_scale=7.5, num_inference_steps=25, batch_size=32
    ).kwargs()
    lat = t(lambda: sample(gen, cond, unc, output="latents", **kw))
    img = t(lambda: sample(gen, cond, unc, **kw))
    z = torch.randn(32, 4, 64, 64, device=dev, dtype=torch.bfloat16)
    dec = t(lambda: gen.vae.decode(z / 0.18215).sample)
    x = torch.randn(64, 4, 64, 64, device=dev, dtype=torch.bfloat16)
    c = torch.randn(64, 77, 768, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        one = t(
            lambda: (
                gen.unet(
                    x, torch.tensor(500, device=dev), encoder_hidden_states=c
                ).sample
            ),
            5,
        )
    print(
        f"batch 32, 25 steps, CFG: latents only {lat:.2f} s ({32 / lat:.2f} img/s), with decode {img:.2f} s ({32 / img:.2f} img/s); VAE decode of 32: {dec:.2f} s; one UNet call on 64 (CFG batch): {one * 1000:.1f} ms -> 25 steps {25 * one:.2f} s"
    )


if __name__ == "__main__":
    main()

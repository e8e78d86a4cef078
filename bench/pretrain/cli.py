"""``python -m bench pretrain``: build the embedded foundation stack from public data.

Stage 1 (the public split) and the evaluation run here; stages 2-4 in
``bench.pretrain.stages``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from common.mnist_domains import STYLES, load_mnist, public_styled_set, render_style

from .card import folder_size, write_card
from .clip import retrieval_metrics
from .data import IMAGE_SIZE, QUICK, Schedule, caption_table, image_groups, log
from .evaluate import evaluate_class_names, evaluate_samples, save_grid
from .generator import conditioning_table
from .stages import build_feddiff_stage, count, train_stages


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command's options (``python -m bench pretrain --help``)."""
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


def main(argv: list[str] | None = None) -> int:
    """Build (or with ``--eval-only`` re-evaluate) the embedded stack in ``--out``:
    stage 1 here, stages 2-4 and FedDiff's folder (``stages``), then stage 5."""
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

"""``python -m bench synth``: the synthesis engine against diffusers, side by side.

Three parts (``--parts``):

* ``pipeline``: img/s of the engine (``common.synthesis.sample``) and of diffusers'
  ``StableDiffusionPipeline`` on the same modules, prompt embeddings, DDIM steps,
  guidance and batch, alternated in one run (the ratio is the figure: absolute
  times drift on shared machines). Both start from the same per-image initial
  latents, so their images are compared too (max abs difference). On a CPU: a
  tiny SD-format model (batch 16, 20 steps) and the SD-1.5 architecture at
  64 px (batch 4, 8 steps), random weights built from configs. With
  ``--device cuda``: SD-1.5 at 512 px, DDIM 25, CFG 7.5, the engine with
  ``batch_size="auto"`` (eager, and compiled with ``--compile``), peak memory
  of both, and the 18.7 img/s compute floor of an H100 for reference.
* ``workers``: the same job (embedded generator) on 1 and 2 Ray workers
  (``--workers``), img/s and the max abs difference to one process.
* ``quality``: the default sampler setting against faster ones (DPM-Solver++,
  fewer steps, guidance cut-off) on the embedded stack, through the app's own
  client and server code in-process: images/s, FID-proxy to each client's
  held-out images, and the accuracy of the global classifier, over seeds with
  paired differences.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.report import md_table, mean, num, std, write_json

SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    in_channels=3,
    out_channels=3,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    vocab_size=49408,
)
TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    norm_num_groups=8,
)
TINY_VAE = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    in_channels=3,
    out_channels=3,
    norm_num_groups=8,
)
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    vocab_size=1000,
)
H100_FLOOR_IMG_S = 18.7  # SD-1.5 512 px, 25 steps + CFG at 352 TFLOP/s (FACTS.md)

# sampler settings of the quality part (run-config keys)
QUALITY_SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "dpm-10": {"scheduler": "dpm", "num-inference-steps": 10},
    "dpm-10-cut-0.5": {
        "scheduler": "dpm",
        "num-inference-steps": 10,
        "guidance-cutoff": 0.5,
    },
    "dpm-8-cut-0.5": {
        "scheduler": "dpm",
        "num-inference-steps": 8,
        "guidance-cutoff": 0.5,
    },
}


def say(msg: str) -> None:
    print(f"[bench synth] {msg}", flush=True)


# ---------------------------------------------------------------- pipeline part


def build_sd(
    kind: str, px: int, device: torch.device, dtype: torch.dtype
) -> tuple[Any, Any]:
    """``(Generator, StableDiffusionPipeline)`` sharing one set of random modules."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from common.generator import Generator

    unet_cfg, vae_cfg, text_cfg = (
        (SD15_UNET, SD15_VAE, SD15_TEXT)
        if kind == "sd15"
        else (TINY_UNET, TINY_VAE, TINY_TEXT)
    )
    down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    torch.manual_seed(0)
    unet = (
        UNet2DConditionModel(sample_size=px // down, **unet_cfg)
        .to(device, dtype)
        .eval()
    )
    vae = AutoencoderKL(sample_size=px, **vae_cfg).to(device, dtype).eval()
    text = CLIPTextModel(CLIPTextConfig(**text_cfg)).to(device, dtype).eval()
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    if device.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    gen = Generator(unet, sched, vae, "sequence", kind, device, dtype)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=None,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return gen, pipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_pipeline(
    kind: str,
    px: int,
    batch: int,
    steps: int,
    guidance: float,
    reps: int,
    device: torch.device,
    dtype: torch.dtype,
    compile_unet: bool = False,
) -> dict[str, Any]:
    """Engine vs StableDiffusionPipeline, alternated ``reps`` times."""
    from common.synthesis import image_generators, sample
    from common.synthesis_settings import SynthesisSettings

    gen, pipe = build_sd(kind, px, device, dtype)
    tokens, dim = (77, 768) if kind == "sd15" else (16, 64)
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(batch, tokens, dim, generator=g)
    uncond = torch.randn(1, tokens, dim, generator=g)
    # the engine's per-image x_T, handed to the pipeline as its latents
    latents = torch.stack(
        [
            torch.randn(gen.sample_shape, generator=x)
            for x in image_generators(0, range(batch))
        ]
    )
    if compile_unet:
        import dataclasses

        gen = dataclasses.replace(gen, unet=torch.compile(gen.unet, dynamic=False))
    engine_bs: int | str = "auto" if device.type == "cuda" else batch

    def engine() -> torch.Tensor:
        settings = SynthesisSettings(
            guidance_scale=guidance, num_inference_steps=steps, batch_size=engine_bs
        )
        x = sample(gen, cond, uncond, **settings.kwargs())
        return (x + 1) / 2

    def diffusers_pipe() -> torch.Tensor:
        out = pipe(
            prompt_embeds=cond.to(device, dtype),
            negative_prompt_embeds=uncond.expand(batch, -1, -1).to(device, dtype),
            latents=latents.to(device, dtype),
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="pt",
        )
        return out.images.float().cpu()

    times: dict[str, list[float]] = {"engine": [], "diffusers": []}
    peaks: dict[str, int | None] = {"engine": None, "diffusers": None}
    images = {}
    for name, fn in (("engine", engine), ("diffusers", diffusers_pipe)):  # warm-up
        images[name] = fn()
    for _ in range(reps):
        for name, fn in (("engine", engine), ("diffusers", diffusers_pipe)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peaks[name] = max(
                    peaks[name] or 0, torch.cuda.max_memory_allocated(device)
                )
    img_s = {k: batch / statistics.median(v) for k, v in times.items()}
    diff = float((images["engine"] - images["diffusers"]).abs().max())
    return {
        "model": kind,
        "px": px,
        "batch": batch,
        "steps": steps,
        "guidance": guidance,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "compiled": compile_unet,
        "reps": reps,
        "engine_img_s": img_s["engine"],
        "diffusers_img_s": img_s["diffusers"],
        "ratio": img_s["engine"] / img_s["diffusers"],
        "engine_peak_gb": peaks["engine"] / 2**30 if peaks["engine"] else None,
        "diffusers_peak_gb": peaks["diffusers"] / 2**30 if peaks["diffusers"] else None,
        "max_abs_diff": diff,
    }


# ---------------------------------------------------------------- workers part


def compare_workers(workers: list[int], n: int, steps: int) -> list[dict[str, Any]]:
    """The same job on 1..k Ray workers (embedded generator, class prompts)."""
    import ray

    from common.data import class_name_prompt
    from common.generator import load_generator
    from common.synthesis import GeneratorSpec, sample, sample_on_workers
    from common.synthesis_settings import SynthesisSettings
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


# ---------------------------------------------------------------- quality part


def quality_seed(
    seed: int,
    settings: dict[str, dict[str, Any]],
    num_clients: int,
    overrides: dict[str, Any],
) -> list[dict[str, Any]]:
    """One seed: the clients' uploads once, then every sampler setting."""
    from bench.accuracy import default_run_config
    from bench.inprocess import federation, run_variant

    fed = federation(default_run_config() | overrides | {"seed": seed}, num_clients)
    return [
        run_variant(fed, over, name) | {"setting": name}
        for name, over in settings.items()
    ]


def summarize_quality(
    rows: list[dict[str, Any]], ref: str = "default"
) -> list[dict[str, Any]]:
    """Mean ± std per setting, speed-up, and paired per-seed differences to ``ref``."""
    out = []
    by = {(r["setting"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    for name in dict.fromkeys(r["setting"] for r in rows):
        mine = [by[(name, s)] for s in seeds if (name, s) in by]
        pairs = [
            (by[(name, s)], by[(ref, s)])
            for s in seeds
            if (name, s) in by and (ref, s) in by
        ]
        d_acc = [a["accuracy"] - b["accuracy"] for a, b in pairs]
        d_glob = [
            a["global_accuracy"] - b["global_accuracy"]
            for a, b in pairs
            if a.get("global_accuracy") is not None
            and b.get("global_accuracy") is not None
        ]
        d_fid = [a["fid_proxy"] - b["fid_proxy"] for a, b in pairs]
        speed = [a["img_s"] / b["img_s"] for a, b in pairs]
        ref_rows = [by[(ref, s)] for s in seeds if (ref, s) in by]
        noise_acc = std([r["accuracy"] for r in ref_rows]) or 0.0
        noise_glob = (
            std(
                [
                    r["global_accuracy"]
                    for r in ref_rows
                    if r.get("global_accuracy") is not None
                ]
            )
            or 0.0
        )
        noise_fid = std([r["fid_proxy"] for r in ref_rows]) or 0.0
        out.append(
            {
                "setting": name,
                "seeds": len(mine),
                "img_s": mean(r["img_s"] for r in mine),
                "speedup": mean(speed),
                "accuracy": mean(r["accuracy"] for r in mine),
                "global_accuracy": mean(r.get("global_accuracy") for r in mine),
                "global_accuracy_std": std(
                    [
                        r["global_accuracy"]
                        for r in mine
                        if r.get("global_accuracy") is not None
                    ]
                ),
                "d_global_accuracy": mean(d_glob),
                "d_global_accuracy_per_seed": d_glob,
                "accuracy_std": std([r["accuracy"] for r in mine]),
                "fid_proxy": mean(r["fid_proxy"] for r in mine),
                "fid_proxy_std": std([r["fid_proxy"] for r in mine]),
                "d_accuracy": mean(d_acc),
                "d_fid_proxy": mean(d_fid),
                "d_accuracy_per_seed": d_acc,
                "d_fid_proxy_per_seed": d_fid,
                # within seed noise: the paired mean difference is inside one std of the
                # default's spread over seeds, on both metrics
                "within_noise": bool(pairs)
                and abs(mean(d_acc) or 0) <= noise_acc
                and abs(mean(d_glob) or 0) <= noise_glob
                and (mean(d_fid) or 0) <= noise_fid,
            }
        )
    return out


# ---------------------------------------------------------------- report


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "synth.json", report)
    lines = ["# Synthesis engine benchmark", "", f"Machine: {report['machine']}.", ""]
    if report.get("pipeline"):
        lines += [
            "## Engine vs diffusers' StableDiffusionPipeline (same modules, same initial latents)",
            "",
        ]
        lines.append(
            md_table(
                [
                    "model",
                    "px",
                    "batch",
                    "steps",
                    "CFG",
                    "device",
                    "dtype",
                    "compiled",
                    "engine img/s",
                    "diffusers img/s",
                    "ratio",
                    "engine peak GB",
                    "diffusers peak GB",
                    "max abs diff",
                ],
                [
                    [
                        r["model"],
                        str(r["px"]),
                        str(r["batch"]),
                        str(r["steps"]),
                        num(r["guidance"], "{:.1f}"),
                        r["device"],
                        r["dtype"],
                        str(r["compiled"]),
                        num(r["engine_img_s"]),
                        num(r["diffusers_img_s"]),
                        num(r["ratio"], "{:.3f}"),
                        num(r["engine_peak_gb"]),
                        num(r["diffusers_peak_gb"]),
                        num(r["max_abs_diff"], "{:.1e}"),
                    ]
                    for r in report["pipeline"]
                ],
            )
        )
        lines.append("")
    if report.get("workers"):
        lines += ["## Ray workers (embedded generator)", ""]
        lines.append(
            md_table(
                ["workers", "img/s", "max abs diff to one process"],
                [
                    [
                        str(r["workers"]),
                        num(r["img_s"]),
                        num(r["max_abs_diff"], "{:.1e}"),
                    ]
                    for r in report["workers"]
                ],
            )
        )
        lines.append("")
    if report.get("quality"):
        lines += ["## Quality-matched speed (embedded stack, paired seeds)", ""]
        lines.append(
            md_table(
                [
                    "setting",
                    "img/s",
                    "speed-up",
                    "global acc %",
                    "client acc %",
                    "FID-proxy",
                    "Δglobal (points)",
                    "Δclient (points)",
                    "ΔFID-proxy",
                    "within seed noise",
                ],
                [
                    [
                        q["setting"],
                        num(q["img_s"]),
                        num(q["speedup"], "{:.2f}x"),
                        f"{100 * (q['global_accuracy'] or 0):.1f} ± "
                        f"{100 * (q['global_accuracy_std'] or 0):.1f}",
                        f"{100 * q['accuracy']:.1f} ± {100 * (q['accuracy_std'] or 0):.1f}",
                        f"{q['fid_proxy']:.2f} ± {q['fid_proxy_std'] or 0:.2f}",
                        num(100 * (q["d_global_accuracy"] or 0), "{:+.1f}"),
                        num(100 * (q["d_accuracy"] or 0), "{:+.1f}"),
                        num(q["d_fid_proxy"], "{:+.2f}"),
                        "yes" if q["within_noise"] else "no",
                    ]
                    for q in report["quality"]
                ],
            )
        )
        lines.append("")
    lines += [f"- {n}" for n in report.get("notes", [])]
    (out / "synth.md").write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench synth", description=__doc__.split("\n")[0]
    )
    p.add_argument("--parts", default="pipeline,workers,quality")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--compile", action="store_true", help="also the compiled UNet (cuda)"
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--settings", default=",".join(QUALITY_SETTINGS))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument(
        "--quick", action="store_true", help="the accuracy bench's quick world"
    )
    p.add_argument("--out", default="bench-results")
    return p


def main(argv: list[str] | None = None) -> int:
    import os
    import platform

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = sorted(set(parts) - {"pipeline", "workers", "quality"})
    settings = {
        s: QUALITY_SETTINGS[s]
        for s in args.settings.split(",")
        if s in QUALITY_SETTINGS
    }
    if bad or not settings:
        raise SystemExit(
            f"--parts must be among pipeline, workers, quality (got {bad}); "
            f"--settings among {', '.join(QUALITY_SETTINGS)}"
        )
    device = torch.device(args.device)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}"
    )
    out = Path(args.out)
    # parts not run this time keep their numbers from the last report
    previous = out / "synth.json"
    report: dict[str, Any] = (
        json.loads(previous.read_text()) if previous.is_file() else {}
    )
    report |= {"machine": machine, "args": vars(args), "notes": []}
    t_all = time.perf_counter()
    if "pipeline" in parts:
        runs = (
            [("sd15", 512, 32, 25, 7.5, torch.bfloat16, False)]
            + (
                [("sd15", 512, 32, 25, 7.5, torch.bfloat16, True)]
                if args.compile
                else []
            )
            if device.type == "cuda"
            else [
                ("tiny", 32, 16, 20, 7.5, torch.float32, False),
                ("sd15", 64, 4, 8, 7.5, torch.float32, False),
            ]
        )
        report["pipeline"] = []
        for kind, px, batch, steps, w, dtype, comp in runs:
            say(f"pipeline: {kind} {px}px batch {batch}, {steps} steps")
            report["pipeline"].append(
                compare_pipeline(
                    kind, px, batch, steps, w, args.reps, device, dtype, comp
                )
            )
            r = report["pipeline"][-1]
            say(
                f"  engine {r['engine_img_s']:.2f} img/s, diffusers {r['diffusers_img_s']:.2f} "
                f"img/s, ratio {r['ratio']:.3f}, max abs diff {r['max_abs_diff']:.1e}"
            )
            write_report(out, report)
        if device.type == "cuda":
            report["notes"].append(
                f"H100 compute floor at this setting: {H100_FLOOR_IMG_S} img/s"
            )
        else:
            report["notes"].append("peak memory is measured on CUDA only")
    if "workers" in parts:
        ws = [int(w) for w in args.workers.split(",")]
        say(f"workers: {ws}")
        report["workers"] = compare_workers(ws, n=64, steps=20)
        write_report(out, report)
    if "quality" in parts:
        from bench.accuracy import QUICK

        over = (dict(QUICK) if args.quick else {}) | {"min-clients": args.clients}
        seeds = [int(x) for x in args.seeds.split(",")]
        # earlier seeds of the same settings are kept; the seeds run now replace theirs
        rows: list[dict[str, Any]] = [
            r
            for r in report.get("quality_runs", [])
            if r["seed"] not in seeds and r["setting"] in settings
        ]
        for s in seeds:
            rows += quality_seed(s, settings, args.clients, over)
            report["quality_runs"] = rows
            report["quality"] = summarize_quality(rows)
            write_report(out, report)
        report["notes"].append(
            "quality: the same client uploads per seed for every setting; global acc: the "
            "global classifier on the global test set (MNIST test digits in every "
            "client's domain); client acc: on every client's held-out split (mean); "
            "FID-proxy: judge features of each client's synthetic images against its "
            "held-out images (mean over clients); within seed noise: |paired Δacc| and "
            "ΔFID-proxy no larger than the default's std over seeds"
        )
    report["wall_s"] = time.perf_counter() - t_all
    report["notes"].append(f"wall time {report['wall_s']:.0f} s on {machine}")
    write_report(out, report)
    print(
        json.dumps(
            {k: report[k] for k in ("pipeline", "workers", "quality") if k in report},
            indent=1,
            default=str,
        )[:4000]
    )
    return 0

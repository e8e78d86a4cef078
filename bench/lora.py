"""``python -m bench lora``: one-shot federated LoRA merges side by side.

Two worlds of concepts the embedded generator never saw (``--world``):

* ``shared`` (default; FedDDPM's setting, arXiv 2503.06426: non-IID clients of
  one new domain): every client's digits are upside-down, a transform
  pretraining never used, each client in its own rare style (inverted, thick,
  rotated, noisy) with Dirichlet label skew. A merge must carry the new domain
  to every client's style and classes.
* ``disjoint`` (multi-concept personalisation): each client holds a different
  unseen transform (``inverted+mirrored``, ``thick+upside-down``, ``thin+boxed``,
  ``rotated+small``). An average of updates keeps each concept at 1/N strength.

See ``common.data.UNSEEN_TRANSFORMS``. Per seed, in-process and with the app's
own code paths:

1. every client fine-tunes a LoRA adapter on its data
   (``methods.lora.client_lora.train_client_lora``, as the ClientApp does) and uploads it
   with its per-class caption embeddings (fp16, bytes counted);
2. the server validates the uploads (``methods.lora.server_lora.Lora.validate``);
3. for each variant it gets one adapter per client: ``none`` (the base
   generator), each merge of ``Lora.merge`` (``fedavg``, ``stack``, ``svd``,
   ``ties``, ``dare``, ``generative``), or ``own`` (each client's own adapter:
   the reference a merge tries to keep);
4. it samples ``images-per-class`` images per (client, class) from the client's
   caption embeddings with that adapter (``methods.steps.synthesize_set``):
   the **FID-proxy** of each client's samples against the client's held-out
   images (judge features), and the **downstream accuracy** of the global
   classifier trained on all clients' samples (``train_global``) on every
   client's held-out split, averaged over ``--probes`` classifier inits (a
   steadier probe of the samples than one training run).

Outputs (``--out``): ``lora.json`` (every record, the summary), ``lora.md`` and
``lora.png``; all three are rewritten after each seed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .report import md_table, mean, mean_std, nbytes, num, pct, std, write_json

MERGES = ("fedavg", "stack", "svd", "ties", "dare", "generative")
VARIANTS = ("none", *MERGES, "own")
# The merges the issue expects to beat fedavg (FedIT) on both metrics.
CHALLENGERS = ("stack", "svd", "generative")

# Client domains of each world: client i holds domain i.
WORLDS: dict[str, str] = {
    "shared": "inverted+upside-down,thick+upside-down,rotated+upside-down,noisy+upside-down",
    "disjoint": "inverted+mirrored,thick+upside-down,thin+boxed,rotated+small",
}
# Both worlds and modes.
WORLD: dict[str, Any] = {
    "method": "lora",
    "partition": "dirichlet",
    "dirichlet-alpha": 0.5,
}
# --quick: fewer steps and samples so that 3 seeds x 8 variants fit in 20 minutes
# on the 2-core CPU. Client training costs steps x batch, not dataset size, so
# clients keep 800 examples (160 held out: a steadier accuracy).
QUICK: dict[str, Any] = {
    "max-examples-per-client": 800,
    "lora-steps": 150,
    "lora-samples-per-class": 16,
    "images-per-class": 12,
    "num-inference-steps": 10,
    "train-epochs": 10,
    "train-batch-size": 32,
}
FULL: dict[str, Any] = {
    "max-examples-per-client": 1500,
    "lora-steps": 400,
    "images-per-class": 24,
    "train-batch-size": 64,
}


# ---------------------------------------------------------------- pure parts


def parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(
            f"--{what} {text!r}: unknown {bad}; choose from {', '.join(allowed)}"
        )
    return items


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: mean/std over seeds of the per-seed mean FID-proxy and accuracy,
    the per-domain means, bytes and merge time. One record = one (variant, seed)."""
    out: dict[str, dict[str, Any]] = {}
    for v in dict.fromkeys(r["variant"] for r in records):
        rs = [r for r in records if r["variant"] == v]
        fid = [r["mean_fid_proxy"] for r in rs]
        acc = [r["mean_accuracy"] for r in rs]
        domains: dict[str, dict[str, list[float]]] = {}
        for r in rs:
            for c in r["clients"]:
                d = domains.setdefault(c["domain"], {"fid": [], "acc": []})
                d["fid"].append(c["fid_proxy"])
                d["acc"].append(c["accuracy"])
        out[v] = {
            "seeds": [r["seed"] for r in rs],
            "mean_fid_proxy": mean(fid),
            "std_fid_proxy": std(fid),
            "mean_accuracy": mean(acc),
            "std_accuracy": std(acc),
            "per_domain": {
                k: {"fid_proxy": mean(d["fid"]), "accuracy": mean(d["acc"])}
                for k, d in domains.items()
            },
            "upload_bytes_per_client": mean([r["upload_bytes_per_client"] for r in rs]),
            "download_bytes_per_client": mean(
                [r["download_bytes_per_client"] for r in rs]
            ),
            "merge_s": mean([r["merge_s"] for r in rs if r["merge_s"] is not None]),
            "merged_rank": rs[0]["merged_rank"],
            "energy_kept": mean(
                [r["energy_kept"] for r in rs if r["energy_kept"] is not None]
            ),
        }
    return out


def wins(summary: dict[str, dict[str, Any]], a: str, b: str) -> dict[str, bool] | None:
    """Does variant ``a`` beat ``b`` on both FID-proxy (lower) and accuracy (higher)?"""
    if a not in summary or b not in summary:
        return None
    sa, sb = summary[a], summary[b]
    return {
        "fid_proxy": sa["mean_fid_proxy"] < sb["mean_fid_proxy"],
        "accuracy": sa["mean_accuracy"] > sb["mean_accuracy"],
    }


def seed_wins(records: list[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """Per seed, paired: in how many seeds ``a`` beats ``b`` on FID-proxy (lower)
    and on accuracy (higher), and the mean paired difference ``a - b`` of each."""
    by = {(r["variant"], r["seed"]): r for r in records}
    seeds = [s for (v, s) in by if v == a and (b, s) in by]
    if not seeds:
        return None
    dfid = [by[a, s]["mean_fid_proxy"] - by[b, s]["mean_fid_proxy"] for s in seeds]
    dacc = [by[a, s]["mean_accuracy"] - by[b, s]["mean_accuracy"] for s in seeds]
    return {
        "seeds": len(seeds),
        "fid_proxy_wins": sum(d < 0 for d in dfid),
        "accuracy_wins": sum(d > 0 for d in dacc),
        "mean_fid_proxy_diff": mean(dfid),
        "mean_accuracy_diff": mean(dacc),
    }


def checks(report_records: list[dict[str, Any]], summary: dict[str, Any]) -> dict:
    """For each challenger: wins over fedavg on the means, and seed by seed."""
    out = {}
    for a in CHALLENGERS:
        on_means, per_seed = (
            wins(summary, a, "fedavg"),
            seed_wins(report_records, a, "fedavg"),
        )
        if on_means is None or per_seed is None:
            continue
        out[f"{a} vs fedavg"] = {"means": on_means, "per_seed": per_seed}
    return out


def format_checks(chk: dict[str, Any]) -> list[str]:
    lines = []
    for name, c in chk.items():
        m, p = c["means"], c["per_seed"]
        verdict = "beats" if m["fid_proxy"] and m["accuracy"] else "does NOT beat"
        lines.append(
            f"* {name}: {verdict} fedavg on the means (FID-proxy "
            f"{'lower' if m['fid_proxy'] else 'not lower'}, accuracy "
            f"{'higher' if m['accuracy'] else 'not higher'}); seed by seed: lower "
            f"FID-proxy in {p['fid_proxy_wins']}/{p['seeds']}, higher accuracy in "
            f"{p['accuracy_wins']}/{p['seeds']}; mean paired difference "
            f"{p['mean_fid_proxy_diff']:+.2f} FID-proxy, "
            f"{100 * p['mean_accuracy_diff']:+.1f} accuracy points"
        )
    return lines


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    header = [
        "variant",
        "FID-proxy (lower is better)",
        "downstream acc (%)",
        "upload B/client",
        "download B/client",
        "merged rank",
        "energy kept",
        "merge s",
    ]
    rows = [
        [
            v,
            mean_std(s["mean_fid_proxy"], s["std_fid_proxy"]),
            mean_std(s["mean_accuracy"], s["std_accuracy"], 100, "{:.1f}"),
            nbytes(s["upload_bytes_per_client"]),
            nbytes(s["download_bytes_per_client"]),
            num(s["merged_rank"], "{}"),
            num(s["energy_kept"], "{:.3f}"),
            num(s["merge_s"]),
        ]
        for v, s in summary.items()
    ]
    return md_table(header, rows)


def format_domain_table(summary: dict[str, dict[str, Any]]) -> str:
    doms = sorted({d for s in summary.values() for d in s["per_domain"]})
    rows = []
    for v, s in summary.items():
        cells = []
        for d in doms:
            x = s["per_domain"].get(d)
            cells.append(
                "n/a" if x is None else f"{num(x['fid_proxy'])} / {pct(x['accuracy'])}"
            )
        rows.append([v, *cells])
    return md_table(["variant", *(f"{d} FID / acc%" for d in doms)], rows)


def paired_diffs(
    records: list[dict[str, Any]], base: str = "fedavg"
) -> dict[str, list[tuple[float, float]]]:
    """Per variant, per seed: (FID-proxy, accuracy) minus ``base``'s in that seed."""
    by = {(r["variant"], r["seed"]): r for r in records}
    out: dict[str, list[tuple[float, float]]] = {}
    for v, seed in by:
        if v != base and (base, seed) in by:
            r, b = by[v, seed], by[base, seed]
            out.setdefault(v, []).append(
                (
                    r["mean_fid_proxy"] - b["mean_fid_proxy"],
                    r["mean_accuracy"] - b["mean_accuracy"],
                )
            )
    return out


def plot(
    out: Path, summary: dict[str, dict[str, Any]], records: list[dict[str, Any]]
) -> Path | None:
    """Top: each variant's mean ± std over seeds. Bottom: paired differences to
    fedavg, one dot per seed and the mean as a bar (below 0 / above 0 is better)."""
    if not summary:
        return None
    from .report import pyplot, save_figure

    plt = pyplot()
    names = list(summary)
    colors = ["#999999" if n in ("none", "own") else "#4C72B0" for n in names]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.6))
    for ax, key, std_key, scale, label in (
        (
            axes[0, 0],
            "mean_fid_proxy",
            "std_fid_proxy",
            1.0,
            "FID-proxy (lower is better)",
        ),
        (axes[0, 1], "mean_accuracy", "std_accuracy", 100.0, "downstream accuracy (%)"),
    ):
        vals = [(summary[n][key] or 0.0) * scale for n in names]
        errs = [(summary[n][std_key] or 0.0) * scale for n in names]
        bars = ax.bar(names, vals, yerr=errs, capsize=3, color=colors)
        ax.bar_label(bars, labels=[f"{x:.1f}" for x in vals], fontsize=7)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
    diffs = paired_diffs(records)
    others = [n for n in names if n in diffs]
    for ax, j, scale, label in (
        (axes[1, 0], 0, 1.0, "FID-proxy - fedavg's (same seed)"),
        (axes[1, 1], 1, 100.0, "accuracy - fedavg's (points, same seed)"),
    ):
        means = [scale * sum(d[j] for d in diffs[n]) / len(diffs[n]) for n in others]
        shade = ["#999999" if n in ("none", "own") else "#4C72B0" for n in others]
        ax.bar(others, means, color=shade, alpha=0.5)
        for i, n in enumerate(others):
            ax.scatter(
                [i] * len(diffs[n]),
                [scale * d[j] for d in diffs[n]],
                color="black",
                s=10,
                zorder=3,
            )
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(
        "one-shot federated LoRA on unseen concepts (grey: references; bottom: dots = seeds)"
    )
    return save_figure(fig, out / "lora.png")


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = report["summary"]
    write_json(out / "lora.json", report, indent=1)
    cfg = report["config"]
    md = [
        "# One-shot federated LoRA: merges on unseen concepts",
        "",
        f"`{report['command']}`",
        "",
        f"* mode: **{report['mode']}**; world **{report['world']}**; "
        f"{report['num_clients']} clients; seeds {report['seeds']}; domains "
        f"`{cfg['domains']}` (a rare style + a transform the base generator never "
        f"saw), Dirichlet {cfg['dirichlet-alpha']}, {cfg['max-examples-per-client']} "
        f"examples per client ({cfg['test-fraction']:.0%} held out)",
        f"* client LoRA: rank {cfg['lora-rank']}, alpha {cfg['lora-alpha']}, targets "
        f"`{cfg['lora-targets']}`, init `{cfg['lora-init']}`, {cfg['lora-steps']} "
        f"steps of batch {cfg['lora-batch-size']}; svd merge rank "
        f"{cfg['lora-merge-rank']}; {cfg['images-per-class']} samples per (client, "
        f"class), {cfg['num-inference-steps']} steps, guidance {cfg['guidance-scale']}",
        f"* machine: {report['machine']}; wall time {report['wall_s']:.0f} s",
        "",
        "## Mean over clients, then over seeds (± std over seeds)",
        "",
        format_table(summary),
        "",
        "## Per client domain (mean over seeds)",
        "",
        format_domain_table(summary),
        "",
        "## Checks",
        "",
        *format_checks(report.get("checks", {})),
        "",
        "## Notes",
        "",
        "* `none`: the base generator conditioned on each client's caption embeddings "
        "(OSCAR with this world); `own`: each client's own adapter for its own samples "
        "(what a merge tries to keep, not a federated result).",
        "* FID-proxy: Fréchet distance in the judge classifier's features between a "
        "client's samples and its held-out real images; downstream accuracy: the "
        "classifier trained on all clients' samples, on each client's held-out split "
        f"(mean over {report.get('probes', 1)} classifier inits); `generative` = the "
        "`svd` merge corrected on samples of every client's adapter (FedDDPM).",
        "* paired: every variant samples with the same noise, captions and classifier "
        "seeds, so per-seed differences between variants are paired comparisons.",
        "* upload: one client's adapter + per-class embeddings in fp16; download: the "
        "merged adapter in fp16.",
    ]
    (out / "lora.md").write_text("\n".join(md) + "\n")
    plot(out, summary, report["records"])


# ---------------------------------------------------------------- one seed


def run_seed(
    overrides: dict[str, Any],
    seed: int,
    num_clients: int,
    variants: Sequence[str],
    work: Path,
    probes: int = 3,
) -> list[dict[str, Any]]:
    from client_app.app import client_data
    from common import contract as C
    from common.datasets import dataset_info
    from common.lora import set_lora_state
    from common.maths import fid_proxy
    from common.models import load_classifier
    from common.train import features
    from common.weights import embedded_dir
    from methods import build_config
    from methods.base import ServerContext, ServerOutput, classifier_accuracy
    from methods.lora import payload_lora as PL
    from methods.lora.client_lora import train_client_lora
    from methods.lora.config_lora import LoraConfig
    from methods.lora.server_lora import Lora
    from methods.steps import synthesize_set, train_global

    cfg = build_config(overrides | {"seed": seed})
    lcfg = cfg.options(LoraConfig)
    datas = [client_data(cfg, pid, num_clients) for pid in range(num_clients)]
    # 1. clients: fine-tune and upload once
    replies, own, train_s = [], {}, []
    for pid, data in enumerate(datas):
        say(f"seed {seed}: client {pid} ({data.domain}) fine-tunes its adapter")
        r = train_client_lora(cfg, data, seed=seed * 1000 + pid)
        train_s.append(r.train_s)
        own[pid] = r.adapter
        tensors = {
            k: v.half() if v.is_floating_point() else v
            for k, v in PL.layout(r.adapter, r.embed.embeddings).items()
        }
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        replies.append(
            C.Reply(
                pid + 1,
                pid,
                len(data.train_labels),
                nbytes,
                {"base-model": r.base_fingerprint},
                {},
                tensors,
            )
        )
    # 2. server: validate
    ctx = ServerContext(cfg, work / f"seed{seed}", info=dataset_info(cfg.data_args()))
    method = Lora()
    method.check(ctx)
    for rep in replies:
        method.validate(rep, ctx)
    judge = load_classifier(embedded_dir() / "judge")
    real_feats = [features(judge, d.test_images) for d in datas]
    unet, targets = ctx.generator.unet, lcfg.target_list
    n = cfg.images_per_class

    records = []
    for v in variants:
        t0 = time.perf_counter()
        # 3. one adapter per client (or none)
        merge_s = rank = energy = None
        download = 0
        if v in MERGES:
            ctx.cfg = cfg.replace(lora_merge=v)
            out = ServerOutput()
            merged, rank, alpha = method.merge(replies, ctx, out)
            merge_s, energy = out.timings["merge"], out.extra["lora"]["energy_kept"]
            download = out.extra["lora"]["merged_adapter_bytes"]
            per_client = {pid: (merged, rank, alpha) for pid in range(num_clients)}
            ctx.cfg = cfg
        elif v == "own":
            per_client = {p: (own[p], lcfg.lora_rank, lcfg.lora_alpha) for p in own}
        else:
            per_client = {p: None for p in own}
        # 4. sample per (client, class); FID-proxy per client; downstream accuracy
        images, labels, clients = [], [], []
        for pid, rep in enumerate(replies):
            unet.unload_lora()
            if per_client[pid] is not None:
                a, rk, al = per_client[pid]
                set_lora_state(unet, a, rk, al, targets)
            cond = rep.tensors[PL.EMB + "mean"].float().repeat_interleave(n, dim=0)
            y = rep.tensors[PL.EMB + "class_ids"].repeat_interleave(n)
            x = synthesize_set(
                ctx,
                cond,
                y,
                torch.full_like(y, pid),
                ServerOutput(),
                desc=f"seed {seed} {v} client {pid}",
            )
            images.append(x)
            labels.append(y)
            clients.append(
                {
                    "partition_id": pid,
                    "domain": datas[pid].domain,
                    "fid_proxy": fid_proxy(real_feats[pid], features(judge, x)),
                }
            )
        unet.unload_lora()
        # 5. downstream probe: the app's global classifier from `probes` inits
        # (seed + 1000 k; k = 0 is the app's own), accuracy averaged over them
        x_all, y_all = torch.cat(images), torch.cat(labels)
        for c in clients:
            c["accuracy_probes"] = []
        for k in range(probes):
            ctx.cfg = cfg.replace(seed=cfg.seed + 1000 * k)
            out = ServerOutput()
            train_global(ctx, x_all, y_all, out)
            assert out.model_state is not None
            for c, data in zip(clients, datas, strict=True):
                c["accuracy_probes"].append(
                    classifier_accuracy(
                        out.model_state, out.arch, ctx.num_classes, data
                    )
                )
        ctx.cfg = cfg
        for c in clients:
            c["accuracy"] = mean(c["accuracy_probes"])
        rec = {
            "variant": v,
            "seed": seed,
            "clients": clients,
            "mean_fid_proxy": mean([c["fid_proxy"] for c in clients]),
            "mean_accuracy": mean([c["accuracy"] for c in clients]),
            "upload_bytes_per_client": mean([float(r.upload_bytes) for r in replies]),
            "download_bytes_per_client": download,
            "merge_s": merge_s,
            "merged_rank": rank,
            "energy_kept": energy,
            "client_train_s": mean(train_s),
            "variant_s": time.perf_counter() - t0,
        }
        say(
            f"seed {seed} {v:>10}: FID-proxy {rec['mean_fid_proxy']:.2f}, "
            f"accuracy {rec['mean_accuracy']:.3f} ({rec['variant_s']:.0f} s)"
        )
        records.append(rec)
    return records


# ---------------------------------------------------------------- CLI


def say(msg: str) -> None:
    print(f"[bench lora] {msg}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench lora", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="the <= 20 minute CPU setting")
    p.add_argument(
        "--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)"
    )
    p.add_argument(
        "--world",
        choices=sorted(WORLDS),
        default="shared",
        help="shared: one new domain for all clients (default); "
        "disjoint: a different new concept per client",
    )
    p.add_argument("--clients", type=int, default=4, help="clients (default 4)")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    p.add_argument(
        "--probes",
        type=int,
        default=3,
        help="downstream classifiers per variant, from different inits; "
        "accuracy is their mean (default 3)",
    )
    p.add_argument("--out", default="bench-results", help="output folder")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override, e.g. --set lora-steps=300",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from bench.accuracy import default_run_config, parse_seeds, parse_sets
    from methods import build_config

    args = build_parser().parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        variants = parse_list(args.variants, VARIANTS, "variants")
        if args.clients < 2:
            raise ValueError(f"--clients {args.clients} must be >= 2")
        if args.probes < 1:
            raise ValueError(f"--probes {args.probes} must be >= 1")
        overrides = default_run_config() | WORLD | {"domains": WORLDS[args.world]}
        overrides |= (QUICK if args.quick else FULL) | parse_sets(args.set)
        cfg = build_config(overrides)  # fail before any work on a bad --set
    except ValueError as e:
        print(f"python -m bench lora: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = Path(args.out)
    work = out / "lora-work"
    report: dict[str, Any] = {
        "command": " ".join(
            ["python -m bench lora", *(sys.argv[1:] if argv is None else argv)]
        ),
        "mode": "quick" if args.quick else "full",
        "world": args.world,
        "seeds": seeds,
        "num_clients": args.clients,
        "probes": args.probes,
        "config": cfg.to_flat(),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
        "records": [],
        "summary": {},
    }
    t0 = time.perf_counter()
    for seed in seeds:
        report["records"] += run_seed(
            overrides, seed, args.clients, variants, work, args.probes
        )
        report["summary"] = aggregate(report["records"])
        report["wall_s"] = time.perf_counter() - t0
        report["checks"] = checks(report["records"], report["summary"])
        write_report(out, report)
        say(f"seed {seed} done; report in {out / 'lora.md'}")
    print(format_table(report["summary"]))
    print("\n".join(format_checks(report["checks"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

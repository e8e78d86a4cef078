"""``python -m bench accuracy``: accuracy of every one-shot method, over seeds.

The headline is the accuracy on the global test set (results.json's
``global_accuracy``): the dataset's test split in the domain of every client,
balanced over classes, as one-shot FL papers report it. The global model is
evaluated on it; for ``local``, each client's own model (mean over clients).
The mean accuracy on the clients' own held-out splits (which carry their label
skew and favour a model trained on their own data) is the second table.

Every federated method runs as the real Flower app in local simulation
(``flwr run . local``, see :mod:`bench.flower_runs`); the ``centralized`` oracle
is computed in-process: the same classifier trained on the union of all
clients' real training data and evaluated on the same global test set (the same
function, the same domains) and on each client's held-out split.

Outputs (``--out``, default ``bench-results/``): ``accuracy.json`` (every run,
the per-method summary, the FID-proxy), ``accuracy.md`` (tables) and
``accuracy.png`` (global accuracy with std error bars, global accuracy per domain).

The FID-proxy section measures the generator per client domain: the Fréchet
distance, in the judge classifier's feature space, between real images of the
domain and samples conditioned on an OSCAR upload of that domain (retrieval
and oracle captions), or on plain class-name prompts (the FGL baseline).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (flwr depends on tomli)
    import tomli as tomllib

from deploy.procs import log_tail

from .flower_runs import REPO_ROOT, FlowerRun, LocalSimulation
from .report import md_table, mean, nbytes, num, pct, std, write_json

ORACLE = "centralized"

# Run-config overrides of each benchmarked method (``None``: computed in-process).
METHODS: dict[str, dict[str, Any] | None] = {
    "oscar": {"method": "oscar"},
    "oscar-oracle": {"method": "oscar", "captioner": "oracle"},
    "oscar-dp": {"method": "oscar", "dp-epsilon": 1.0, "prototypes-per-class": 1},
    "class-names": {"method": "class-names"},
    "fedavg": {"method": "fedavg"},
    "local": {"method": "local"},
    "feddisc": {"method": "feddisc"},
    "feddeo": {"method": "feddeo"},
    "fedlmg": {"method": "fedlmg"},
    "fedlmg-hetero": {"method": "fedlmg", "fedlmg-client-classifiers": "cnn,resnet18"},
    "dense": {"method": "dense"},
    "feddiff": {"method": "feddiff"},
    ORACLE: None,
}
# oscar-oracle and oscar-dp stay out of the default table to keep --quick within
# 40 minutes on the 2-core CPU (--methods adds them).
DEFAULT_METHODS = (
    "oscar",
    "feddisc",
    "feddeo",
    "fedlmg",
    "class-names",
    "fedavg",
    "dense",
    "feddiff",
    "local",
    ORACLE,
)
# Rows read from a method's results.json (computed in the same run, same seed):
# FedDiff's references (the pool's best model alone; the clients' average with the
# generated subset taken from the pool's best).
# FedDiff's clients start from the pool's best model, so its fair averaging
# baseline is the average of the same uploads (`feddiff:fedavg`), not `fedavg`'s
# run (random initial model).
REFERENCES = {
    "feddiff:fedavg": ("feddiff", "fedavg"),
    "feddiff:pool-best": ("feddiff", "pool-best"),
    "feddiff:average-with-pool-subset": ("feddiff", "average-with-pool-subset"),
}
# Paired per-seed differences of global accuracy reported (A, B): every diffusion
# method against the prompt-only baseline, the model-based ones against averaging.
PAIRS = (
    ("oscar", "class-names"),
    ("feddisc", "class-names"),
    ("feddeo", "class-names"),
    ("fedlmg", "class-names"),
    ("fedlmg", "fedavg"),
    ("fedlmg-hetero", "fedavg"),
    ("dense", "fedavg"),
    ("feddiff", "feddiff:fedavg"),
    ("feddiff", "feddiff:pool-best"),
    ("feddiff", "feddiff:average-with-pool-subset"),
)

# --quick: the default world (partition, domains, image size, generator, sampler,
# epochs) with fewer examples per client; smaller batches keep the number of
# optimizer steps up on the smaller sets. Every synthesizing method gets the same
# budget, 30 images per (client, class) (FedLMG's and FedDEO's paper setting;
# class-names: 30 x clients per class), instead of the default 50, so that the
# whole default table fits 40 minutes on the 2-core CPU (~20 s of Flower start-up
# per run).
QUICK_WORLD: dict[str, Any] = {
    "max-examples-per-client": 600,
    "train-batch-size": 32,
}
QUICK: dict[str, Any] = QUICK_WORLD | {"images-per-class": 30}
QUICK_FID_PER_CLASS = 16
FULL_FID_PER_CLASS = 64

NOTES = (
    "global acc: accuracy on the global test set, the dataset's test split (MNIST's "
    "official test set) in the domain of every client, balanced over classes: the "
    "global model's, or for `local` the mean over clients of each client's own model's; "
    "the mean over seeds of each run's `global_accuracy`.",
    f"`{ORACLE}` is an oracle computed in-process, not through Flower: the same "
    "classifier (`classifier`, `train-epochs`, `learning-rate`) trained on the union of "
    "the real training data of all clients and evaluated on the same global test set "
    "and on each client's held-out split.",
    f"gap = method - {ORACLE} (accuracy points); std is the sample std over seeds "
    "(n-1); mean client acc is the mean over seeds of each run's mean accuracy on "
    "the clients' own held-out splits (they carry each client's label skew).",
    "wall s/run: the whole `flwr run` command (SuperLink/simulation start-up, client "
    f"and server work); for `{ORACLE}`, the in-process data loading and training.",
    "upload B/client: what one client uploads once (fp16 embeddings for oscar, the "
    "model weights for fedavg, nothing for class-names and local).",
)


# ---------------------------------------------------------------- configuration


@functools.cache
def _pyproject_defaults() -> tuple[tuple[str, Any], ...]:
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return tuple(tomllib.load(f)["tool"]["flwr"]["app"]["config"].items())


def default_run_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app's pyproject.toml, read once per process:
    a benchmark keeps the defaults it started with while the file is edited (the
    modules it imported do not change either)."""
    return dict(_pyproject_defaults())


def base_overrides(
    quick: bool, num_clients: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Overrides shared by every run of one benchmark (the seed and method come on top)."""
    over: dict[str, Any] = dict(QUICK) if quick else {}
    # Wait for all simulated clients, not just the default min-clients.
    over["min-clients"] = num_clients
    return over | dict(extra or {})


def run_overrides(method: str, seed: int, base: dict[str, Any]) -> dict[str, Any]:
    spec = METHODS[method]
    if spec is None:
        raise ValueError(f"method {method!r} is computed in-process, not with flwr run")
    return base | spec | {"seed": seed}


def parse_methods(values: Sequence[str] | None) -> list[str]:
    """``["oscar,fedavg", "local"]`` -> ``["oscar", "fedavg", "local"]`` (checked)."""
    if not values:
        return list(DEFAULT_METHODS)
    names = [m.strip() for v in values for m in v.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(
            f"--seeds {text!r}: use comma-separated integers, e.g. 0,1,2"
        ) from None
    if not seeds:
        raise ValueError(f"--seeds {text!r}: give at least one seed")
    return list(dict.fromkeys(seeds))


# ---------------------------------------------------------------- run records


def record_from_results(
    method: str,
    seed: int,
    results: dict[str, Any] | None,
    wall_s: float,
    via: str = "flower",
    error: str | None = None,
) -> dict[str, Any]:
    """The part of one run's results.json the benchmark keeps."""
    rec: dict[str, Any] = {
        "method": method,
        "seed": seed,
        "via": via,
        "wall_s": round(wall_s, 2),
    }
    if results is None or results.get("mean_accuracy") is None:
        return rec | {"ok": False, "error": error or "no mean_accuracy in results"}
    clients = [
        {
            "partition_id": c.get("partition_id"),
            "domain": c.get("domain"),
            "accuracy": c.get("accuracy"),
            "status": c.get("status", "ok"),
        }
        for c in results.get("clients", [])
    ]
    glob = results.get("global_accuracy")
    per_image = [
        (c.get("metrics") or {}).get("client-s-per-image")
        for c in results.get("clients", [])
    ]
    refs = {
        name: (results.get(m) or {}).get("references", {}).get(key)
        for name, (m, key) in REFERENCES.items()
        if m == method
    }
    return rec | {
        "ok": True,
        "mean_accuracy": float(results["mean_accuracy"]),
        "global_accuracy": float(glob) if glob is not None else None,
        "global_accuracy_per_domain": dict(
            results.get("global_accuracy_per_domain") or {}
        ),
        "global_test_size": results.get("global_test_size"),
        "upload_bytes_per_client": results.get("upload_bytes_per_client"),
        "upload_bytes_per_class": results.get("upload_bytes_per_class"),
        "server_timings_s": results.get("timings_s", {}),
        "device": results.get("device", "cpu"),
        "client_s_per_image": mean(per_image),
        "client_s": mean(
            (c.get("metrics") or {}).get("client-s") for c in results.get("clients", [])
        ),
        "references": {k: v for k, v in refs.items() if v is not None},
        "clients": clients,
    }


def aggregate(
    records: list[dict[str, Any]],
    methods: Sequence[str] | None = None,
    oracle: str = ORACLE,
) -> dict[str, dict[str, Any]]:
    """Per method: mean/std over seeds of the runs' global accuracy and of their
    mean client accuracy, and more.

    Failed runs are left out of every mean and listed under ``failed_seeds``.
    """
    order = (
        list(methods) if methods else list(dict.fromkeys(r["method"] for r in records))
    )
    out: dict[str, dict[str, Any]] = {}
    for m in order:
        runs = [r for r in records if r["method"] == m]
        ok = [r for r in runs if r.get("ok")]
        accs = [r["mean_accuracy"] for r in ok]
        globs = [
            r["global_accuracy"] for r in ok if r.get("global_accuracy") is not None
        ]
        global_per_domain: dict[str, list[float]] = {}
        for r in ok:
            for d, a in (r.get("global_accuracy_per_domain") or {}).items():
                global_per_domain.setdefault(str(d), []).append(float(a))
        per_client: dict[int, dict[str, Any]] = {}
        per_domain: dict[str, list[float]] = {}
        for r in ok:
            for c in r["clients"]:
                pid, acc = c.get("partition_id"), c.get("accuracy")
                if not isinstance(pid, int):
                    continue
                row = per_client.setdefault(
                    pid, {"partition_id": pid, "domain": None, "accuracies": []}
                )
                row["domain"] = row["domain"] or c.get("domain")
                if acc is not None:
                    row["accuracies"].append(float(acc))
                    per_domain.setdefault(str(c.get("domain")), []).append(float(acc))
        clients = []
        for pid in sorted(per_client):
            row = per_client[pid]
            clients.append(
                row
                | {"accuracy": mean(row["accuracies"]), "std": std(row["accuracies"])}
            )
        uploads = [r.get("upload_bytes_per_client") for r in ok] if m != oracle else []
        out[m] = {
            "runs": len(runs),
            "seeds": [r["seed"] for r in ok],
            "failed_seeds": [r["seed"] for r in runs if not r.get("ok")],
            "mean_accuracy": mean(accs),
            "std": std(accs),
            "global_accuracy": mean(globs),
            "global_std": std(globs),
            "global_seeds": len(globs),  # runs with a global test set
            "global_per_domain": {
                d: sum(v) / len(v) for d, v in global_per_domain.items()
            },
            "upload_bytes_per_client": mean(uploads),
            "wall_s_per_run": mean(r.get("wall_s") for r in ok),
            "client_s_per_image": mean(r.get("client_s_per_image") for r in ok),
            "server_s_per_run": mean(
                (r.get("server_timings_s") or {}).get("total") for r in ok
            ),
            "per_client": clients,
            "per_domain": {d: sum(v) / len(v) for d, v in per_domain.items()},
            "via": "in-process" if METHODS.get(m, {}) is None else "flower",
        }
    ref = out.get(oracle, {}).get("mean_accuracy")
    gref = out.get(oracle, {}).get("global_accuracy")
    for s in out.values():
        acc, glob = s["mean_accuracy"], s["global_accuracy"]
        s["gap_to_oracle"] = acc - ref if acc is not None and ref is not None else None
        s["global_gap_to_oracle"] = (
            glob - gref if glob is not None and gref is not None else None
        )
    return out


# ---------------------------------------------------------------- tables and plot


def _accuracy_table(
    summary: dict[str, dict[str, Any]],
    oracle: str,
    label: str,
    acc: str,
    sd: str,
    gap_key: str,
    seeds_key: str | None,
) -> str:
    """method | <label> | std | gap to oracle | upload B/client | wall s/run."""
    header = [
        "method",
        label,
        "std (%)",
        "gap to oracle (pp)",
        "upload B/client",
        "client s/image",
        "wall s/run",
    ]
    rows = []
    for m, s in summary.items():
        name = f"{m} (oracle, in-process)" if m == oracle else m
        gap = (
            "0 (reference)"
            if m == oracle and s[acc] is not None
            else pct(s[gap_key], True)
        )
        up = "n/a (raw data)" if m == oracle else nbytes(s["upload_bytes_per_client"])
        wall = "n/a" if s["wall_s_per_run"] is None else f"{s['wall_s_per_run']:.1f}"
        failed = f" ({len(s['failed_seeds'])} failed)" if s["failed_seeds"] else ""
        missing = len(s["seeds"]) - s[seeds_key] if seeds_key else 0
        if missing:  # a run without a global test set (e.g. an image folder)
            failed += f" ({missing} without global acc)"
        cps = s.get("client_s_per_image")
        cost = "n/a" if cps is None else f"{cps:.2g}"
        rows.append([f"{name}{failed}", pct(s[acc]), pct(s[sd]), gap, up, cost, wall])
    return md_table(header, rows)


def seed_accuracies(records: list[dict[str, Any]], name: str) -> dict[int, float]:
    """Global accuracy per seed of a benchmarked method or a reference row."""
    if name in REFERENCES:
        m, _ = REFERENCES[name]
        return {
            r["seed"]: float(r["references"][name])
            for r in records
            if r["method"] == m and r.get("ok") and name in (r.get("references") or {})
        }
    return {
        r["seed"]: float(r["global_accuracy"])
        for r in records
        if r["method"] == name and r.get("ok") and r.get("global_accuracy") is not None
    }


def paired_differences(
    records: list[dict[str, Any]], pairs: Sequence[tuple[str, str]] = PAIRS
) -> list[dict[str, Any]]:
    """Per pair (A, B): A - B in global accuracy per common seed, their mean, and
    in how many seeds A is above B. Pairs with no common seed are left out."""
    out = []
    for a, b in pairs:
        acc_a, acc_b = seed_accuracies(records, a), seed_accuracies(records, b)
        seeds = sorted(set(acc_a) & set(acc_b))
        if not seeds:
            continue
        diffs = [acc_a[s] - acc_b[s] for s in seeds]
        out.append(
            {
                "a": a,
                "b": b,
                "seeds": seeds,
                "diffs": diffs,
                "mean_diff": sum(diffs) / len(diffs),
                "wins": sum(d > 0 for d in diffs),
            }
        )
    return out


def reference_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for name in REFERENCES:
        accs = list(seed_accuracies(records, name).values())
        if accs:
            rows.append([name, pct(mean(accs)), pct(std(accs)), str(len(accs))])
    return rows


def format_paired_table(paired: list[dict[str, Any]]) -> str:
    """Markdown: A vs B | mean A - B (pp) | per seed (pp) | A above B."""
    rows = [
        [
            f"{p['a']} vs {p['b']}",
            pct(p["mean_diff"], True),
            ", ".join(
                f"{s}: {100 * d:+.1f}"
                for s, d in zip(p["seeds"], p["diffs"], strict=True)
            ),
            f"{p['wins']}/{len(p['seeds'])}",
        ]
        for p in paired
    ]
    return md_table(["pair", "mean diff (pp)", "per seed (pp)", "A above B"], rows)


def format_global_table(
    summary: dict[str, dict[str, Any]], oracle: str = ORACLE
) -> str:
    """The headline, Markdown: method | global acc | std | gap to oracle | upload
    B/client | wall s/run (global acc: on the global test set)."""
    return _accuracy_table(
        summary,
        oracle,
        "global acc (%)",
        "global_accuracy",
        "global_std",
        "global_gap_to_oracle",
        "global_seeds",
    )


def format_global_domain_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown: global accuracy (%) per method and domain of the global test set."""
    doms = list(
        dict.fromkeys(d for s in summary.values() for d in s["global_per_domain"])
    )
    rows = [
        [m, *(pct(s["global_per_domain"].get(d)) for d in doms)]
        for m, s in summary.items()
    ]
    return md_table(["method", *doms], rows)


def format_table(summary: dict[str, dict[str, Any]], oracle: str = ORACLE) -> str:
    """Per-client accuracy (each client's held-out split), Markdown: method | mean
    acc | std | gap to oracle | upload B/client | wall s/run."""
    return _accuracy_table(
        summary, oracle, "mean acc (%)", "mean_accuracy", "std", "gap_to_oracle", None
    )


def domains_of(summary: dict[str, dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for s in summary.values():
        for c in s["per_client"]:
            seen.setdefault(str(c["domain"]), None)
    return list(seen)


def format_domain_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown: mean held-out accuracy (%) per method and client domain."""
    doms = domains_of(summary)
    rows = [
        [m, *(pct(s["per_domain"].get(d)) for d in doms)] for m, s in summary.items()
    ]
    return md_table(["method", *doms], rows)


def format_fid_table(fid: dict[str, Any]) -> str:
    rows = fid.get("per_domain", {})
    lines = [
        "| domain | real vs real (floor) | OSCAR, retrieval captions | OSCAR, oracle captions "
        "| class-name prompts | judge acc of OSCAR samples (%) | example retrieval caption |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for d, r in rows.items():
        lines.append(
            f"| {d} | {num(r.get('real_vs_real'))} | {num(r.get('oscar'))} | "
            f"{num(r.get('oscar_oracle'))} | {num(r.get('class_names'))} | "
            f"{pct(r.get('oscar_judge_accuracy'))} | {r.get('example_caption', '')} |"
        )
    means = fid.get("mean", {})
    if means:
        lines.append(
            f"| **mean** | {num(means.get('real_vs_real'))} | {num(means.get('oscar'))} | "
            f"{num(means.get('oscar_oracle'))} | {num(means.get('class_names'))} | "
            f"{pct(means.get('oscar_judge_accuracy'))} | |"
        )
    return "\n".join(lines)


def plot_summary(
    summary: dict[str, dict[str, Any]], path: Path, title: str = ""
) -> Path | None:
    """Global accuracy with std error bars per method; global accuracy per domain
    as grouped bars (the global test set's domains)."""
    import numpy as np

    from .report import pyplot, save_figure

    plt = pyplot()

    names = [m for m, s in summary.items() if s["global_accuracy"] is not None]
    if not names:
        return None
    doms = list(
        dict.fromkeys(d for m in names for d in summary[m]["global_per_domain"])
    )
    fig, (ax, bx) = plt.subplots(
        1,
        2,
        figsize=(6 + 0.9 * len(names) + 1.2 * len(doms), 3.8),
        gridspec_kw={"width_ratios": [len(names) + 1, max(1, len(doms)) + 1]},
    )
    colors = plt.get_cmap("tab10")(np.arange(len(names)) % 10)
    means = [summary[m]["global_accuracy"] for m in names]
    stds = [summary[m]["global_std"] or 0.0 for m in names]
    bars = ax.bar(names, means, yerr=stds, capsize=4, color=colors)
    ax.bar_label(
        bars,
        labels=[f"{m:.3f}" for m in means],
        fontsize=8,
        label_type="center",
        color="white",
    )
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy on the global test set")
    ax.set_title(title or "global accuracy over seeds (mean ± std)")
    ax.tick_params(axis="x", rotation=30)
    if ORACLE in names:
        ax.axhline(summary[ORACLE]["global_accuracy"], color="k", ls="--", lw=1)
    width = 0.8 / len(names)
    x = np.arange(len(doms))
    for i, m in enumerate(names):
        vals = [summary[m]["global_per_domain"].get(d, np.nan) for d in doms]
        bx.bar(
            x + (i - (len(names) - 1) / 2) * width,
            vals,
            width,
            label=m,
            color=colors[i],
        )
    bx.set_xticks(x, doms)
    bx.set_ylim(0, 1.08)
    bx.set_ylabel("global accuracy")
    bx.set_title("per domain of the global test set")
    bx.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(fig, path)


# ---------------------------------------------------------------- in-process parts


def build_cfg(overrides: dict[str, Any]) -> Any:
    """The app's validated RunConfig for the defaults plus ``overrides``."""
    from methods import build_config

    return build_config(default_run_config() | overrides)


def run_centralized(cfg: Any, num_clients: int) -> tuple[dict[str, Any], float]:
    """The oracle: one classifier trained on the union of all clients' real training
    data, evaluated on the global test set of the clients' domains (the function
    and the domains the round uses) and on each client's held-out split. Returns a
    results-like dict."""
    import torch

    from client_app.app import client_data
    from common.datasets import (
        GLOBAL_TEST_PER_CLASS,
        dataset_info,
        global_test_set,
        participating_domains,
    )
    from common.models import build_classifier
    from common.train import accuracy, predict, train_classifier

    t0 = time.perf_counter()
    # 1. The clients' data, exactly as the ClientApp loads it
    parts = [client_data(cfg, pid, num_clients) for pid in range(num_clients)]
    x = torch.cat([p.train_images for p in parts])
    y = torch.cat([p.train_labels for p in parts])
    # 2. Train on the union (same classifier and schedule as the server)
    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg.classifier, int(x.shape[1]), parts[0].num_classes)
    train_classifier(
        model,
        x,
        y,
        epochs=cfg.train_epochs,
        batch_size=cfg.train_batch_size,
        lr=cfg.learning_rate,
        seed=cfg.seed,
    )
    # 3. Evaluate on every client's held-out split
    clients = [
        {
            "partition_id": pid,
            "domain": p.domain,
            "accuracy": accuracy(model, p.test_images, p.test_labels),
        }
        for pid, p in enumerate(parts)
    ]
    # 4. Evaluate on the global test set, as the round's step 7b does
    domains = participating_domains(
        dataset_info(cfg.data_args()), [p.domain for p in parts]
    )
    test = (
        global_test_set(cfg.data_args(), domains, GLOBAL_TEST_PER_CLASS)
        if domains
        else None
    )
    glob, glob_per_domain = (
        test.score(predict(model, test.images)) if test is not None else (None, {})
    )
    wall = time.perf_counter() - t0
    res = {
        "method": ORACLE,
        "clients": clients,
        "mean_accuracy": sum(c["accuracy"] for c in clients) / len(clients),
        "global_accuracy": glob,
        "global_accuracy_per_domain": glob_per_domain,
        "global_test_size": len(test) if test is not None else 0,
        "upload_bytes_per_client": None,
        "timings_s": {"total": round(wall, 3)},
        "num_train_examples": len(y),
    }
    return res, wall


def generator_fid(
    cfg: Any,
    per_class: int,
    seed: int = 0,
    num_client_images: int = 1000,
    oracle_captions: bool = True,
) -> dict[str, Any]:
    """FID-proxy of the generator per client domain (judge features).

    For each domain ``d``: a client holding ``num_client_images`` client-pool
    images rendered in ``d`` computes its OSCAR upload (``embed_classes``: its
    captioner, text encoder, per-class mean); ``per_class`` samples per class
    conditioned on it are compared with ``per_class x classes`` disjoint real
    images of ``d``. The same with oracle captions (if ``oracle_captions``), and
    with class-name prompts (plain style, the same samples for every domain). ``real_vs_real`` compares
    two disjoint real sets of the same size: the floor at this sample size.
    """
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    from common.data import (
        DIGIT_NAMES,
        class_name_prompt,
        mnist_client_pool,
        render_style,
    )
    from common.datasets import ClientData, DatasetInfo
    from common.generator import load_generator
    from common.maths import fid_proxy
    from common.models import load_classifier
    from common.synthesis import sample as engine_sample
    from common.synthesis import to_dataset_format
    from common.synthesis_settings import SynthesisSettings
    from common.text_encoder import load_text_encoder
    from common.train import features, predict
    from common.weights import embedded_dir
    from methods.oscar.client_oscar import embed_classes

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per upload otherwise
    t0 = time.perf_counter()
    num_classes = len(DIGIT_NAMES)
    gen = load_generator(cfg.generator, cfg.scheduler)
    enc = load_text_encoder(cfg.text_encoder)
    uncond = enc.encode([""], cfg.embedding)
    judge = load_classifier(embedded_dir() / "judge")

    # the run's sampler settings, guidance cut-off included; each call its own seed
    settings = SynthesisSettings.from_config(cfg, static_shapes=False)

    def sample(cond: torch.Tensor, s: int) -> torch.Tensor:
        x = engine_sample(gen, cond, uncond, **settings.replace(seed=s).kwargs())
        return to_dataset_format(x, 1, cfg.image_size)

    # 1. Real images: a client part (captioned) and a disjoint reference part
    raw, labels = mnist_client_pool()
    perm = np.random.default_rng(seed).permutation(len(labels))
    n_ref = per_class * num_classes
    client_idx = np.sort(perm[:num_client_images])
    ref_idx = np.sort(perm[num_client_images : num_client_images + n_ref])
    floor_idx = np.sort(perm[num_client_images + n_ref : num_client_images + 2 * n_ref])

    # 2. Class-name prompts: plain-style samples, compared with every domain
    prompts = [class_name_prompt(c) for c in range(num_classes)]
    cn_cond = enc.encode(prompts, cfg.embedding).repeat_interleave(per_class, dim=0)
    cn_fake = sample(cn_cond, seed)
    cn_feats = features(judge, cn_fake)
    cn_want = torch.arange(num_classes).repeat_interleave(per_class)
    cn_acc = float((predict(judge, cn_fake) == cn_want).float().mean())

    per_domain: dict[str, dict[str, Any]] = {}
    for k, d in enumerate(cfg.domain_list):
        real = render_style(raw[ref_idx], d, cfg.image_size, seed=seed + 1)
        real_feats = features(judge, real)
        floor = features(
            judge, render_style(raw[floor_idx], d, cfg.image_size, seed=seed + 2)
        )
        data = ClientData(
            train_images=render_style(raw[client_idx], d, cfg.image_size, seed=seed),
            train_labels=torch.as_tensor(labels[client_idx]),
            test_images=real,
            test_labels=torch.as_tensor(labels[ref_idx]),
            domain=d,
            info=DatasetInfo("mnist-domains", DIGIT_NAMES, digits=True),
        )
        row: dict[str, Any] = {
            "real_vs_real": fid_proxy(real_feats, floor),
            "class_names": fid_proxy(real_feats, cn_feats),
        }
        variants = [("oscar", cfg.captioner)]
        if oracle_captions:
            variants.append(("oscar_oracle", "oracle"))
        for key, captioner in variants:
            c = cfg.model_copy(update={"captioner": captioner, "dp_epsilon": 0.0})
            up = embed_classes(c, data, seed=seed)
            cond = up.embeddings.means.float().repeat_interleave(per_class, dim=0)
            want = up.embeddings.class_ids.repeat_interleave(per_class)
            fake = sample(cond, seed + 100 * (k + 1))
            row[key] = fid_proxy(real_feats, features(judge, fake))
            row[f"{key}_judge_accuracy"] = float(
                (predict(judge, fake) == want).float().mean()
            )
            if key == "oscar":
                row["example_caption"] = up.captions[0] if up.captions else ""
        per_domain[d] = row
        say(
            f"FID-proxy {d:>9}: real vs real {row['real_vs_real']:.2f}, oscar "
            f"{row['oscar']:.2f}, oracle captions {row.get('oscar_oracle', math.nan):.2f},"
            f" class names {row['class_names']:.2f}"
        )
    keys = (
        "real_vs_real",
        "oscar",
        "oscar_oracle",
        "class_names",
        "oscar_judge_accuracy",
        "oscar_oracle_judge_accuracy",
    )
    return {
        "per_domain": per_domain,
        "mean": {k: mean(r.get(k) for r in per_domain.values()) for k in keys},
        "class_names_judge_accuracy": cn_acc,
        "samples_per_class": per_class,
        "real_images_per_domain": n_ref,
        "client_images_per_domain": num_client_images,
        "features": "judge classifier embed() (penultimate layer)",
        **{k: v for k, v in settings.kwargs().items() if k != "seed"},
        "seed": seed,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def stack_checksums(root: Path) -> dict[str, str]:
    """sha256 (12 hex) of every weight file of the embedded stack: which stack ran."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()[:12]
        for p in sorted(root.rglob("*.safetensors"))
    }


# ---------------------------------------------------------------- report


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "accuracy.json", report, indent=2)
    summary = report["summary"]
    wall = report["wall_time_s"]
    md = [
        "# One-shot FL accuracy benchmark",
        "",
        "`" + " ".join(["python -m bench accuracy", *report["argv"]]) + "`",
        "",
        f"* mode: **{'quick' if report['quick'] else 'full default config'}**; "
        f"{report['num_clients']} clients; seeds {report['seeds']}; dataset "
        f"`{report['config']['dataset']}`, partition `{report['config']['partition']}`"
        f" (alpha {report['config']['dirichlet-alpha']}), domains `{report['config']['domains']}`",
        f"* overrides of the default run config: `{report['overrides']}`",
        f"* embedded stack: `{report['embedded_dir']}`; server device(s): "
        f"{', '.join(sorted({str(r.get('device', 'cpu')) for r in report['runs']})) or 'n/a'}"
        f"; machine: {report.get('cpu_count', '?')} CPU cores",
        f"* wall time: {wall.get('total', 0):.0f} s in total ({wall.get('flower_runs', 0):.0f} s "
        f"Flower runs, {wall.get('centralized', 0):.0f} s centralized oracle, "
        f"{wall.get('fid_proxy', 0):.0f} s FID-proxy)",
        "",
        "## Accuracy on the global test set",
        "",
        "The dataset's test split in the domain of every client, balanced over "
        "classes: the global model (for `local`, each client's own model, mean "
        f"over clients; for `{ORACLE}`, the model trained on the union).",
        "",
        format_global_table(summary),
        "",
        "### Paired per-seed differences (global accuracy)",
        "",
        format_paired_table(paired_differences(report["runs"])),
        "",
        *(
            [
                "### References computed inside the runs (global accuracy %)",
                "",
                md_table(
                    ["reference", "global acc (%)", "std (%)", "seeds"],
                    reference_rows(report["runs"]),
                ),
                "",
            ]
            if reference_rows(report["runs"])
            else []
        ),
        "### Per domain (global accuracy %)",
        "",
        format_global_domain_table(summary),
        "",
        "## Per-client accuracy (each client's own held-out split)",
        "",
        format_table(summary),
        "",
        "### Per client domain (accuracy %)",
        "",
        format_domain_table(summary),
        "",
    ]
    failed = [r for r in report["runs"] if not r.get("ok")]
    if failed:
        md += ["### Failed runs", ""]
        md += [f"* {r['method']} seed {r['seed']}: {r.get('error')}" for r in failed]
        md.append("")
    fid = report.get("fid_proxy")
    if fid:
        md += [
            "## Generator quality per domain (FID-proxy, lower is better)",
            "",
            f"Fréchet distance in the judge classifier's feature space; "
            f"{fid['samples_per_class']} samples per class vs {fid['real_images_per_domain']} "
            f"real client-pool images of the domain; OSCAR uploads computed from "
            f"{fid['client_images_per_domain']} images of the domain; guidance "
            f"{fid['guidance_scale']}, {fid['num_inference_steps']} steps; class-name prompts "
            "are plain-style samples (no domain). `real vs real` is the floor at this "
            "sample size. Judge accuracy: the judge classifier recognises the "
            "conditioned class in the samples.",
            "",
            format_fid_table(fid),
            "",
            f"Judge accuracy of the class-name-prompt samples: "
            f"{pct(fid.get('class_names_judge_accuracy'))} %; FID-proxy wall time "
            f"{fid.get('wall_s', 0):.0f} s.",
            "",
        ]
    md += ["## Notes", ""] + [f"* {n}" for n in NOTES] + [""]
    (out / "accuracy.md").write_text("\n".join(md))
    plot_summary(
        summary,
        out / "accuracy.png",
        f"{'quick' if report['quick'] else 'full'}: {report['num_clients']} clients, "
        f"{len(report['seeds'])} seeds",
    )


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench accuracy", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smaller runs ({', '.join(f'{k}={v}' for k, v in QUICK.items())})",
    )
    p.add_argument(
        "--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)"
    )
    p.add_argument(
        "--out", default="bench-results", help="output folder (default bench-results)"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"methods, comma- or space-separated (default {','.join(DEFAULT_METHODS)}; "
        f"also: {','.join(m for m in METHODS if m not in DEFAULT_METHODS)})",
    )
    p.add_argument(
        "--clients", type=int, default=4, help="simulated clients (default 4)"
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra run-config override for every run, e.g. --set train-epochs=3",
    )
    p.add_argument("--no-fid", action="store_true", help="skip the FID-proxy section")
    p.add_argument(
        "--fid-per-class",
        type=int,
        default=None,
        help=f"samples per class for the FID-proxy (default {QUICK_FID_PER_CLASS} "
        f"quick, {FULL_FID_PER_CLASS} full)",
    )
    p.add_argument("--timeout-s", type=float, default=3600.0, help="limit per flwr run")
    p.add_argument(
        "--echo", action="store_true", help="print the Flower logs as they arrive"
    )
    return p


def parse_sets(items: list[str]) -> dict[str, Any]:
    from .flower_runs import parse_run_config_string

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(
                f"--set {item!r}: use KEY=VALUE, e.g. --set train-epochs=3"
            )
        key, value = item.split("=", 1)
        try:
            out |= parse_run_config_string(f"{key}={value}")
        except Exception:
            out[key] = value  # a bare string
    return out


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def run_flower_methods(
    sim: LocalSimulation,
    methods: list[str],
    seeds: list[int],
    base: dict[str, Any],
    timeout_s: float,
    on_record: Any,
) -> None:
    """Every (seed, method) through ``flwr run``; ``on_record(rec)`` after each."""
    total, done = len(methods) * len(seeds), 0
    for seed in seeds:
        for m in methods:
            done += 1
            say(f"[{done:>2}/{total}] {m} seed={seed} ...")
            run: FlowerRun = sim.run(
                f"{m}-seed{seed}", run_overrides(m, seed, base), timeout_s
            )
            rec = record_from_results(m, seed, run.results, run.wall_s, error=run.error)
            if rec["ok"]:
                say(
                    f"        global acc {_acc(rec['global_accuracy'])}, mean client "
                    f"acc {rec['mean_accuracy']:.4f}, upload "
                    f"{nbytes(rec['upload_bytes_per_client'])} B/client, "
                    f"{run.wall_s:.1f} s"
                )
            else:
                say(f"        FAILED: {rec['error']}\n{log_tail(run.log_path, 15)}")
            on_record(rec)


def _acc(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    from common.config import ConfigError
    from common.weights import embedded_dir

    # 0. Check the arguments and the config once, as the app will
    try:
        seeds = parse_seeds(args.seeds)
        methods = parse_methods(args.methods)
        if args.clients < 1:
            raise ValueError(f"--clients {args.clients} must be >= 1")
        base = base_overrides(args.quick, args.clients, parse_sets(args.sets))
        cfg0 = build_cfg(base | {"seed": seeds[0]})
        emb_dir = str(embedded_dir())
    except (ValueError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    out = Path(args.out).expanduser().resolve()
    say(
        f"accuracy: {'quick' if args.quick else 'full'} config, methods {methods}, "
        f"seeds {seeds}, {args.clients} clients -> {out}"
    )
    say(f"overrides {base}; embedded stack {emb_dir}")
    report: dict[str, Any] = {
        "benchmark": "accuracy",
        "argv": list(argv) if argv is not None else [],
        "quick": args.quick,
        "seeds": seeds,
        "num_clients": args.clients,
        "methods": methods,
        "oracle": ORACLE,
        "overrides": base,
        "config": cfg0.to_flat(),
        "embedded_dir": emb_dir,
        "embedded_checksums": stack_checksums(Path(emb_dir)),
        "cpu_count": os.cpu_count(),
        "runs": [],
        "summary": {},
        "wall_time_s": {},
        "notes": list(NOTES),
    }

    def add(rec: dict[str, Any]) -> None:  # the report is rewritten after every run
        report["runs"].append(rec)
        report["summary"] = aggregate(report["runs"], methods)
        report["wall_time_s"]["total"] = round(time.perf_counter() - t_start, 1)
        write_report(out, report)

    # 1. Federated methods: the real app through flwr run (one SuperLink for all)
    flower = [m for m in methods if METHODS[m] is not None]
    if flower:
        t0 = time.perf_counter()
        # On SIGTERM too, unwind through LocalSimulation.__exit__ (stops the SuperLink).
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        # Scratch (FLWR_HOME, every run folder, the Flower logs) under <out>/flower/.
        with LocalSimulation(out / "flower", args.clients, echo=args.echo) as sim:
            run_flower_methods(sim, flower, seeds, base, args.timeout_s, add)
        report["wall_time_s"]["flower_runs"] = round(time.perf_counter() - t0, 1)

    # 2. The centralized oracle, in-process (not through Flower)
    if ORACLE in methods:
        t0 = time.perf_counter()
        for seed in seeds:
            res, wall = run_centralized(build_cfg(base | {"seed": seed}), args.clients)
            say(
                f"{ORACLE} (in-process) seed={seed}: global acc "
                f"{_acc(res['global_accuracy'])}, mean client acc "
                f"{res['mean_accuracy']:.4f}, {wall:.1f} s"
            )
            add(record_from_results(ORACLE, seed, res, wall, "in-process"))
        report["wall_time_s"]["centralized"] = round(time.perf_counter() - t0, 1)

    # 3. Generator quality per domain (FID-proxy), in-process
    if not args.no_fid:
        k = args.fid_per_class or (
            QUICK_FID_PER_CLASS if args.quick else FULL_FID_PER_CLASS
        )
        n_client = cfg0.max_examples_per_client or 2000
        say(f"FID-proxy per domain: {k} samples per class ...")
        report["fid_proxy"] = generator_fid(cfg0, k, seeds[0], n_client)
        report["wall_time_s"]["fid_proxy"] = report["fid_proxy"]["wall_s"]

    # 4. Report
    report["wall_time_s"]["total"] = round(time.perf_counter() - t_start, 1)
    write_report(out, report)
    print("\nAccuracy on the global test set")
    print(format_global_table(report["summary"]))
    print("\nPaired per-seed differences (global accuracy)")
    print(format_paired_table(paired_differences(report["runs"])))
    print("\n" + format_global_domain_table(report["summary"]))
    print("\nPer-client accuracy (own held-out splits)")
    print(format_table(report["summary"]))
    print("\n" + format_domain_table(report["summary"]))
    if report.get("fid_proxy"):
        print("\nFID-proxy per domain (lower is better)")
        print(format_fid_table(report["fid_proxy"]))
    say(
        f"total wall time {report['wall_time_s']['total']:.0f} s; wrote "
        f"{out / 'accuracy.json'}, accuracy.md, accuracy.png"
    )
    return 0 if all(r.get("ok") for r in report["runs"]) else 1

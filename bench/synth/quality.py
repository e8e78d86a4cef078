"""The quality part: faster sampler settings against the default, over seeds."""

from __future__ import annotations

from typing import Any

from bench.report import mean, std

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


def quality_seed(
    seed: int,
    settings: dict[str, dict[str, Any]],
    num_clients: int,
    overrides: dict[str, Any],
) -> list[dict[str, Any]]:
    """One seed: the clients' uploads once, then every sampler setting."""
    from bench.inprocess import federation, run_variant
    from bench.run_config import default_run_config

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

"""The LoRA bench's records over seeds: means, paired wins, the checks."""

from __future__ import annotations

from typing import Any

from bench.report import mean, std

from .world import CHALLENGERS


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

"""One run's results.json as a benchmark record, and the records over seeds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.report import mean, pct, std

from ..stats import holm, paired_t
from .config import METHODS, ORACLE, PAIRS, REFERENCES


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


def seed_accuracies(
    records: list[dict[str, Any]], name: str, domains: Sequence[str] | None = None
) -> dict[int, float]:
    """Global accuracy per seed of a benchmarked method or a reference row; with
    ``domains``, the mean of its accuracies on those domains of the global test
    set (a run without all of them, and a reference row, has none)."""
    if domains is not None:
        return {
            r["seed"]: sum(per[d] for d in domains) / len(domains)
            for r in records
            if r["method"] == name
            and r.get("ok")
            and domains
            and all(
                d in (per := r.get("global_accuracy_per_domain") or {}) for d in domains
            )
        }
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
    records: list[dict[str, Any]],
    pairs: Sequence[tuple[str, str]] = PAIRS,
    domains: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Per pair (A, B): A - B in global accuracy per common seed (with
    ``domains``: on those domains of the global test set), their mean with a 95%
    t interval and the paired t-test's p-value, Holm's adjustment across the
    pairs (``p_holm``), whether "A above B" holds at family-wise 5% (``holds``),
    and in how many seeds A is above B. Pairs with no common seed are left out."""
    out: list[dict[str, Any]] = []
    pvalues: list[float | None] = []
    for a, b in pairs:
        acc_a = seed_accuracies(records, a, domains)
        acc_b = seed_accuracies(records, b, domains)
        seeds = sorted(set(acc_a) & set(acc_b))
        if not seeds:
            continue
        diffs = [acc_a[s] - acc_b[s] for s in seeds]
        t = paired_t(diffs)
        pvalues.append(t["p"])
        out.append(
            {
                "a": a,
                "b": b,
                "seeds": seeds,
                "diffs": diffs,
                "mean_diff": t["mean"],
                "ci95": [t["low"], t["high"]],
                "p": t["p"],
                "wins": sum(d > 0 for d in diffs),
            }
        )
    for pair, adj, mean_diff in zip(
        out, holm(pvalues), [t["mean_diff"] for t in out], strict=True
    ):
        pair["p_holm"] = adj
        # the ordering the pair claims holds: A above B at family-wise 5%
        pair["holds"] = adj is not None and adj <= 0.05 and float(mean_diff) > 0
    return out


def reference_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """Table rows ``[name, global acc %, std %, seeds]`` of the in-run references."""
    rows = []
    for name in REFERENCES:
        accs = list(seed_accuracies(records, name).values())
        if accs:
            rows.append([name, pct(mean(accs)), pct(std(accs)), str(len(accs))])
    return rows

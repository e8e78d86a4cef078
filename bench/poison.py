"""``python -m bench poison``: the round against malicious clients (issue 27).

For each method (default ``oscar`` and ``fedavg``) the bench records the genuine
uploads of ``--clients`` clients once (the real ClientApp, ``bench.replay``),
then plays the real round in process (``deploy.inprocess``) with 0, 10 and 30%
of them malicious, under each attack and each defence, and reports the global
accuracy (the server's global model on the global test set), whom the round
rejected, and whether it refused the global model.

Attacks (a malicious client's upload, made from its genuine one; each applies
where the payload holds what it changes, by the payload convention of
``common.robust.upload_parts``):

* ``push-embedding``: every class vector ``v`` -> ``v + 5 ||v|| u``, ``u`` a
  unit direction drawn once per run from ``--seed`` (the vector pushed far from
  its class);
* ``scale-x50``: every weight tensor (a classifier, an adapter) x 50;
* ``flip-labels``: class vectors sent under the class ``K - 1 - c``; a client
  that uploads weights trains them on the labels ``K - 1 - y`` instead (the
  real ClientApp on flipped labels).

Defences: ``none`` (``robust-aggregation=mean``, ``screen-outliers`` off),
``screen`` (``screen-outliers=true``) and any ``robust-aggregation`` rule
(``median``, ``trimmed-mean``, ``krum``). The malicious clients are the first
of a seeded permutation of the partitions, so the 10% are among the 30%.

Writes ``<out>/poison.json`` (every round), ``poison.md`` (the table) and
``poison.png`` (global accuracy against the malicious share, per method).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict

from bench.replay import ReplayClient, record_replies
from bench.report import md_table, pct, pyplot, save_figure, say, write_json
from bench.run_config import default_run_config, parse_sets

ATTACKS = ("push-embedding", "scale-x50", "flip-labels")
DEFENCES = ("none", "screen", "median", "trimmed-mean", "krum")
DEFAULT_METHODS = ("oscar", "fedavg")
DEFAULT_FRACTIONS = (0.0, 0.1, 0.3)
PUSH = 5.0  # push-embedding: how many norms of the vector it is moved
SCALE = 50.0  # scale-x50

# Both modes: replies are replayed at once, the window closes when all are in.
BENCH_KEYS: dict[str, Any] = {"collect-quiet-s": 1.0, "min-clients": 2}
# --quick: what changes (the rest is the default run config).
# Calibrated so that the clean OSCAR round is near the default round's accuracy
# (10 clients: 73.9% at 30 images per class and 15 epochs, where 10 images and 5
# epochs gave 18.0%); 5 sampler steps instead of 10 cost 1.5 points (54.9 vs
# 53.4% at 10 images) and halve the synthesis.
QUICK_KEYS: dict[str, Any] = {
    "max-examples-per-client": 200,
    "images-per-class": 30,
    "num-inference-steps": 5,
    "train-epochs": 15,
    "local-epochs": 2,
}
QUICK_CLIENTS = 10
FULL_CLIENTS = 20


# ---------------------------------------------------------------- attacks (pure)


def _direction(shape: Sequence[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(*shape, generator=g, dtype=torch.float64)
    return u / u.norm()


def attack_tensors(
    tensors: dict[str, torch.Tensor], attack: str, num_classes: int, seed: int
) -> dict[str, torch.Tensor] | None:
    """A malicious upload made from a genuine one, or ``None`` where ``attack``
    has nothing to change in it (``flip-labels`` of a weights-only upload is
    done on the client: ``flipped_labels``)."""
    from common.robust import upload_parts

    parts = upload_parts(tensors)
    out = dict(tensors)
    if attack == "push-embedding" and parts.vector_keys:
        for key, _ in parts.vector_keys:
            v = tensors[key].double()
            u = _direction(v.shape[1:], seed)
            norms = v.flatten(1).norm(dim=1).reshape(-1, *[1] * (v.ndim - 1))
            out[key] = (v + PUSH * norms * u).to(tensors[key].dtype)
        return out
    if attack == "scale-x50" and parts.weights:
        for key, w in parts.weights.items():
            out[key] = (w.double() * SCALE).to(w.dtype)
        return out
    if attack == "flip-labels" and parts.vector_keys:
        for _, ids_key in parts.vector_keys:
            out[ids_key] = num_classes - 1 - tensors[ids_key]
        return out
    return None


def malicious_partitions(n: int, fraction: float, seed: int) -> list[int]:
    """The first ``round(fraction n)`` of a seeded permutation of ``0..n-1``
    (so a smaller share's clients are among a larger one's), sorted."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(order[: round(fraction * n)].tolist())


# ---------------------------------------------------------------- clients


@contextlib.contextmanager
def flipped_labels(num_classes: int) -> Iterator[None]:
    """The real ClientApp, its training labels ``y`` read as ``K - 1 - y``."""
    import client_app.app as ca

    real = ca.client_data

    def flipped(cfg: Any, partition_id: int, num_partitions: int) -> Any:
        d = real(cfg, partition_id, num_partitions)
        return dataclasses.replace(d, train_labels=num_classes - 1 - d.train_labels)

    ca.client_data = flipped  # type: ignore[assignment]
    try:
        yield
    finally:
        ca.client_data = real


def record_partitions(
    run_config: dict[str, Any], n: int, partitions: Sequence[int]
) -> dict[int, bytes]:
    """The real ClientApp's collect reply of each of ``partitions`` of an
    ``n``-way split, in Flower's wire format (``bench.replay``'s recording)."""
    from flwr.common.serde import recorddict_to_proto

    from client_app.app import app
    from common.datasets import dataset_info
    from deploy.inprocess import FIRST_NODE_ID, InProcessGrid, partition_fleet
    from methods import build_config, get_method
    from methods.base import ServerContext

    cfg = build_config(run_config)
    method = get_method(cfg.method)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = ServerContext(cfg, Path(tmp), info=dataset_info(cfg.data_args()))
        content = method.collect_content(ctx)
    grid = InProcessGrid(app, partition_fleet(n), dict(run_config))
    out = {}
    for p in partitions:
        msg = Message(
            content, dst_node_id=FIRST_NODE_ID + p, message_type=method.collect_type
        )
        (reply,) = grid.pull_messages(grid.push_messages([msg]))
        if reply.has_error():
            raise RuntimeError(f"partition {p}: the ClientApp failed: {reply.error}")
        out[p] = recorddict_to_proto(reply.content).SerializeToString()
    return out


def _content(raw: bytes) -> RecordDict:
    from flwr.common.serde import ProtoRecordDict, recorddict_from_proto

    return recorddict_from_proto(ProtoRecordDict.FromString(raw))


def _wire(content: RecordDict) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()


class PoisonClient:
    """The replayed genuine clients, the ``malicious`` partitions answering the
    collect message with their attacked reply instead (a fresh copy)."""

    def __init__(self, honest: ReplayClient, malicious: dict[int, bytes]) -> None:
        self.honest = honest
        self.malicious = malicious

    def __call__(self, msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if msg.metadata.message_type == self.honest.collect_type and (
            pid in self.malicious
        ):
            return Message(_content(self.malicious[pid]), reply_to=msg)
        return self.honest(msg, context)


# ---------------------------------------------------------------- the bench


def defence_keys(defence: str) -> dict[str, Any]:
    """The run-config keys of a defence."""
    if defence == "none":
        return {"robust-aggregation": "mean", "screen-outliers": False}
    if defence == "screen":
        return {"robust-aggregation": "mean", "screen-outliers": True}
    return {"robust-aggregation": defence, "screen-outliers": False}


def play(
    rc: dict[str, Any], client: Callable[[Message, Context], Message], n: int
) -> dict[str, Any]:
    """One real round over ``n`` replayed devices: its results, or why it stopped."""
    from deploy.inprocess import partition_fleet, run_round
    from server_app.round import RoundError

    t0 = time.perf_counter()
    try:
        res, _ = run_round(partition_fleet(n), rc, run_id="poison", client_app=client)
    except RoundError as e:
        return {"global_accuracy": None, "stopped": str(e), "rejected": []}
    return {
        "global_accuracy": res.get("global_accuracy"),
        "stopped": None,
        "rejected": sorted(
            int(r["partition_id"]) for r in res["rejected"] if "partition_id" in r
        ),
        "rejected_reasons": [r["reason"] for r in res["rejected"]][:5],
        "round_s": round(time.perf_counter() - t0, 1),
    }


def run_method(
    method: str,
    base: dict[str, Any],
    n: int,
    fractions: Sequence[float],
    attacks: Sequence[str],
    defences: Sequence[str],
    seed: int,
) -> list[dict[str, Any]]:
    """Every (fraction, attack, defence) round of one method."""
    from common import contract as C
    from common.datasets import dataset_info
    from methods import build_config

    rc = base | {"method": method}
    k = dataset_info(build_config(rc).data_args())
    num_classes = k.num_classes if k is not None else 0
    t0 = time.perf_counter()
    replies, info = record_replies(rc, n)
    say(f"{method}: {n} genuine uploads recorded ({time.perf_counter() - t0:.0f} s)")
    honest = ReplayClient.of(replies, info)
    worst = malicious_partitions(n, max(fractions), seed)
    flipped: dict[int, bytes] = {}
    rows = []
    for fraction in fractions:
        bad = malicious_partitions(n, fraction, seed)
        for attack in attacks if bad else ("none",):
            malicious: dict[int, bytes] = {}
            for p in bad:
                content = _content(replies[p])
                key = info["payload_key"]
                tensors = C.from_array_record(content.array_records[key])
                hit = attack_tensors(tensors, attack, num_classes, seed)
                if hit is not None:
                    content[key] = C.to_array_record(hit)
                    malicious[p] = _wire(content)
                elif attack == "flip-labels":  # weights: train on flipped labels
                    if not flipped:
                        with flipped_labels(num_classes):
                            flipped = record_partitions(rc, n, worst)
                    malicious[p] = flipped[p]
            if bad and not malicious:
                say(f"{method}: {attack} changes nothing in its uploads: skipped")
                continue
            for defence in defences:
                out = play(
                    rc | defence_keys(defence), PoisonClient(honest, malicious), n
                )
                row = {
                    "method": method,
                    "clients": n,
                    "fraction": fraction,
                    "attack": attack,
                    "defence": defence,
                    "malicious": sorted(malicious),
                    **out,
                }
                row["malicious_rejected"] = len(set(out["rejected"]) & set(malicious))
                row["honest_rejected"] = len(set(out["rejected"]) - set(malicious))
                rows.append(row)
                say(
                    f"{method} {len(bad)}/{n} {attack:>14} {defence:>12}: global "
                    f"accuracy {pct(out['global_accuracy'])}%, rejected "
                    f"{row['malicious_rejected']}/{len(malicious)} malicious, "
                    f"{row['honest_rejected']} honest"
                    + (f"; stopped: {out['stopped'][:120]}" if out["stopped"] else "")
                )
    return rows


def write_outputs(out: Path, report: dict[str, Any]) -> None:
    """poison.json, poison.md and poison.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "poison.json", report)
    rows = report["rows"]
    table = md_table(
        [
            "method",
            "malicious",
            "attack",
            "defence",
            "global acc. %",
            "rejected (malicious)",
            "rejected (honest)",
            "stopped",
        ],
        [
            [
                r["method"],
                f"{len(r['malicious'])}/{r['clients']}",
                r["attack"],
                r["defence"],
                pct(r["global_accuracy"]),
                f"{r['malicious_rejected']}/{len(r['malicious'])}",
                str(r["honest_rejected"]),
                (r["stopped"] or "")[:80],
            ]
            for r in rows
        ],
    )
    cfg = report["config"]
    (out / "poison.md").write_text(
        f"# bench poison\n\n`{report['command']}`: {report['clients']} clients, "
        f"seed {report['seed']}, images-per-class {cfg.get('images-per-class')}, "
        f"max-examples-per-client {cfg.get('max-examples-per-client')}; "
        f"{report['wall_s']:.0f} s.\n\n{table}\n"
    )
    plt = pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(
        1, len(methods), figsize=(5.5 * len(methods), 4), squeeze=False
    )
    styles = {d: s for d, s in zip(DEFENCES, ("-", "--", ":", "-.", "-"), strict=True)}
    for ax, m in zip(axes[0], methods, strict=True):
        mine = [r for r in rows if r["method"] == m]
        clean = {r["defence"]: r for r in mine if r["attack"] == "none"}
        for attack in dict.fromkeys(r["attack"] for r in mine if r["attack"] != "none"):
            for defence in dict.fromkeys(r["defence"] for r in mine):
                pts = [clean[defence]] if defence in clean else []
                pts += [
                    r for r in mine if r["attack"] == attack and r["defence"] == defence
                ]
                xs = [100 * len(r["malicious"]) / r["clients"] for r in pts]
                ys = [
                    100 * r["global_accuracy"]
                    if r["global_accuracy"] is not None
                    else math.nan
                    for r in pts
                ]
                ax.plot(
                    xs,
                    ys,
                    styles.get(defence, "-"),
                    marker="o",
                    label=f"{attack}, {defence}",
                )
        stopped = [r for r in mine if r["stopped"]]
        if stopped:  # refused (or too few clients): nothing pushed, no accuracy
            ax.plot(
                [100 * len(r["malicious"]) / r["clients"] for r in stopped],
                [0.0] * len(stopped),
                "rx",
                markersize=9,
                label="round stopped (global model refused)",
            )
        ax.set_title(m)
        ax.set_xlabel("malicious clients (%)")
        ax.set_ylabel("global accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, out / "poison.png")


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{text!r}: use comma-separated numbers") from None
    if not vals or any(not 0 <= v < 1 for v in vals):
        raise ValueError(f"{text!r}: shares in [0, 1)")
    return sorted(set(vals))


def _choices(text: str, allowed: Sequence[str], what: str) -> list[str]:
    vals = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in vals if v not in allowed]
    if not vals or bad:
        raise ValueError(f"--{what} {text!r}: use some of {', '.join(allowed)}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``python -m bench poison --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m bench poison",
        description="Global accuracy against malicious clients, with and without "
        "the round's defences.",
    )
    p.add_argument(
        "--quick", action="store_true", help=f"{QUICK_CLIENTS} clients, {QUICK_KEYS}"
    )
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--fractions", default=",".join(map(str, DEFAULT_FRACTIONS)))
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--defences", default="none,screen")
    p.add_argument(
        "--clients",
        type=int,
        default=None,
        help=f"default {FULL_CLIENTS} ({QUICK_CLIENTS} with --quick)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config key for every round (repeatable)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the bench; 0 when every round was played."""
    import sys

    args = build_parser().parse_args(argv)
    from methods import METHODS

    methods = _choices(args.methods, sorted(METHODS), "methods")
    fractions = _floats(args.fractions)
    attacks = _choices(args.attacks, ATTACKS, "attacks")
    defences = _choices(args.defences, DEFENCES, "defences")
    n = args.clients or (QUICK_CLIENTS if args.quick else FULL_CLIENTS)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = (
            default_run_config()
            | BENCH_KEYS
            | (QUICK_KEYS if args.quick else {})
            | parse_sets(args.set)
            | {"output-dir": tmp, "seed": args.seed}
        )
        rows = []
        for m in methods:
            rows += run_method(m, base, n, fractions, attacks, defences, args.seed)
    report = {
        "command": " ".join(
            ["python -m bench poison", *(sys.argv[2:] if argv is None else argv)]
        ),
        "clients": n,
        "seed": args.seed,
        "config": {k: v for k, v in base.items() if k != "output-dir"},
        "wall_s": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    write_outputs(Path(args.out), report)
    say(f"wrote {args.out}/poison.json, poison.md, poison.png")
    return 0

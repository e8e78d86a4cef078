"""SuperNodes behind emulated edge links: network namespaces, rate limits, latency.

``python -m deploy.edge_links`` (root, Linux) starts the deployment of
:mod:`deploy.cluster` (TLS + node authentication) with every SuperNode in its
own network namespace, reaching the SuperLink over a veth pair whose two ends
are rate-limited with a ``tbf`` qdisc (uplink and downlink) and through a
relay that delays every byte by a fixed one-way latency. It runs the app once
per payload case and writes the round's time per phase against payload size.

Why a relay for latency: ``tc qdisc ... netem`` needs the kernel's sch_netem
module, which the machines this was measured on do not have (``Error:
Specified qdisc kind is unknown``); ``tbf`` is there. Where netem exists, the
relay can be switched off (``--delay-ms 0``) and ``tc qdisc add dev <veth> root
netem delay 50ms rate 1mbit`` used instead.

Topology (node ``i``)::

    netns fl-edge-i                     host namespace
    ───────────────                     ──────────────
    flower-supernode ── 10.77.i.2 ═══ 10.77.i.1:RELAY ── relay (+delay) ── SuperLink 0.0.0.0:PORT
         (tbf egress = uplink)          (tbf egress = downlink)

The SuperLink's certificate names every ``10.77.i.1``, so TLS checks pass.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cluster import CERTS_SH, Cluster

NS_PREFIX = "fl-edge-"


def ns_name(i: int) -> str:
    return f"{NS_PREFIX}{i}"


def host_ip(i: int) -> str:
    return f"10.77.{i + 1}.1"


def node_ip(i: int) -> str:
    return f"10.77.{i + 1}.2"


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def tbf_args(rate_mbit: float) -> list[str]:
    """``tbf`` at ``rate_mbit``: a burst of at least one MTU and 10 ms of traffic."""
    burst = max(1600, int(rate_mbit * 1e6 / 8 * 0.01))
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "1s"]


def make_links(n: int, rate_mbit: float) -> None:
    """One namespace and veth pair per node; ``rate_mbit`` <= 0: no shaping."""
    remove_links(n)
    for i in range(n):
        ns, h, d = ns_name(i), f"fleh{i}", f"flen{i}"
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", h, "type", "veth", "peer", "name", d)
        _sh("ip", "link", "set", d, "netns", ns)
        _sh("ip", "addr", "add", f"{host_ip(i)}/24", "dev", h)
        _sh("ip", "link", "set", h, "up")
        _sh(
            "ip", "netns", "exec", ns, "ip", "addr", "add", f"{node_ip(i)}/24", "dev", d
        )
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", d, "up")
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        if rate_mbit > 0:
            _sh("tc", "qdisc", "add", "dev", h, "root", *tbf_args(rate_mbit))
            _sh(
                "ip",
                "netns",
                "exec",
                ns,
                "tc",
                "qdisc",
                "add",
                "dev",
                d,
                "root",
                *tbf_args(rate_mbit),
            )


def remove_links(n: int) -> None:
    for i in range(n):
        subprocess.run(["ip", "netns", "del", ns_name(i)], capture_output=True)
        subprocess.run(["ip", "link", "del", f"fleh{i}"], capture_output=True)


# ---------------------------------------------------------------- the delay relay


class DelayRelay:
    """TCP relay that forwards each chunk ``delay_s`` after it arrived, in order,
    in both directions (a fixed one-way latency, like ``netem delay``)."""

    def __init__(
        self, listen: tuple[str, int], target: tuple[str, int], delay_s: float
    ):
        self.listen, self.target, self.delay_s = listen, target, delay_s
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.base_events.Server | None = None

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                wait = due - self.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    break
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(send())
        try:
            while data := await reader.read(65536):
                await queue.put((self.loop.time() + self.delay_s, data))
        except (ConnectionError, OSError):
            pass
        await queue.put((self.loop.time() + self.delay_s, None))
        try:
            await sender
        except (ConnectionError, OSError):
            pass

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            tr, tw = await asyncio.open_connection(*self.target)
        except OSError:
            w.close()
            return
        await asyncio.gather(self._pipe(r, tw), self._pipe(tr, w))

    def start(self) -> None:
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, *self.listen), self.loop
        )
        self.server = fut.result(timeout=10)

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(timeout=5)
        except Exception:  # noqa: BLE001 - best effort on shutdown
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


# ---------------------------------------------------------------- the cluster


class EdgeCluster(Cluster):
    """:class:`Cluster` with each SuperNode in its own namespace behind a relay."""

    RELAY_OFFSET = 1000

    def __init__(self, workdir: str | Path, nodes: int, *, delay_ms: float, **kw: Any):
        super().__init__(workdir, nodes, **kw)
        self.delay_s = delay_ms / 1000.0
        self.relays: list[DelayRelay] = []

    def relay_port(self, i: int) -> int:
        return self.port + self.RELAY_OFFSET + i

    def superlink_cmd(self) -> list[str]:
        cmd = super().superlink_cmd()
        cmd[cmd.index("--host") + 1] = "0.0.0.0"  # reachable from the veth ends
        return cmd

    def supernode_cmd(self, i: int, *a: Any, **kw: Any) -> list[str]:
        cmd = super().supernode_cmd(i, *a, **kw)
        cmd[cmd.index("--superlink") + 1] = f"{host_ip(i)}:{self.relay_port(i)}"
        return ["ip", "netns", "exec", ns_name(i), *cmd]

    def start(self, timeout_s: float = 120.0, online: int | None = None) -> None:
        # A certificate that names every node-facing address.
        for d in (self.certs_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        if not (self.certs_dir / "server.pem").is_file():
            self.cli.check_call(
                [
                    "bash",
                    str(CERTS_SH),
                    str(self.certs_dir),
                    *(host_ip(i) for i in range(self.nodes)),
                ],
                "certs",
            )
        for i in range(self.nodes):
            relay = DelayRelay(
                (host_ip(i), self.relay_port(i)), ("127.0.0.1", self.port), self.delay_s
            )
            relay.start()
            self.relays.append(relay)
        super().start(timeout_s, online)

    def stop(self, timeout_s: float = 15.0) -> None:
        super().stop(timeout_s)
        for r in self.relays:
            r.stop()
        self.relays.clear()


# ---------------------------------------------------------------- measurement

# Payload cases: small compute, so that the network's share shows.
CASES: dict[str, str] = {
    "oscar": 'method="oscar" images-per-class=8 train-epochs=3',
    "lora": 'method="lora" lora-merge="svd" lora-steps=20 '
    "images-per-class=4 train-epochs=2 lora-samples-per-class=4",
    "fedavg-cnn": 'method="fedavg" classifier="cnn" local-epochs=1',
    "fedavg-resnet18": 'method="fedavg" classifier="resnet18" local-epochs=1',
}
PAYLOADS = {
    "oscar": "OSCAR: per-class fp16 text embeddings",
    "lora": "LoRA: fp16 UNet adapter (+ embeddings)",
    "fedavg-cnn": "FedAvg: small CNN, fp32",
    "fedavg-resnet18": "FedAvg: ResNet-18, fp32",
}
COMMON = "max-examples-per-client=300 min-clients={n} target-clients={n} collect-window-s=1800"


def measure(
    workdir: Path, n: int, rate_mbit: float, delay_ms: float, cases: Sequence[str]
) -> list[dict[str, Any]]:
    rows = []
    make_links(n, rate_mbit)
    try:
        with EdgeCluster(
            workdir,
            n,
            delay_ms=delay_ms,
            env={"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"},
        ) as cl:
            for k, case in enumerate(cases):
                # A fresh run name per (link, case): a reused one would resume
                # from the persisted uploads instead of crossing the link again.
                name = f"edge-{rate_mbit:g}mbit-{delay_ms:g}ms-{case}-{k}"
                shutil.rmtree(workdir / "out" / name, ignore_errors=True)
                rc = (
                    f'{CASES[case]} {COMMON.format(n=n)} run-name="{name}" '
                    f'output-dir="{workdir / "out"}"'
                )
                t0 = time.perf_counter()
                run = cl.run_app(rc, timeout=3600)
                wall = time.perf_counter() - t0
                res_path = workdir / "out" / name / "results.json"
                res = json.loads(res_path.read_text()) if res_path.is_file() else None
                row = {
                    "case": case,
                    "rate_mbit": rate_mbit,
                    "delay_ms": delay_ms,
                    "ok": bool(run.ok and res),
                    "wall_s": wall,
                }
                if res:
                    row |= {
                        "upload_bytes_per_client": res["upload_bytes_per_client"],
                        "download_bytes_per_client": res.get(
                            "download_bytes_per_client"
                        ),
                        "timings_s": res["timings_s"],
                        "mean_accuracy": res["mean_accuracy"],
                        "num_clients": res["num_clients"],
                    }
                print(
                    f"[edge] {rate_mbit} Mbit/s {delay_ms} ms {case}: "
                    f"{json.dumps(row.get('timings_s'))} ok={row['ok']}",
                    flush=True,
                )
                rows.append(row)
    finally:
        remove_links(n)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| link | payload | upload B/client | download B/client | collect s | server work s "
        "| evaluate s | round total s | mean acc |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        link = (
            "unshaped loopback"
            if r["rate_mbit"] <= 0
            else f"{r['rate_mbit']:g} Mbit/s, +{r['delay_ms']:g} ms each way"
        )
        if not r["ok"]:
            lines.append(f"| {link} | {PAYLOADS[r['case']]} | failed | | | | | | |")
            continue
        t = r["timings_s"]
        server = t.get("synthesize", 0) + t.get("train", 0) + t.get("merge", 0)
        down = r.get("download_bytes_per_client")
        lines.append(
            f"| {link} | {PAYLOADS[r['case']]} | {r['upload_bytes_per_client'] or 0:,.0f} "
            f"| {'n/a' if down is None else f'{down:,.0f}'} | {t['collect']:.1f} "
            f"| {server:.1f} | {t['evaluate']:.1f} | {t['total']:.1f} "
            f"| {r['mean_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deploy.edge_links", description=__doc__.split("\n")[0]
    )
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument(
        "--rate-mbit", type=float, default=1.0, help="per-link rate (<= 0: off)"
    )
    p.add_argument("--delay-ms", type=float, default=50.0, help="one-way latency")
    p.add_argument("--baseline", action="store_true", help="also run unshaped")
    p.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated case names"
    )
    p.add_argument("--workdir", default="/tmp/fl-edge")
    p.add_argument("--out", default="bench-results/edge_links.json")
    p.add_argument(
        "--append", action="store_true", help="add rows to an existing --out"
    )
    a = p.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        print("deploy.edge_links needs root, `ip` and `tc` (iproute2)", file=sys.stderr)
        return 2
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        print(f"--cases: unknown {bad}; choose from {list(CASES)}", file=sys.stderr)
        return 2
    out = Path(a.out)
    rows: list[dict[str, Any]] = (
        json.loads(out.read_text())["rows"] if a.append and out.is_file() else []
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = [(a.rate_mbit, a.delay_ms)] + ([(0.0, 0.0)] if a.baseline else [])
    for rate, delay in settings:
        rows += measure(Path(a.workdir), a.nodes, rate, delay, cases)
        out.write_text(json.dumps({"nodes": a.nodes, "rows": rows}, indent=1))
    table = format_table(rows)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""deploy.edge_links: the delay relay, the tbf settings and the table (no root needed)."""

from __future__ import annotations

import socket
import threading
import time

from deploy import edge_links as E
from deploy.procs import free_port


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_relay_delays_both_ways_and_keeps_every_byte():
    srv, port = _echo_server()
    listen = ("127.0.0.1", free_port())
    relay = E.DelayRelay(listen, ("127.0.0.1", port), delay_s=0.2)
    relay.start()
    try:
        payload = bytes(range(256)) * 4096  # 1 MiB
        with socket.create_connection(listen, timeout=10) as c:
            t0 = time.perf_counter()
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            rtt = time.perf_counter() - t0
            c.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += c.recv(65536)
        # two relayed legs of 0.2 s each (a lower bound only: never flaky)
        assert rtt >= 0.4
        assert got == payload
    finally:
        relay.stop()
        srv.close()


def test_tbf_burst_is_at_least_one_mtu():
    args = E.tbf_args(1.0)
    assert args[:3] == ["tbf", "rate", "1.0mbit"]
    assert int(args[args.index("burst") + 1]) >= 1600
    # 100 Mbit/s: 10 ms of traffic = 125,000 bytes
    assert E.tbf_args(100.0)[E.tbf_args(100.0).index("burst") + 1] == "125000"


def test_table_rows():
    rows = [
        {
            "case": "oscar",
            "rate_mbit": 1.0,
            "delay_ms": 50.0,
            "ok": True,
            "upload_bytes_per_client": 1716.0,
            "download_bytes_per_client": 900,
            "timings_s": {
                "collect": 20.0,
                "synthesize": 5.0,
                "train": 1.0,
                "evaluate": 10.0,
                "total": 37.0,
            },
            "mean_accuracy": 0.5,
        },
        {"case": "fedavg-resnet18", "rate_mbit": 0.0, "delay_ms": 0.0, "ok": False},
    ]
    t = E.format_table(rows)
    assert "| 1 Mbit/s, +50 ms each way | OSCAR" in t
    assert "| 1,716 | 900 | 20.0 | 6.0 | 10.0 | 37.0 | 0.500 |" in t
    assert "| unshaped loopback | FedAvg: ResNet-18, fp32 | failed" in t
    assert set(E.PAYLOADS) == set(E.CASES)

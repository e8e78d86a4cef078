"""report.html: a real round's report opened in a real headless browser, a
hostile client's strings shown as text, and the report bounded at 1,000 clients.

The browser is Debian's ``chromium``, driven by its command line (``--dump-dom``,
``--screenshot``): nothing is downloaded. Without it the browser tests fail and
say how to install it (``.ci/run`` installs it).
"""

from __future__ import annotations

import base64
import io
import random
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message
from PIL import Image

from common import contract as C
from deploy.inprocess import partition_fleet, run_round
from server_app import plots, report_html

FLAGS = [
    "--headless",
    "--no-sandbox",  # as root (CI containers)
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# a domain that is markup, an attribute, and a formula matplotlib cannot parse
HOSTILE = "<script>x()</script><i id=pwned>${$"
HOSTILE_CLASS = "<script>y()</script><b id=pwned2>"


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail(
            "chromium is not installed: tests/round/test_report.py opens report.html in a "
            "real headless browser. Install it (Debian/Ubuntu, as root): "
            "apt-get update && apt-get install -y --no-install-recommends chromium   "
            "(.ci/run does this)",
            pytrace=False,
        )
    return exe


def _browse(page: Path, tmp_path: Path, *args: str) -> str:
    """Run headless chromium on ``page`` with a fresh profile; its stdout."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    profile.mkdir()
    cmd = [_chromium(), *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (cmd, done.stderr[-2000:])
    return done.stdout


class Dom(HTMLParser):
    """Elements (tag, attributes, ancestors' tags and ids) and the text under
    each id of an HTML document."""

    VOID = {
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "source",
        "track",
        "wbr",
    }

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict[str, Any]] = []
        self.text: dict[str, str] = {}
        self._open: list[tuple[str, str | None]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.elements.append({"tag": tag, "attrs": a, "in": list(self._open)})
        if tag not in self.VOID:
            self._open.append((tag, a.get("id")))
            if a.get("id"):
                self.text.setdefault(str(a["id"]), "")

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                break

    def handle_data(self, data: str) -> None:
        for _, eid in self._open:
            if eid:
                self.text[eid] += data

    def find(self, tag: str, within: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.elements
            if e["tag"] == tag
            and (within is None or any(i == within for _, i in e["in"]))
        ]

    def by_id(self, eid: str) -> list[dict[str, Any]]:
        return [e for e in self.elements if e["attrs"].get("id") == eid]


def _png(src: str) -> Image.Image:
    head = "data:image/png;base64,"
    assert src.startswith(head), src[:40]
    img = Image.open(io.BytesIO(base64.b64decode(src[len(head) :], validate=True)))
    assert img.format == "PNG"
    img.load()
    return img


def _round(fast_config: dict[str, Any], tamper: dict | None = None):
    rc = fast_config | {
        "method": "oscar",
        "collect-quiet-s": 0.0,
        "collect-window-s": 30.0,
    }
    res, _ = run_round(partition_fleet(3, tamper=tamper), rc)
    return res, Path(rc["output-dir"]) / "inprocess"


def test_report_opens_in_a_headless_browser(tiny_stack, fast_config, tmp_path):
    res, run_dir = _round(fast_config)
    page = run_dir / "report.html"
    assert page.is_file()

    # 1. The DOM the browser built: the table, the plots, the headline
    dom = Dom(_browse(page, tmp_path, "--dump-dom"))
    rows = [
        e
        for e in dom.find("tr", within="clients-table")
        if any(t == "tbody" for t, _ in e["in"])
    ]
    assert len(rows) == 3 == res["num_clients"]
    assert "101" in dom.text["clients-table"] and "103" in dom.text["clients-table"]
    for key, name in (
        ("accuracy", "accuracy_per_client"),
        ("samples", "synthetic_samples"),
    ):
        (img,) = dom.by_id(f"plot-{key}")
        assert img["tag"] == "img"
        png = _png(img["attrs"]["src"])
        assert 400 <= png.width <= 1500 and 100 <= png.height <= 2000, png.size
        on_disk = (run_dir / f"{name}.png").read_bytes()
        assert base64.b64decode(img["attrs"]["src"].split(",", 1)[1]) == on_disk
    assert f"{100 * res['global_accuracy']:.1f}%" in dom.text["global-accuracy"]
    assert f"{100 * res['mean_accuracy']:.1f}%" in dom.text["mean-client-accuracy"]
    for d, acc in res["global_accuracy_per_domain"].items():
        assert d in dom.text["global-per-domain"]
        assert f"{100 * acc:.1f}%" in dom.text["global-per-domain"]
    # self-contained: no script, nothing fetched from elsewhere
    assert not dom.find("script")
    for e in dom.elements:
        for k in ("src", "href"):
            assert not str(e["attrs"].get(k) or "").startswith(("http", "//")), e

    # 2. What a user sees: a screenshot of the page is not blank
    shot = tmp_path / "report.png"
    _browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400")
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2400)
    small = img.resize((320, 600))
    background = small.getpixel((2, 2))
    pixels = list(small.getdata())
    differ = sum(p != background for p in pixels) / len(pixels)
    assert differ > 0.2, f"only {differ:.0%} of the screenshot is not background"
    assert len(set(pixels)) > 200  # text, plots and samples, not a flat page


def test_report_shows_hostile_client_strings_as_text(tiny_stack, fast_config, tmp_path):
    def domain(reply: Message, msg: Message) -> Message:
        reply.content[C.KEY_META]["domain"] = HOSTILE
        return reply

    def classes(reply: Message, msg: Message) -> Message:
        reply.content[C.KEY_META]["class-names"] = HOSTILE_CLASS + ",z"
        return reply

    res, run_dir = _round(fast_config, tamper={1: domain, 2: classes})
    # the hostile domain is a valid client's; the hostile class names are rejected
    assert [c["domain"] for c in res["clients"] if c["partition_id"] == 1] == [HOSTILE]
    assert [r["node_id"] for r in res["rejected"]] == [103]
    assert "id=pwned2" in res["rejected"][0]["reason"]
    text = (run_dir / "report.html").read_text()
    assert "<script" not in text.lower()
    assert "<i id=pwned" not in text and "<b id=pwned2" not in text
    assert "&lt;script&gt;x()&lt;/script&gt;&lt;i id=pwned&gt;" in text
    assert "&lt;b id=pwned2&gt;" in text

    dom = Dom(_browse(run_dir / "report.html", tmp_path, "--dump-dom"))
    assert not dom.find("script") and not dom.find("i") and not dom.find("b")
    assert not dom.by_id("pwned") and not dom.by_id("pwned2")
    assert HOSTILE in dom.text["clients-table"]  # shown, as text
    assert HOSTILE_CLASS in dom.text["rejected-table"]
    assert len(dom.find("img")) == 2  # the two plots, nothing a client added
    # matplotlib took the '$' as text, not as a formula: the plots were drawn
    assert (run_dir / "accuracy_per_client.png").is_file()
    assert (run_dir / "synthetic_samples.png").is_file()


def _fleet(n: int) -> dict[str, Any]:
    """A results dict of ``n`` clients: five domains, and every 16th client names
    its own; the last 40 rejected with a hostile reason."""
    rng = random.Random(0)
    doms = ["inverted", "thick", "thin", "rotated", "noisy"]
    clients = []
    for p in range(n):
        own = p % 16 == 15
        clients.append(
            {
                "partition_id": p,
                "node_id": 1000 + p,
                "domain": f"<u>own-{p}</u>" if own else doms[p % 5],
                "num_examples": 100,
                "upload_bytes": 4000,
                "accuracy": rng.uniform(0.4, 0.95),
                "status": "ok",
            }
        )
    rejected = [
        {
            "node_id": c["node_id"],
            "partition_id": c["partition_id"],
            "reason": f"<script>r({i})</script>",
        }
        for i, c in enumerate(clients[-40:])
    ]
    for c, r in zip(clients[-40:], rejected, strict=True):
        c |= {"accuracy": None, "status": f"excluded: {r['reason']}"}
    return {
        "method": "oscar",
        "dataset": "mnist-domains",
        "partition": "dirichlet",
        "num_clients": n - 40,
        "clients": clients,
        "rejected": rejected,
        "missing": [],
        "mean_accuracy": 0.7,
        "global_accuracy": 0.8,
        "global_accuracy_per_domain": {d: 0.8 for d in doms},
        "global_test_size": 5000,
        "fleet": {
            "asked": list(range(1000, 1000 + n)),
            "rejected": [r["node_id"] for r in rejected],
            "closed_reason": "window",
        },
        "timings_s": {"collect": 1.0, "total": 2.0},
        "config": {"seed": 0},
    }


def test_report_and_plots_stay_bounded_at_1000_clients(tmp_path):
    res = _fleet(1000)
    clients = res["clients"]
    acc = plots.plot_accuracy(
        tmp_path,
        clients,
        "oscar on mnist-domains",
        0.8,
        res["global_accuracy_per_domain"],
        5000,
    )
    assert acc is not None
    w, h = Image.open(acc).size
    assert w <= 1400 and h <= 400, (w, h)
    torch.manual_seed(0)
    samples = {
        (c["partition_id"], k): torch.rand(2, 1, 16, 16) * 2 - 1
        for c in clients
        for k in range(100)
        if (c["partition_id"] + k) % 7
    }
    domains = {c["partition_id"]: c["domain"] for c in clients}
    grid = plots.plot_samples(tmp_path, samples, [f"c{k}" for k in range(100)], domains)
    assert grid is not None
    w, h = Image.open(grid).size
    assert w <= 1500 and h <= 1500, (w, h)

    page = report_html.render(
        res, {"accuracy": acc.read_bytes(), "samples": grid.read_bytes()}, 20
    )
    assert "<script" not in page and "<u>" not in page
    dom = Dom(page)
    # a row per domain, the largest 19 of the 5 + 62 and the rest pooled; every
    # client in the (collapsed) full list
    assert len({c["domain"] for c in clients}) == 5 + 62
    assert len(dom.find("tr", within="domain-table")) == 1 + 20
    assert "48 other domains" in dom.text["domain-table"]
    assert len(dom.find("tr", within="clients-table")) == 1 + 1000
    assert any(
        e["tag"] == "details" and any(i == "clients" for _, i in e["in"])
        for e in dom.elements
    )
    assert len(dom.find("tr", within="rejected-table")) == 1 + 40
    assert "80.0%" in dom.text["global-accuracy"]


def test_sample_grid_cells_are_uniform_and_mark_missing_data(tmp_path):
    """Each cell is the same size whatever its number of images; an empty one is
    the same plain cell, marked in the plot, not a larger box."""
    black = torch.full((1, 1, 8, 8), -1.0)
    white3 = torch.ones(3, 1, 8, 8)
    samples = {(0, 0): black, (0, 1): white3, (1, 1): black}  # (1, 0): no data
    m = plots.sample_mosaic(samples, [0, 1], [0, 1])
    assert m.empty == [(1, 0)]
    assert (m.cell_h, m.cell_w) == (8, 3 * 8 + 2 * 1)  # three images and two gaps
    assert tuple(m.image.shape) == (
        m.gap + 2 * (8 + m.gap),
        m.gap + 2 * (26 + m.gap),
        3,
    )
    cell = {
        (i, j): m.image[y : y + 8, x : x + 26]
        for i in (0, 1)
        for j in (0, 1)
        for y, x in [m.origin(i, j)]
    }
    # one image: black on the left, the rest of the equal cell is ground
    assert (cell[0, 0][:, :8] == 0).all() and (cell[0, 0][:, 8:] == C_GROUND).all()
    assert (cell[0, 1][:, :8] == 1).all() and (cell[0, 1][:, 8] == C_GROUND).all()
    assert (cell[1, 0] == C_GROUND).all()  # no data: a plain cell of the same size
    # white between cells
    y, x = m.origin(1, 1)
    assert (m.image[y - m.gap : y, x : x + 26] == 1).all()

    path = plots.plot_samples(tmp_path, samples, ["a", "b"], {0: HOSTILE, 1: "y"})
    assert path is not None and Image.open(path).size[0] <= 1500


C_GROUND = plots.CELL_GROUND

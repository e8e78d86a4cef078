"""Where a run's results go (issue 25): ``output-dir`` made absolute, or refused.

Flower 1.41 does not tell the ServerApp which directory ``flwr run <dir>`` was
given, and ``flwr run . local`` reuses one simulation SuperLink (and its working
directory) for runs from any checkout. ``server_app.outputs`` resolves a
relative ``output-dir`` against the checkout the run provably came from, and
refuses it otherwise. The unit tests use a toy Flower app, bundled and installed
by Flower's own build and install; the slow test runs the real app from two
checkouts against one simulation SuperLink.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from common.config import ConfigError
from deploy import local_superlink, procs
from methods import build_config
from server_app.outputs import (
    Where,
    app_root,
    bundle_differences,
    is_installed_bundle,
    resolve_output_dir,
    where,
)
from server_app.round import RoundError, run_dir_for

ROOT = Path(__file__).resolve().parents[2]

TOY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "toyapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "toy"

[tool.flwr.app.components]
serverapp = "server_app.app:app"
clientapp = "client_app.app:app"

[tool.flwr.app.config]
output-dir = "outputs"
"""


def make_checkout(path: Path) -> Path:
    """A toy Flower app: pyproject.toml, a ServerApp and a ClientApp module."""
    for pkg in ("server_app", "client_app"):
        (path / pkg).mkdir(parents=True)
        (path / pkg / "__init__.py").write_text("")
        (path / pkg / "app.py").write_text("app = None\n")
    (path / "pyproject.toml").write_text(TOY_PYPROJECT)
    return path


def install(checkout: Path, flwr_home: Path) -> Path:
    """The bundle ``flwr run <checkout>`` sends, installed the way the
    ServerApp's process installs it (``$FLWR_HOME/apps/...``)."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.install import install_from_fab

    fab = build_fab_from_disk(checkout)
    return Path(install_from_fab(fab, install_dir=flwr_home, skip_prompt=True))


@pytest.fixture
def a(tmp_path) -> Path:
    return make_checkout(tmp_path / "a")


# ---------------------------------------------------------------- absolute


@pytest.mark.parametrize("runtime", ["source", "simulation", "deployment"])
def test_an_absolute_output_dir_is_used_as_given(tmp_path, runtime):
    at = Where(runtime, None, tmp_path / "nowhere")  # nothing else is looked at
    assert resolve_output_dir(str(tmp_path / "out"), at) == (tmp_path / "out")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    assert resolve_output_dir(str(link), at) == (tmp_path / "real").resolve()


def test_a_home_relative_output_dir_is_absolute(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    at = Where("deployment", Path("/"), tmp_path)
    assert resolve_output_dir("~/results", at) == (tmp_path / "results").resolve()


# ---------------------------------------------------------------- deployment


def test_a_deployment_refuses_a_relative_output_dir(tmp_path):
    at = Where("deployment", tmp_path / "srv", tmp_path / "apps" / "x")
    with pytest.raises(ConfigError) as e:
        resolve_output_dir("outputs", at)
    msg = str(e.value)
    assert "output-dir='outputs' is a relative path" in msg  # the key and value
    assert "deployment" in msg and str(tmp_path / "srv") in msg  # where it'd land
    assert "Pass an absolute output-dir" in msg and "--run-config" in msg  # the fix


# ---------------------------------------------------------------- source tree


def test_source_code_resolves_against_its_checkout(a, tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    with caplog.at_level(logging.INFO):
        got = resolve_output_dir("outputs", Where("source", elsewhere, a))
    assert got == a.resolve() / "outputs"
    assert f"resolved against {a}" in caplog.text and str(got) in caplog.text


def test_source_code_outside_a_checkout_resolves_against_the_cwd(tmp_path):
    site = tmp_path / "site-packages"  # an installed package: no pyproject.toml
    site.mkdir()
    got = resolve_output_dir("out", Where("source", tmp_path / "cwd", site))
    assert got == (tmp_path / "cwd" / "out").resolve()
    with pytest.raises(ConfigError, match="working directory was deleted"):
        resolve_output_dir("out", Where("source", None, site))


# ---------------------------------------------------------------- simulation


def test_simulation_resolves_against_the_superlinks_checkout(a, tmp_path, caplog):
    app = install(a, tmp_path / "flwr-home")
    with caplog.at_level(logging.INFO):
        got = resolve_output_dir("outputs", Where("simulation", a, app))
    assert got == a.resolve() / "outputs"
    assert "simulation SuperLink was started from" in caplog.text
    assert str(got) in caplog.text  # the absolute path is in the log


def test_simulation_refuses_a_run_from_another_checkout(a, tmp_path):
    b = make_checkout(tmp_path / "b")
    (b / "server_app" / "app.py").write_text("app = None  # b's local edit\n")
    (b / "server_app" / "extra.py").write_text("")
    app_b = install(b, tmp_path / "flwr-home")
    with pytest.raises(ConfigError) as e:  # SuperLink started in a, run from b
        resolve_output_dir("outputs", Where("simulation", a, app_b))
    msg = str(e.value)
    assert "output-dir='outputs' is a relative path" in msg
    assert f"differs from the checkout {a}" in msg
    assert "2 file(s) differ: server_app/app.py, server_app/extra.py" in msg
    assert f"would land in {a / 'outputs'}" in msg
    assert "Pass an absolute output-dir" in msg
    assert "python -m deploy.local_superlink stop" in msg


def test_simulation_refuses_when_the_superlink_is_not_in_a_checkout(a, tmp_path):
    app = install(a, tmp_path / "flwr-home")
    home = tmp_path / "home"  # `cd ~ && flwr run ~/a local` started it here
    home.mkdir()
    with pytest.raises(ConfigError) as e:
        resolve_output_dir("outputs", Where("simulation", home, app))
    msg = str(e.value)
    assert f"started in {home}, which is not a checkout of this app" in msg
    assert "pyproject.toml not found" in msg
    assert "Pass an absolute output-dir" in msg
    with pytest.raises(ConfigError, match="SuperLink was deleted"):
        resolve_output_dir("outputs", Where("simulation", None, app))


def test_identical_checkouts_cannot_be_told_apart(a, tmp_path):
    """The documented limit: Flower's bundles of two identical checkouts are
    byte-identical (fixed timestamps), so nothing the ServerApp gets tells them
    apart; such a run goes to the SuperLink's checkout, as the log line says."""
    from flwr.cli.build import build_fab_from_disk

    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert build_fab_from_disk(a) == build_fab_from_disk(b)
    app_b = install(b, tmp_path / "flwr-home")
    assert resolve_output_dir("o", Where("simulation", a, app_b)) == a.resolve() / "o"


def test_bundle_differences_compare_what_flower_bundles(a, tmp_path):
    app = install(a, tmp_path / "flwr-home")
    # Python's bytecode in the installed bundle, and files Flower does not
    # bundle (outputs, a test file, pyproject's comments) are no difference
    (app / "server_app" / "__pycache__").mkdir()
    (app / "server_app" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"x")
    (a / "outputs" / "run").mkdir(parents=True)
    (a / "outputs" / "run" / "results.bin").write_bytes(b"x")
    (a / "server_app" / "test_app.py").write_text("")
    (a / "pyproject.toml").write_text("# a comment\n" + TOY_PYPROJECT)
    # the lock file Flower's runtime dependency installation (uv sync) writes
    # into the installed bundle
    (app / "uv.lock").write_text("version = 1\n")
    assert bundle_differences(a, app) == []
    # another file only in the installed bundle: a difference
    (app / "server_app" / "extra.py").write_text("")
    assert bundle_differences(a, app) == ["server_app/extra.py"]
    (app / "server_app" / "extra.py").unlink()
    # a changed default in pyproject.toml, a deleted module: differences
    (a / "pyproject.toml").write_text(TOY_PYPROJECT.replace('"outputs"', '"out"'))
    (a / "client_app" / "app.py").unlink()
    assert bundle_differences(a, app) == ["client_app/app.py", "pyproject.toml"]


def test_this_repository_bundles_equal_to_its_checkout(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    app = install(ROOT, tmp_path / "flwr-home")
    assert is_installed_bundle(app)
    assert (app / "server_app" / "outputs.py").is_file()  # fab-include has it
    # the server reads a method's card (results.json's privacy class)
    assert (app / "methods" / "oscar" / "card.toml").is_file()
    assert bundle_differences(ROOT, app) == []
    assert len(build_fab_from_disk(ROOT)) < 10 * 1024 * 1024


# ---------------------------------------------------------------- where


def test_where_tells_the_runtime(a, tmp_path, monkeypatch):
    import server_app.outputs as outputs

    assert where() == Where("source", Path.cwd().resolve(), ROOT)
    assert app_root() == ROOT and not is_installed_bundle(ROOT)
    app = install(a, tmp_path / "flwr-home")
    assert is_installed_bundle(app)
    monkeypatch.setattr(outputs, "app_root", lambda: app)
    monkeypatch.setattr("sys.argv", ["/venv/bin/flwr-simulation", "--insecure"])
    assert where().runtime == "simulation"
    monkeypatch.setattr("sys.argv", ["/venv/bin/flwr-serverapp", "--insecure"])
    assert where().runtime == "deployment"
    # a folder named like a bundle whose pyproject.toml disagrees is not one
    fake = tmp_path / "apps" / "toy.other.1.0.0.0123abcd"
    shutil.copytree(app, fake)
    assert not is_installed_bundle(fake)
    assert not is_installed_bundle(tmp_path / "apps" / "missing.0123abcd")


# ---------------------------------------------------------------- run_dir_for


def test_run_dir_for_keeps_run_name_and_stays_inside(tmp_path):
    cfg = build_config({"output-dir": str(tmp_path / "out")})
    assert run_dir_for(cfg, 42) == (tmp_path / "out" / "42").resolve()
    named = cfg.model_copy(update={"run_name": "mine"})
    assert run_dir_for(named, 42) == (tmp_path / "out" / "mine").resolve()
    escape = cfg.model_copy(update={"run_name": ".."})  # past the validator
    with pytest.raises(RoundError, match="is not inside output-dir"):
        run_dir_for(escape, 42)


def test_run_dir_for_resolves_a_relative_output_dir(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the working directory no longer decides
    cfg = build_config({"output-dir": "outputs", "run-name": "r"})
    assert run_dir_for(cfg, 1) == ROOT / "outputs" / "r"


# ---------------------------------------------------------------- two checkouts

PORT, CONTROL_PORT = 39591, 39593  # apart from the other tests' SuperLinks
TINY = (
    'method="fedavg" max-examples-per-client=60 images-per-class=2 '
    "num-inference-steps=2 train-epochs=1 local-epochs=1 min-clients=2 "
    "target-clients=2 seed=0 global-test-per-class=20"
)
APP_FILES = ("server_app", "client_app", "methods", "common")


def copy_checkout(dst: Path) -> Path:
    """What ``flwr run`` reads of a checkout: pyproject.toml, .gitignore and the
    ``fab-include`` packages (the working tree's, uncommitted files included)."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "embedded")
    for name in APP_FILES:
        shutil.copytree(ROOT / name, dst / name, ignore=skip)
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copy2(ROOT / name, dst / name)
    return dst


def flwr_run(checkout: Path, env: dict[str, str], run_config: str) -> str:
    """``flwr run . local`` typed in ``checkout``; its streamed output (also
    appended to ``flwr-run-<checkout>.log`` beside the checkout)."""
    cmd = [
        "flwr",
        "run",
        ".",
        "local",
        "--stream",
        "--federation-config",
        "num-supernodes=2",
        "--run-config",
        run_config,
    ]
    # subprocess.run kills the CLI (its own child) on a timeout
    done = subprocess.run(
        cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=240
    )
    out = done.stdout + done.stderr
    with open(checkout.parent / f"flwr-run-{checkout.name}.log", "a") as f:
        f.write(f"$ (cd {checkout} && {' '.join(cmd)})\n{out}\n")
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_checkouts_one_simulation_superlink(tmp_path):
    """The SuperLink is started from checkout a; a run from checkout b (with a
    local edit) and the default relative output-dir is refused, and lands
    nowhere; with an absolute output-dir it lands in b."""
    assert shutil.which("flwr"), "the flwr CLI comes with the project's install"
    a, b = copy_checkout(tmp_path / "a"), copy_checkout(tmp_path / "b")
    with open(b / "methods" / "__init__.py", "a") as f:
        f.write("# checkout b: a local edit\n")
    flwr_home = tmp_path / "flwr-home"
    env = (
        os.environ
        | procs.FLWR_ENV
        | {
            "HF_HUB_OFFLINE": "1",
            "FLWR_HOME": str(flwr_home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(PORT),
            "FLWR_LOCAL_CONTROL_API_PORT": str(CONTROL_PORT),
        }
    )
    assert not procs.http_ok(f"http://{procs.HOST}:{PORT}/health"), (
        f"a SuperLink of someone else answers on port {PORT}"
    )
    try:
        # 1. From a: starts the SuperLink in a; the relative default lands in a
        out_a = flwr_run(a, env, TINY + ' run-name="from-a"')
        links = local_superlink.superlink_processes(flwr_home)
        assert len(links) == 1 and Path(links[0].cwd()) == a, out_a
        assert (a / "outputs" / "from-a" / "results.json").is_file(), out_a
        assert f"resolved against {a} " in out_a
        assert f"results in {a / 'outputs' / 'from-a'}" in out_a  # absolute

        # 2. From b, same SuperLink, relative output-dir: refused, nothing written
        out_b = flwr_run(b, env, TINY + ' run-name="from-b"')
        assert [p.pid for p in local_superlink.superlink_processes(flwr_home)] == [
            links[0].pid
        ]
        assert "output-dir='outputs' is a relative path" in out_b, out_b
        assert f"differs from the checkout {a}" in out_b
        assert "methods/__init__.py" in out_b and "absolute output-dir" in out_b
        assert not (a / "outputs" / "from-b").exists()
        assert not (b / "outputs").exists()

        # 3. From b with an absolute output-dir: lands in b
        out_b2 = flwr_run(b, env, TINY + f' run-name="from-b" output-dir="{b}/outputs"')
        assert (b / "outputs" / "from-b" / "results.json").is_file(), out_b2
        assert f"results in {b / 'outputs' / 'from-b'}" in out_b2
        assert not (a / "outputs" / "from-b").exists()
    finally:
        local_superlink.stop_superlinks(flwr_home)
    assert not local_superlink.superlink_processes(flwr_home)

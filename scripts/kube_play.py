#!/usr/bin/env python3
"""The rendered Kubernetes manifests, run with `podman kube play`, then the e2e Job's pod against them.

    make kube-play              # or: .venv/bin/python scripts/kube_play.py [--overlay DIR] [--keep] [--ray-workers N]

The closest a machine without a cluster gets to `kubectl apply -k deploy/k8s/overlays/cpu` followed by
`kubectl apply -k deploy/k8s/e2e` (deploy/k8s/README.md, "Run the manifests with podman kube play"). The fleet's
own workloads run from the built images (`make images`) with their rendered pod specs; what podman cannot run is
replaced as follows (printed at the start of every run):

- One podman bridge network for the run (its own /24, removed at the end): every pod has its own address, so the
  manifests' ports are used unchanged and collide with nothing.
- Services -> `hostAliases` in every pod (`name`, `name.<ns>`, `name.<ns>.svc`, `name.<ns>.svc.cluster.local`) to
  the one pod the Service's selector matches (each Service port must equal its target port: /etc/hosts cannot
  remap ports). No kube-proxy, no load balancing: each Deployment runs ONE replica.
- NATS, Valkey, Neo4j (StatefulSets of third-party images: no registry here) and vLLM (vllm-cpu is not built by
  default) -> servers on the host, bound to the network's gateway address on the Services' ports: NATS JetStream
  and Valkey (services.local.infra), FalkorDB's Bolt for Neo4j (user `falkordb`; fleet-config's GRAPH_BACKEND
  becomes `falkordb`), tests/openai_server.py for vLLM (fleet-config's model name, deterministic answers).
- The OIDC issuer -> the local fleet's (services.local.issuer) on the gateway: AUTH_ISSUER (a placeholder in the
  manifests) becomes its URL, and the Secrets and ConfigMap the README creates by hand (neo4j-auth,
  fleet-service-token, fleet-admin-token, fleet-issuer-jwks) are made from it. Nothing else of fleet-config changes.
- Jobs -> plain pods (restartPolicy Never), run in order and waited for: exit 0 is the Job's success.
- RayCluster (KubeRay CRD) -> a head pod and `--ray-workers` (1) worker pods from its templates, with the
  `ray start` commands KubeRay generates (rayStartParams, its ports, CPUs and memory from the limits).
- Not played: Namespace, ServiceAccount, PersistentVolumeClaim, PodDisruptionBudget, Ingress, NetworkPolicy
  (nothing enforces them: every pod reaches every port on the network).
- Probes: podman 4.3 runs no readiness, startup or gRPC probes (an HTTP liveness probe becomes a healthcheck that
  nothing runs without systemd timers): this script runs each pod's readinessProbe itself (gRPC health, HTTP GET;
  KubeRay's raylet/GCS health checks for Ray pods) and fails naming the pod when it does not pass in time.
- podman 4.3 quirks worked around: every containerPort would be published on the host's wildcard address
  (Kubernetes only lists them): removed, after resolving the probes' named ports. An emptyDir is a named volume
  shared by every pod with the same volume name: renamed `<pod>-<volume>`; it is a disk directory whose mode comes
  from the image's directory, without sizeLimit, and the /dev/shm one (medium Memory) is left out (the pod's own
  64 MB /dev/shm tmpfs stays: uid 10001 could not write the volume). A secret volume without `optional` crashes
  kube play: set to false. A secretKeyRef reads a podman secret holding a JSON map of base64 values, a secret volume
  one holding a Secret object, so each Secret may be used one way only (true of ours). Init containers get the
  pod's restartPolicy (Always restarts one that ended, and kube play fails): a Deployment with init containers
  runs with restartPolicy OnFailure. Secret volumes ignore `items` and `defaultMode` (files 0644); fsGroup is not
  applied (no supplementary group).

Inside every running fleet and Ray container the securityContext is checked (uid/gid, an empty capability bounding
set, NoNewPrivs, a read-only root where the manifest says so), and in `podman inspect` its memory limit (the CPU
limit is printed). Everything is removed at the end, by name, also on a failure, Ctrl-C or SIGTERM (`--keep`
keeps it up until then). Exit 0 only when every step passed and the e2e pod's pytest exited 0.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/openai_server.py: the vLLM stand-in

NAMESPACE = "swe-ai-fleet"
LOCK = Path(tempfile.gettempdir()) / "swe-ai-fleet-kube-play.lock"
NETWORK = "swe-ai-fleet-kube-play"
# Objects podman kube play has no equivalent for, and what stands in for them.
NOT_PLAYED = {
    "Namespace": "podman has no namespaces: every name below is global to the host's podman",
    "ServiceAccount": "no API server: the pods mount no token anyway (automountServiceAccountToken: false)",
    "Service": "hostAliases in every pod -> the pod the selector matches (or the host's stand-in server)",
    "PersistentVolumeClaim": "only the StatefulSets and vLLM use them, and those run on the host here",
    "PodDisruptionBudget": "no evictions without a cluster",
    "Ingress": "no ingress controller: monitoring is reached on its pod address",
    "NetworkPolicy": "not enforced: every pod reaches every port on the network",
    "StatefulSet": "third-party images (no registry): NATS, Valkey and FalkorDB (Bolt) on the host",
    "RayCluster": "no KubeRay operator: head and worker pods built from its templates",
    "ConfigMap": "given to kube play with each pod (fleet-config with AUTH_ISSUER replaced)",
    "Job": "a plain pod (restartPolicy Never), run to completion in order",
}
HOST_STANDINS = {  # Service -> what runs on the host in its place
    "nats": "NATS JetStream (nats-server, services.local.infra)",
    "valkey": "Valkey (services.local.infra)",
    "neo4j": "FalkorDB's Bolt (services.local.infra)",
    "vllm": "tests/openai_server.py (deterministic OpenAI-compatible answers)",
}
NOT_BUILT = {"vllm": "the vllm-cpu image is not built by `make images` (VLLM_CPU=1): tests/openai_server.py instead"}
RAY_AGENT_PORT = 52365  # KubeRay's --dashboard-agent-listen-port (its probes call it)


class Failed(Exception):
    """A step failed: the message names the pod/container and carries its last log lines."""


# --- podman ---------------------------------------------------------------------------------------------------


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(ROOT / "deploy" / "podman" / "containers.conf"))
    env.setdefault("CONTAINERS_STORAGE_CONF", str(ROOT / "deploy" / "podman" / "storage.conf"))
    return env


@dataclass
class Podman:
    path: str = field(default_factory=lambda: shutil.which("podman") or "podman")
    env: dict[str, str] = field(default_factory=podman_env)

    def run(self, *args: str, check: bool = True, timeout: float = 300, stdin: str | None = None) -> str:
        proc = subprocess.run(
            [self.path, *args], env=self.env, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise Failed(f"podman {' '.join(args[:3])} ...: exit {proc.returncode}\n{proc.stderr.strip()[-3000:]}")
        return proc.stdout

    def ok(self, *args: str) -> bool:
        return subprocess.run([self.path, *args], env=self.env, capture_output=True, check=False).returncode == 0

    def logs(self, container: str, lines: int = 40) -> str:
        proc = subprocess.run(
            [self.path, "logs", "--tail", str(lines), container], env=self.env, capture_output=True, text=True,
            check=False, timeout=60,
        )  # fmt: skip
        return (proc.stdout + proc.stderr).strip()

    def state(self, container: str) -> dict[str, Any]:
        """The container's State, plus its RestartCount."""
        out = self.run("inspect", "--format", "{{json .State}}|{{.RestartCount}}", container, check=False)
        if not out.strip():
            return {}
        state, restarts = out.strip().rsplit("|", 1)
        return json.loads(state) | {"RestartCount": int(restarts or 0)}


def fail_with_logs(podman: Podman, container: str, what: str) -> Failed:
    state = podman.state(container)
    status = (
        f"{state.get('Status', 'missing')}, exit code {state.get('ExitCode')}, restarts {state.get('RestartCount', 0)}"
    )
    return Failed(f"{container} ({status}): {what}\n--- last log lines of {container} ---\n{podman.logs(container)}")


# --- rendering and transforming -------------------------------------------------------------------------------


def render(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR`, what `kubectl apply -k DIR` sends (as tests/unit/deploy/test_manifests.py renders)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise Failed("kubectl is missing: `make setup` installs it (scripts/install_system_packages.sh)")
    proc = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise Failed(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    return [o for o in yaml.safe_load_all(proc.stdout) if o]


def find(objects: list[dict], kind: str, name: str) -> dict:
    for o in objects:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    raise Failed(f"no {kind} {name} in the rendered manifests")


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def quantity_bytes(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if str(value).endswith(suffix):
            return int(float(str(value).removesuffix(suffix)) * factor)
    return int(value)


def cpus(value: str) -> int:
    value = str(value)
    return max(1, int(value[:-1]) // 1000) if value.endswith("m") else int(float(value))


@dataclass
class PlayedPod:
    """One pod as podman will run it: its kube YAML (kind Pod or Deployment), its pod name and address."""

    kind: str  # what it stands for: Deployment, Job, RayCluster head/worker
    source: str  # the rendered object's name
    pod: str  # podman's pod name
    ip: str
    document: dict
    labels: dict[str, str]
    volumes: list[str] = field(default_factory=list)  # podman volumes kube play creates for it (removed after)
    rendered: dict = field(default_factory=dict)  # the pod spec as rendered (ports, probes), before `adapt`

    @property
    def spec(self) -> dict:
        return (
            self.document["spec"]["template"]["spec"]
            if self.document["kind"] == "Deployment"
            else self.document["spec"]
        )

    def container(self, name: str) -> str:
        return f"{self.pod}-{name}"

    def containers(self) -> list[dict]:
        """The containers as rendered (with their ports and probes)."""
        return (self.rendered or self.spec)["containers"]


def adapt(spec: dict, pod: str) -> tuple[dict, list[str]]:
    """The pod spec with podman 4.3's quirks worked around; returns it and the podman volumes it will create."""
    spec = copy.deepcopy(spec)
    renamed: dict[str, str] = {}
    created: list[str] = []
    containers = spec.get("initContainers", []) + spec["containers"]
    # An emptyDir on /dev/shm (medium Memory, for Ray's object store) would be a disk directory with the image's
    # root-owned /dev/shm mode copied up, which uid 10001 cannot write: the pod's own /dev/shm (a tmpfs) stays.
    shm = {m["name"] for c in containers for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}
    spec["volumes"] = [v for v in spec.get("volumes", []) if v["name"] not in shm]
    for container in containers:
        container["volumeMounts"] = [m for m in container.get("volumeMounts", []) if m["name"] not in shm]
    for volume in spec["volumes"]:
        if "emptyDir" in volume:  # a named volume in podman 4.3, shared by name across pods: make it this pod's
            renamed[volume["name"]] = volume["name"] = f"{pod}-{volume['name']}"
            created.append(volume["name"])
        elif "secret" in volume:
            volume["secret"].setdefault("optional", False)  # without it podman 4.3's kube play panics
            created.append(volume["secret"]["secretName"])
        elif "configMap" in volume:
            created.append(volume["configMap"]["name"])
        else:
            raise Failed(f"pod {pod}: volume {volume['name']} ({sorted(volume)}) is not emulated here")
    for container in containers:
        # podman 4.3 publishes every containerPort on the host's wildcard address (Kubernetes only lists them):
        # that collides between pods and with the host's servers, and pods reach each other without it. The
        # probes' named ports become numbers first (podman turns an HTTP liveness probe into a healthcheck).
        named = {p["name"]: p["containerPort"] for p in container.pop("ports", []) if "name" in p}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            for action in container.get(probe, {}).values():
                if isinstance(action, dict) and isinstance(action.get("port"), str):
                    action["port"] = named[action["port"]]
        for mount in container.get("volumeMounts", []):
            mount["name"] = renamed.get(mount["name"], mount["name"])
    return spec, created


def ray_start(group: dict, container: dict, *, head: bool, head_address: str) -> list[str]:
    """The `ray start` command KubeRay generates for a group: its rayStartParams, the CPUs and memory of the
    container's limits (num-cpus from rayStartParams wins), the ports KubeRay sets, --block."""
    params = {str(k): str(v) for k, v in (group.get("rayStartParams") or {}).items()}
    limits = container.get("resources", {}).get("limits", {})
    params.setdefault("num-cpus", str(cpus(limits.get("cpu", "1"))))
    if "memory" in limits:
        params.setdefault("memory", str(quantity_bytes(limits["memory"])))
    params.setdefault("metrics-export-port", "8080")
    params.setdefault("dashboard-agent-listen-port", str(RAY_AGENT_PORT))
    command = ["ray", "start", "--head" if head else f"--address={head_address}", "--block", "--disable-usage-stats"]
    if head:
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        params.setdefault("port", str(ports.get("gcs-server", 6379)))
        params.setdefault("dashboard-port", str(ports.get("dashboard", 8265)))
        params.setdefault("ray-client-server-port", str(ports.get("client", 10001)))
    return command + [f"--{k}={v}" for k, v in sorted(params.items())]


# --- the run --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    podman: Podman
    overlay: Path
    work: Path
    ray_workers: int = 1
    timeout: float = 300.0
    e2e_timeout: float = 1200.0
    say: Callable[[str], None] = print
    pods: list[PlayedPod] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    network: str = ""
    holder: str = ""
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    timings: dict[str, float] = field(default_factory=dict)

    # -- set-up ------------------------------------------------------------------------------------------------

    def pick_subnet(self) -> ipaddress.IPv4Network:
        used = set()
        for name in self.podman.run("network", "ls", "--format", "{{.Name}}").split():
            for net in json.loads(self.podman.run("network", "inspect", name) or "[]"):
                for subnet in net.get("subnets") or []:
                    used.add(ipaddress.ip_network(subnet["subnet"]))
        routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=False).stdout
        for third in range(200, 255):
            candidate = ipaddress.ip_network(f"10.89.{third}.0/24")
            if not any(candidate.overlaps(u) for u in used) and f"10.89.{third}." not in routes:
                return candidate
        raise Failed("no free 10.89.200-254.0/24 subnet for the run's network")

    def create_network(self) -> ipaddress.IPv4Address:
        """The run's bridge network and a placeholder pod on it (the bridge, and so its gateway address, exists
        only while a container is attached: the host's servers bind to that address before any pod starts)."""
        subnet = self.pick_subnet()
        gateway = subnet.network_address + 1
        self.network = NETWORK
        self.podman.run("network", "create", "--subnet", str(subnet), "--gateway", str(gateway), self.network)
        self.holder = f"{NETWORK}-gateway"
        self.podman.run("pod", "create", "--name", self.holder, "--network", self.network, "--ip", str(gateway + 1))
        self.podman.run("pod", "start", self.holder)
        deadline = time.monotonic() + 20
        while str(gateway) not in subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout:
            if time.monotonic() > deadline:
                raise Failed(f"the network {self.network}'s bridge never got its gateway address {gateway}")
            time.sleep(0.2)
        return gateway

    def start_host_servers(self, gateway: str, objects: list[dict]) -> dict[str, str]:
        """NATS, Valkey, FalkorDB, the LLM stand-in and the issuer on the gateway address; returns fleet-config's
        replaced keys."""
        from openai_server import start_openai_server

        from services.local import infra
        from services.local.issuer import LocalIssuer

        config = find(objects, "ConfigMap", "fleet-config")["data"]

        def service_port(name: str, port_name: str) -> int:
            return next(p["port"] for p in find(objects, "Service", name)["spec"]["ports"] if p["name"] == port_name)

        data, logs = self.work / "data", self.work / "logs"
        started = time.monotonic()
        nats = infra.start_nats(
            data / "nats", logs, service_port("nats", "client"), service_port("nats", "monitor"), host=gateway
        )
        self.stack.callback(nats.stop)
        valkey = infra.start_valkey(data / "valkey", logs, service_port("valkey", "valkey"), host=gateway)
        self.stack.callback(valkey.stop)
        bolt = infra.start_falkordb(data / "falkordb", logs, bolt_port=service_port("neo4j", "bolt"), host=gateway)
        self.stack.callback(bolt.stop)
        llm = start_openai_server(
            service_port("vllm", "http"), delay_ms=20, model=config["VLLM_MODEL"], host=gateway,
            log_path=logs / "openai-server.log",
        )  # fmt: skip
        self.stack.callback(llm.stop)
        issuer = LocalIssuer(self.work / "issuer", host=gateway)
        self.stack.callback(issuer.stop)
        self.issuer = issuer
        self.timings["host servers"] = time.monotonic() - started
        self.say(
            f"host servers on {gateway}: NATS {nats.address}, Valkey {valkey.address}, Bolt {bolt.address}, "
            f"LLM {llm.url} ({config['VLLM_MODEL']}), issuer {issuer.url}"
        )
        # Neo4j's Service leads to FalkorDB here: the context service's FalkorDB dialect (services.context).
        return {"AUTH_ISSUER": issuer.url, "GRAPH_BACKEND": "falkordb"}

    def create_secrets(self, pods: list[PlayedPod]) -> dict[str, dict]:
        """The Secrets and ConfigMap of the README's "Secrets" section, from the local issuer. podman 4.3: a
        secretKeyRef reads a JSON map of base64 values, a secret volume a Secret object (with plain values)."""
        from services.common import auth

        values = {
            "neo4j-auth": {"NEO4J_USER": "falkordb", "NEO4J_PASSWORD": ""},  # FalkorDB's Bolt user
            "fleet-service-token": {"token": self.issuer.mint("fleet-service", [auth.SERVICE])},
            "fleet-admin-token": {"token": self.issuer.mint("fleet-admin", [auth.ADMIN])},
        }
        as_env, as_volume = set(), set()
        for p in pods:
            for c in p.spec.get("initContainers", []) + p.spec["containers"]:
                for var in c.get("env", []):
                    if ref := var.get("valueFrom", {}).get("secretKeyRef"):
                        as_env.add(ref["name"])
            for v in p.spec.get("volumes", []):
                if "secret" in v:
                    as_volume.add(v["secret"]["secretName"])
        if both := as_env & as_volume:
            raise Failed(f"Secrets used both as env and as a volume, which podman 4.3 cannot serve: {sorted(both)}")
        if missing := (as_env | as_volume) - set(values):
            raise Failed(f"Secrets the manifests use but this script does not create: {sorted(missing)}")
        for name in sorted(as_env | as_volume):
            if name in as_env:
                payload = {k: b64(v) for k, v in values[name].items()}
            else:
                payload = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": values[name]}
            self.podman.run("secret", "rm", name, check=False)
            self.podman.run("secret", "create", name, "-", stdin=json.dumps(payload))
            self.secrets.append(name)
        jwks = {"jwks.json": json.dumps(self.issuer.jwks())}
        return {
            "fleet-issuer-jwks": {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "fleet-issuer-jwks"},
                "data": jwks,
            }
        }

    # -- what to play ------------------------------------------------------------------------------------------

    def plan(self, objects: list[dict], e2e: list[dict], subnet_base: ipaddress.IPv4Address) -> list[PlayedPod]:
        pods: list[PlayedPod] = []
        address = iter(subnet_base + i for i in range(10, 250))

        def add(kind: str, source: str, pod: str, document: dict, labels: dict[str, str]) -> PlayedPod:
            played = PlayedPod(kind, source, pod, str(next(address)), document, labels)
            pods.append(played)
            return played

        def as_pod(name: str, template: dict) -> dict:
            meta = {"name": name, "labels": template.get("metadata", {}).get("labels", {})}
            return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": copy.deepcopy(template["spec"])}

        for job in [o for o in objects if o["kind"] == "Job"]:
            name = job["metadata"]["name"]
            add("Job", name, name, as_pod(name, job["spec"]["template"]), job["spec"]["template"]["metadata"]["labels"])

        cluster = next((o for o in objects if o["kind"] == "RayCluster"), None)
        head_service = ""
        if cluster is not None:
            name = cluster["metadata"]["name"]
            head_service = f"{name}-head-svc"
            head_address = f"{head_service}.{NAMESPACE}.svc.cluster.local:6379"
            groups = [("head", cluster["spec"]["headGroupSpec"], True, 1)]
            groups += [
                (g["groupName"], g, False, min(self.ray_workers, g.get("replicas", 1)))
                for g in cluster["spec"].get("workerGroupSpecs", [])
            ]
            for group_name, group, head, replicas in groups:
                for i in range(replicas):
                    pod = f"{name}-head" if head else f"{name}-{group_name}-worker-{i}"
                    document = as_pod(pod, group["template"])
                    container = document["spec"]["containers"][0]
                    container["command"] = ray_start(group, container, head=head, head_address=head_address)
                    labels = dict(document["metadata"]["labels"]) | {"ray.io/node-type": "head" if head else "worker"}
                    document["metadata"]["labels"] = labels
                    add("RayCluster head" if head else "RayCluster worker", name, pod, document, labels)

        for deployment in [o for o in objects if o["kind"] == "Deployment"]:
            name = deployment["metadata"]["name"]
            if name in NOT_BUILT:
                continue
            document = copy.deepcopy(deployment)
            document["spec"]["replicas"] = 1
            if document["spec"]["template"]["spec"].get("initContainers"):
                # podman 4.3 applies restartPolicy Always to init containers too: one that ended is restarted,
                # and kube play then fails removing it ("running"). OnFailure still restarts a crashed server.
                document["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
            add("Deployment", name, f"{name}-pod-0", document, deployment["spec"]["template"]["metadata"]["labels"])

        job = find(e2e, "Job", "fleet-e2e")
        add(
            "Job (e2e)",
            "fleet-e2e",
            "fleet-e2e",
            as_pod("fleet-e2e", job["spec"]["template"]),
            job["spec"]["template"]["metadata"]["labels"],
        )

        # Services -> the addresses of the pods they select (or the host's stand-in)
        aliases: dict[str, str] = {}
        for service in [o for o in objects if o["kind"] == "Service"]:
            name, selector = service["metadata"]["name"], service["spec"].get("selector", {})
            if name in HOST_STANDINS:
                aliases[name] = str(subnet_base + 1)
                continue
            matches = [p for p in pods if p.kind == "Deployment" and selector.items() <= p.labels.items()]
            if len(matches) != 1:
                raise Failed(f"Service {name}: selector {selector} matches {[p.pod for p in matches]}, not one pod")
            self.check_ports(service, matches[0])
            aliases[name] = matches[0].ip
        if head_service:
            aliases[head_service] = next(p.ip for p in pods if p.kind == "RayCluster head")
        host_aliases = [
            {
                "ip": ip,
                "hostnames": [n, f"{n}.{NAMESPACE}", f"{n}.{NAMESPACE}.svc", f"{n}.{NAMESPACE}.svc.cluster.local"],
            }
            for n, ip in sorted(aliases.items())
        ]
        for p in pods:
            p.rendered = copy.deepcopy(p.spec)
            spec, p.volumes = adapt(p.spec, p.pod)
            spec["hostAliases"] = host_aliases
            if p.document["kind"] == "Deployment":
                p.document["spec"]["template"]["spec"] = spec
            else:
                p.document["spec"] = spec
        self.aliases = aliases
        return pods

    @staticmethod
    def check_ports(service: dict, pod: PlayedPod) -> None:
        """An /etc/hosts alias keeps the port: each Service port must be the container port it targets."""
        ports = {p["name"]: p["containerPort"] for c in pod.containers() for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            target = ports.get(target, target) if isinstance(target, str) else target
            if target != port["port"]:
                raise Failed(
                    f"Service {service['metadata']['name']}: port {port['port']} -> {target} cannot be "
                    "emulated by a host alias (ports differ)"
                )

    # -- playing -----------------------------------------------------------------------------------------------

    def play(self, pod: PlayedPod, config_maps: list[dict]) -> None:
        path = self.work / f"{pod.pod}.yaml"
        path.write_text(yaml.safe_dump_all([*config_maps, pod.document], sort_keys=False))
        started = time.monotonic()
        try:
            self.podman.run(
                "kube", "play", "--network", self.network, "--ip", pod.ip, str(path), timeout=self.timeout + 900
            )
        except Failed as e:
            names = [c["name"] for c in pod.spec.get("initContainers", []) + pod.spec["containers"]]
            logs = "\n".join(
                f"--- last log lines of {pod.container(n)} ---\n{self.podman.logs(pod.container(n))}" for n in names
            )
            raise Failed(f"pod {pod.pod} ({pod.kind} {pod.source}): kube play failed: {e}\n{logs}") from None
        self.timings[f"play {pod.pod}"] = time.monotonic() - started
        self.say(f"played {pod.kind} {pod.source} as pod {pod.pod} ({pod.ip}) in {time.monotonic() - started:.0f} s")

    def wait_exit(self, pod: PlayedPod, timeout: float) -> tuple[int, str]:
        container = pod.container(pod.containers()[0]["name"])
        try:
            code = int(self.podman.run("wait", container, timeout=timeout).strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            raise fail_with_logs(self.podman, container, f"still running after {timeout:.0f} s") from None
        return code, self.podman.logs(container, 400)

    def ready(self, pod: PlayedPod) -> Callable[[], bool]:
        """The readiness probe of the pod's first container (gRPC health or HTTP GET), run from the host against
        the pod's address as the kubelet would; for a Ray head, KubeRay's probes (raylet and GCS health)."""
        import grpc
        import httpx
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        container = pod.containers()[0]
        if pod.kind.startswith("RayCluster"):  # KubeRay's probes, run inside the pod with the image's wget
            urls = [f"http://localhost:{RAY_AGENT_PORT}/api/local_raylet_healthz"]
            if pod.kind == "RayCluster head":
                urls.append("http://localhost:8265/api/gcs_healthz")
            name = pod.container(container["name"])
            return lambda: all(
                "success" in self.podman.run("exec", name, "wget", "-T", "2", "-q", "-O-", u, check=False) for u in urls
            )
        probe = container["readinessProbe"]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        if "grpc" in probe:
            port = probe["grpc"]["port"]

            def serving() -> bool:
                with grpc.insecure_channel(f"{pod.ip}:{ports.get(port, port)}") as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            return serving
        if "httpGet" in probe:
            port = probe["httpGet"]["port"]
            url = f"http://{pod.ip}:{ports.get(port, port)}{probe['httpGet']['path']}"
            return lambda: httpx.get(url, timeout=2).status_code == 200
        raise Failed(f"pod {pod.pod}: readiness probe {sorted(probe)} is not emulated here")

    def wait_ready(self, pods: list[PlayedPod]) -> None:
        checks = {p.pod: self.ready(p) for p in pods}
        pending = {p.pod: p for p in pods}
        last: dict[str, object] = {}
        deadline = time.monotonic() + self.timeout
        started = time.monotonic()
        while pending:
            for name, pod in list(pending.items()):
                container = pod.container(pod.containers()[0]["name"])
                state = self.podman.state(container)
                if state.get("Status") != "running" or state.get("RestartCount", 0):
                    raise fail_with_logs(self.podman, container, "stopped or restarted before it was ready")
                try:
                    last[name] = checks[name]()
                except Exception as e:  # not yet
                    last[name] = e
                if last[name] is True:
                    del pending[name]
                    self.say(f"ready: {name} ({time.monotonic() - started:.0f} s)")
            if pending and time.monotonic() > deadline:
                pod = next(iter(pending.values()))
                raise fail_with_logs(
                    self.podman, pod.container(pod.containers()[0]["name"]),
                    f"not ready within {self.timeout:.0f} s (last probe: {last.get(pod.pod)!r}); also pending: {sorted(pending)}",
                )  # fmt: skip
            time.sleep(1)

    HARDENING = (
        "import os\n"
        "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
        "root = [l.split()[3].split(',') for l in open('/proc/self/mounts') if l.split()[1] == '/'][-1]\n"
        "print(os.getuid(), os.getgid(), int(status['CapBnd'].strip(), 16), status['NoNewPrivs'].strip(),"
        " 'ro' if 'ro' in root else 'rw')\n"
    )

    def check_security(self, pod: PlayedPod) -> str:
        """Inside the running container: the manifest's uid/gid, no capabilities, NoNewPrivs, the root filesystem's
        mode; and the memory limit podman gave it."""
        container = pod.containers()[0]
        name = pod.container(container["name"])
        context, own = pod.spec.get("securityContext", {}), container.get("securityContext", {})
        out = self.podman.run("exec", name, "python3", "-c", self.HARDENING, check=False).split()
        want = [str(context.get("runAsUser")), str(context.get("runAsGroup")), "0", "1",
                "ro" if own.get("readOnlyRootFilesystem") else "rw"]  # fmt: skip
        if out != want:
            raise fail_with_logs(self.podman, name, f"(uid, gid, CapBnd, NoNewPrivs, root) = {out}, manifest: {want}")
        inspected = self.podman.run(
            "inspect", "--format", "{{.HostConfig.Memory}} {{.HostConfig.CpuQuota}} {{.HostConfig.CpuPeriod}}", name
        ).split()
        memory, quota, period = (int(v or 0) for v in inspected)
        limits = container.get("resources", {}).get("limits", {})
        if "memory" in limits and memory != quantity_bytes(limits["memory"]):
            raise Failed(f"{name}: memory limit {memory} bytes in podman, {limits['memory']} in the manifest")
        cpu = f"{quota / period:g} CPUs" if quota > 0 and period > 0 else "no CPU limit"
        return (
            f"{name}: uid {out[0]} gid {out[1]}, no capabilities, no new privileges, root {out[4]}; "
            f"podman limits: memory {limits.get('memory')}, {cpu} (manifest: {limits.get('cpu')})"
        )

    # -- the whole sequence ------------------------------------------------------------------------------------

    def remove_leftovers(self, pods: list[PlayedPod]) -> None:
        """What an earlier run that did not finish left (same names): its pods, and its volumes, which kube play
        would otherwise reuse with their old content (the issuer's keys of then, for one)."""
        for name in [*(p.pod for p in pods), f"{NETWORK}-gateway"]:
            if self.podman.ok("pod", "exists", name):
                self.say(f"removing pod {name} left by an earlier run")
                self.podman.run("pod", "rm", "-f", "-t", "2", name, check=False)
        for volume in sorted({v for p in pods for v in p.volumes}):
            if self.podman.ok("volume", "exists", volume):
                self.say(f"removing volume {volume} left by an earlier run")
                self.podman.run("volume", "rm", "-f", volume, check=False)
        if self.podman.ok("network", "exists", NETWORK):
            self.podman.run("network", "rm", "-f", NETWORK, check=False)

    def teardown(self) -> None:
        started = time.monotonic()
        names = [p.pod for p in reversed(self.pods)] + ([self.holder] if self.holder else [])
        if names:  # by name, all in one call (stopped in parallel); a pod never played is ignored
            self.podman.run("pod", "rm", "-f", "--ignore", "-t", "5", *names, check=False, timeout=300)
        for volume in sorted({v for p in self.pods for v in p.volumes}):
            self.podman.run("volume", "rm", "-f", volume, check=False)
        for secret in self.secrets:
            self.podman.run("secret", "rm", secret, check=False)
        if self.network:
            self.podman.run("network", "rm", "-f", self.network, check=False)
        self.stack.close()
        self.say(f"removed: {len(self.pods)} pods, their volumes and secrets, the network, the host servers "
                 f"({time.monotonic() - started:.0f} s)")  # fmt: skip

    def execute(self) -> tuple[int, str]:
        """Everything up to the e2e pod's result: (pytest's exit code, its output)."""
        objects = render(self.overlay)
        e2e = render(ROOT / "deploy" / "k8s" / "e2e")
        self.explain(objects)
        # The plan first (it names the pods), with a stand-in base address; re-made on the real network below.
        self.remove_leftovers(self.plan(objects, e2e, ipaddress.ip_address("10.89.0.0")))
        gateway = self.create_network()
        replaced = self.start_host_servers(str(gateway), objects)
        self.pods = self.plan(objects, e2e, gateway - 1)
        config = copy.deepcopy(find(objects, "ConfigMap", "fleet-config"))
        config["data"].update(replaced)
        self.say("fleet-config changed: " + ", ".join(f"{k}={v}" for k, v in replaced.items()))
        extra = self.create_secrets(self.pods)
        config_maps = [config, *extra.values()]
        for name, ip in sorted(self.aliases.items()):
            self.say(f"  Service {name} -> {ip}")
        by_kind = lambda kind: [p for p in self.pods if p.kind == kind]  # noqa: E731

        [streams] = [p for p in by_kind("Job") if p.source == "nats-init-streams"]
        self.play(streams, config_maps)
        code, out = self.wait_exit(streams, self.timeout)
        if code != 0:
            raise fail_with_logs(
                self.podman, streams.container("streams-init"), f"Job nats-init-streams failed: exit {code}"
            )
        self.say(f"Job nats-init-streams completed (exit 0, {len(out.splitlines())} lines of output)")

        ray = by_kind("RayCluster head") + by_kind("RayCluster worker")
        for pod in ray[:1]:
            self.play(pod, config_maps)
        self.wait_ready(ray[:1])
        for pod in ray[1:]:
            self.play(pod, config_maps)
        deployments = by_kind("Deployment")
        order = ["sandbox", "context", "orchestrator", "ray-executor", "monitoring"]
        for pod in sorted(deployments, key=lambda p: order.index(p.source) if p.source in order else len(order)):
            self.play(pod, config_maps)
        self.wait_ready(ray[1:] + deployments)
        for pod in ray + deployments:
            self.say("  " + self.check_security(pod))

        [councils] = [p for p in by_kind("Job") if p.source == "orchestrator-init-councils"]
        self.play(councils, config_maps)
        code, out = self.wait_exit(councils, self.timeout)
        if code != 0:
            raise fail_with_logs(
                self.podman, councils.container("councils-init"), f"Job orchestrator-init-councils failed: exit {code}"
            )
        self.say(f"Job orchestrator-init-councils completed (exit 0, {len(out.splitlines())} lines of output)")

        [e2e_pod] = by_kind("Job (e2e)")
        started = time.monotonic()
        self.play(e2e_pod, config_maps)
        code, out = self.wait_exit(e2e_pod, self.e2e_timeout)
        self.timings["e2e"] = time.monotonic() - started
        return code, out

    def explain(self, objects: list[dict]) -> None:
        kinds: dict[str, list[str]] = {}
        for o in objects:
            kinds.setdefault(o["kind"], []).append(o["metadata"]["name"])
        self.say(f"rendered {self.overlay.relative_to(ROOT)}: " + ", ".join(f"{k} {len(v)}" for k, v in kinds.items()))
        for kind, names in kinds.items():
            if kind in NOT_PLAYED:
                self.say(f"  {kind} ({', '.join(names)}): {NOT_PLAYED[kind]}")
        for name, why in NOT_BUILT.items():
            self.say(f"  Deployment {name}: not played, {why}")
        self.say("  Deployments: played by `podman kube play` with replicas 1 (one address per Service)")


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overlay", type=Path, default=ROOT / "deploy" / "k8s" / "overlays" / "cpu")
    parser.add_argument("--ray-workers", type=int, default=1, help="Ray worker pods (the manifest has 2)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for each pod to become ready / Job to end")
    parser.add_argument("--e2e-timeout", type=float, default=1200)
    parser.add_argument("--keep", action="store_true", help="keep everything up until Ctrl-C, to look at it")
    args = parser.parse_args(argv)
    started = time.monotonic()
    for signum in (signal.SIGTERM, signal.SIGINT):  # torn down on either (SIGINT is ignored in background jobs)
        signal.signal(signum, interrupt)
    LOCK.touch()
    with open(LOCK) as lock, tempfile.TemporaryDirectory(prefix="kube-play-") as work:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"another kube play run holds {LOCK}: its pods, secrets and network have the same names",
                file=sys.stderr,
            )
            return 2
        run = Run(Podman(), args.overlay.resolve(), Path(work), args.ray_workers, args.timeout, args.e2e_timeout)
        code, out = 1, ""
        try:
            code, out = run.execute()
        except Failed as e:
            print(f"FAILED: {e}", file=sys.stderr, flush=True)
            code = 1
        finally:
            if out:
                print("--- the e2e pod's output (last lines) ---\n" + "\n".join(out.splitlines()[-60:]), flush=True)
            if args.keep:
                print(
                    "--keep: everything stays up until Ctrl-C; pods: " + " ".join(p.pod for p in run.pods), flush=True
                )
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(3600)
            run.teardown()
    verdict = "PASSED" if code == 0 else "FAILED"
    print(f"kube play of {args.overlay}: e2e {verdict} (exit {code}) in {time.monotonic() - started:.0f} s", flush=True)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

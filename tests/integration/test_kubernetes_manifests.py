"""The Kubernetes manifests in ``deploy/kubernetes`` render, validate, and agree with
the code they run.

Each kustomization is rendered with ``kubectl kustomize`` (Debian's kubernetes-client,
whose kustomize is the old 2.0.3, or any newer kubectl; ``CORRAL_KUBECTL`` names
another binary) and every object Kubernetes itself defines is validated, strictly (an
unknown or misspelt field fails), with ``kubernetes-validate`` against
:data:`KUBERNETES_VERSION`. Custom resources (KEDA's ScaledObject, cert-manager's
Certificate and Issuer) have no schema there: their essential fields are checked by
hand.

Beyond the schema, the tests catch what a cluster would only show at run time: every
``corral`` command line parses with corral's own parser and gives valid settings with
its container's ``CORRAL_*`` environment; the agent pod's one container is a
``corral agent --model`` whose llama-server (its command line made by corral's own
:class:`~corral.supervisor.managed.ManagedInstance`) listens on the pod, on the one
port ``CORRAL_PORT_RANGE`` allows, which the container port, probes, Service and
NetworkPolicy name, and is reported at the downward API's pod IP; the init container's
script really links the model under the name clients ask for; probes ask paths the
servers serve; Services and NetworkPolicies select the pods they mean; agents dial the
headless Service and check the certificate against a name it holds; token and
certificate files exist where the flags say; and the autoscalers scale the agent
StatefulSet on the metric corral exports, for the model the agents serve.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import trustme
import yaml

from corral.agent import balancer_socket_url
from corral.cli import build_parser
from corral.cli.launch import _agent_overrides, _balancer_overrides, _llama_args, owned_options
from corral.config import ENV_PREFIX, Settings, load_settings
from corral.control.probes import PROBE_PATHS
from corral.supervisor.managed import ManagedInstance, check_reserved
from corral.tokens import is_loopback
from tests.metrics_docs import documented_metrics

#: The Kubernetes version the manifests are validated against: the oldest we support.
KUBERNETES_VERSION = "1.31"

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"

#: Every kustomization under deploy/kubernetes (a test checks none is missing).
KUSTOMIZATIONS = [
    "base",
    "overlays/gpu",
    "overlays/tls",
    "overlays/mtls",
    "secrets",
    "cert-manager",
    "autoscaling/keda",
    "autoscaling/hpa",
]
#: Those that run corral: the base and its overlays.
WORKLOADS = ["base", "overlays/gpu", "overlays/tls", "overlays/mtls"]
#: Those with TLS on the balancers (mtls builds on tls).
TLS_WORKLOADS = ("overlays/tls", "overlays/mtls")

#: API groups of custom resources, checked by hand instead of by schema.
CUSTOM_GROUPS = ("keda.sh/", "cert-manager.io/")

NAMESPACE = "corral"
OPERATOR_LABEL = {"corral.dev/operator": "true"}

#: What the token files in deploy/kubernetes/secrets hold for a render (placeholders).
SECRET_FILES = {"management-token": "management-placeholder", "cluster-token": "agent-placeholder"}

#: The keys cert-manager writes into a Certificate's Secret (and the tls overlays mount).
TLS_SECRET_KEYS = {"tls.crt", "tls.key", "ca.crt"}

#: Stand-ins for the downward API when expanding $(VAR) in arguments.
FIELD_VALUES = {"status.podIP": "10.1.2.3", "metadata.name": "corral-agent-0"}

#: Pod addresses a lookup of the headless Service corral-balancers gives (two balancers).
BALANCER_POD_IPS = ["10.1.0.11", "10.1.0.12"]

#: Seconds the agent gives its links to deregister on the way out (``Agent.run``).
DEREGISTER_S = 2.0

Obj = dict[str, Any]


# -- rendering ---------------------------------------------------------------------------


def kubectl() -> str:
    found = os.environ.get("CORRAL_KUBECTL") or shutil.which("kubectl")
    if not found:
        pytest.fail(
            "kubectl is missing: run scripts/install-kubectl (Debian's kubernetes-client, "
            "installed as root or through sudo), or set CORRAL_KUBECTL to a kubectl binary"
        )
    return found


def kustomize(directory: Path) -> list[Obj]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{done.stderr}")
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


@functools.cache
def rendered(name: str) -> tuple[Obj, ...]:
    """The objects of one kustomization, rendered once per run. The secrets one reads
    files nobody commits: it is rendered from a copy of its kustomization.yaml alone
    (never the real tokens someone wrote beside it) with placeholders written in."""
    if name != "secrets":
        return tuple(kustomize(DEPLOY / name))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp)
        shutil.copy(DEPLOY / "secrets" / "kustomization.yaml", copy)
        for file, text in SECRET_FILES.items():
            (copy / file).write_text(text)
        return tuple(kustomize(copy))


def only(objs: tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def container(workload: Obj, name: str) -> Obj:
    spec = pod_spec(workload)
    found = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']} has no container {name}"
    return found[0]


def all_containers(objs: tuple[Obj, ...]) -> Iterator[tuple[Obj, Obj]]:
    for obj in objs:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            spec = pod_spec(obj)
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield obj, c


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def env_value(c: Obj, name: str) -> str:
    for var in c.get("env", []):
        if var["name"] == name:
            if "value" in var:
                return str(var["value"])
            ref = var["valueFrom"]
            if "fieldRef" in ref:
                return FIELD_VALUES[ref["fieldRef"]["fieldPath"]]
            if "resourceFieldRef" in ref:
                return "1"
            return "from-a-secret"
    raise KeyError(name)


def expanded(c: Obj, words: list[str]) -> list[str]:
    """``words`` with ``$(VAR)`` replaced as the kubelet does it, from the container's
    own environment. A reference to a variable the container does not define would be
    passed on verbatim by the kubelet: that is a mistake here."""

    def one(match: re.Match[str]) -> str:
        try:
            return env_value(c, match.group(1))
        except KeyError:
            pytest.fail(f"container {c['name']}: $({match.group(1)}) is not in its env")

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, w) for w in words]


def corral_args(c: Obj) -> argparse.Namespace:
    """A corral container's command line, parsed by corral's own parser: a flag it does
    not know (or a bad value) fails here as it would fail in the pod."""
    assert c.get("command") == ["corral"], f"container {c['name']} does not run corral"
    args = expanded(c, c["args"])
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"container {c['name']}: `corral {' '.join(args)}`:\n{errors.getvalue()}")


def runs(workload: Obj, command: str) -> list[Obj]:
    """The containers of ``workload`` that run ``corral COMMAND``."""
    return [
        c
        for c in pod_spec(workload)["containers"]
        if c.get("command") == ["corral"] and c["args"][:1] == [command]
    ]


def corral_environ(c: Obj) -> dict[str, str]:
    """The container's ``CORRAL_*`` variables: settings, as corral reads them."""
    names = [var["name"] for var in c.get("env", [])]
    return {name: env_value(c, name) for name in names if name.startswith(ENV_PREFIX)}


def corral_settings(c: Obj, ns: argparse.Namespace) -> Settings:
    """The settings the container's corral runs with: its flags over its environment,
    merged and validated by corral's own code (a flag that needs another, such as
    --tls-client-ca without --tls-cert, fails here as it fails in the pod)."""
    overrides = {"balancer": _balancer_overrides, "agent": _agent_overrides}[ns.command]
    try:
        return load_settings(environ=corral_environ(c), overrides=overrides(ns))
    except Exception as exc:  # ConfigError or a validator's ValueError
        pytest.fail(f"container {c['name']}: corral refuses its settings: {exc}")


def the_balancer(objs: tuple[Obj, ...]) -> tuple[Obj, Obj, Settings]:
    """The balancer Deployment, its corral container, and its settings."""
    deployment = only(objs, "Deployment")
    (c,) = runs(deployment, "balancer")
    return deployment, c, corral_settings(c, corral_args(c))


def the_agent(objs: tuple[Obj, ...]) -> tuple[Obj, Obj, argparse.Namespace, Settings]:
    """The agent StatefulSet, its corral container, its parsed flags and its settings."""
    statefulset = only(objs, "StatefulSet")
    (c,) = runs(statefulset, "agent")
    ns = corral_args(c)
    return statefulset, c, ns, corral_settings(c, ns)


def agent_instance(objs: tuple[Obj, ...]) -> tuple[Obj, Obj, Settings, ManagedInstance]:
    """The agent container and the llama-server it starts, built as ``corral agent
    --model`` builds it (``_agent_owning``): the port leased from ``port_range``, its
    host, its external URL, its arguments after ``--``. Nothing is started: the
    instance's command line, health URL and reported URLs are what the tests read."""
    statefulset, c, ns, settings = the_agent(objs)
    assert ns.model, "the agent must start and own its llama-server (--model)"
    assert ns.llama_server, "the agent must name the image's llama-server (--llama-server)"
    port = pinned_port(settings)  # lease_port takes the first free port of the range
    settings.agent_name = FIELD_VALUES["metadata.name"]
    if settings.llama_server_tls:  # the pod's pair is a Secret there: one made here
        issued = trustme.CA().issue_cert("corral-agents")
        folder = Path(tempfile.mkdtemp(prefix="agent-tls-"))
        settings.tls_cert, settings.tls_key = folder / "tls.crt", folder / "tls.key"
        issued.cert_chain_pems[0].write_to_path(str(settings.tls_cert))
        issued.private_key_pem.write_to_path(str(settings.tls_key))
    model = Path(ns.model)
    instance = ManagedInstance(
        owned_options(  # what corral agent --model itself runs
            settings,
            binary=Path(ns.llama_server),
            model=model,
            model_id=model.stem,
            aliases=[],
            llama_args=_llama_args(ns.llama_args),
            port=port,
            cluster_token="x",
        )
    )
    return statefulset, c, settings, instance


def container_port(c: Obj, port: int | str) -> int:
    """A probe's or Service's port (a number or a port name) as the container's number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert port in named, f"container {c['name']} has no port named {port!r}"
    return int(named[port])


def flag_value(words: list[str], flag: str) -> str:
    assert flag in words, f"{flag} is missing from {words}"
    return words[words.index(flag) + 1]


def agent_flags() -> set[str]:
    """Every option string ``corral agent`` takes."""
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {flag for action in commands.choices["agent"]._actions for flag in action.option_strings}


def corral_words(c: Obj) -> list[str]:
    """A corral container's own arguments: those before a ``--`` (after it, an agent's
    are llama-server's)."""
    args: list[str] = c["args"]
    return args[: args.index("--")] if "--" in args else args


def pinned_port(settings: Settings) -> int:
    """The one port an agent's llama-server may lease (``port_range``)."""
    ports = settings.ports()
    assert len(ports) == 1, (
        f"port_range {settings.port_range}: pin one port (CORRAL_PORT_RANGE=P-P), so the "
        "container port, probes, Service and NetworkPolicy know it before it is leased"
    )
    return ports[0]


def probe_budget(probe: Obj) -> int:
    """Seconds of failures before the kubelet acts on a probe."""
    return int(probe.get("periodSeconds", 10)) * int(probe.get("failureThreshold", 3))


def secret_files(spec: Obj, c: Obj, secret_keys: dict[str, set[str]]) -> dict[str, str]:
    """Files the container sees from Secret volumes: path -> ``SECRET/KEY``."""
    files: dict[str, str] = {}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in c.get("volumeMounts", []):
        secret = volumes.get(mount["name"], {}).get("secret")  # none: a volume claim
        if secret is None:
            continue
        items = secret.get("items") or [
            {"key": k, "path": k} for k in secret_keys[secret["secretName"]]
        ]
        for item in items:
            files[f"{mount['mountPath']}/{item['path']}"] = f"{secret['secretName']}/{item['key']}"
    return files


def generated_secret_keys() -> dict[str, set[str]]:
    """Secret name -> its keys, as deploy/kubernetes/secrets and cert-manager make them."""
    tokens = only(rendered("secrets"), "Secret")
    keys = {tokens["metadata"]["name"]: set(tokens["data"])}
    for certificate in rendered("cert-manager"):
        if certificate["kind"] == "Certificate":
            keys[certificate["spec"]["secretName"]] = TLS_SECRET_KEYS
    return keys


def model_name(objs: tuple[Obj, ...]) -> str:
    """The model name the agents report (clients ask for it; metrics label it)."""
    return agent_instance(objs)[3].model_id


# -- render and validate ---------------------------------------------------------------


def test_every_kustomization_under_deploy_is_tested() -> None:
    found = sorted(str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml"))
    assert found == sorted(KUSTOMIZATIONS)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomization_renders_and_validates_against_kubernetes(name: str) -> None:
    objs = rendered(name)
    assert objs, f"{name} renders nothing"
    for obj in objs:
        what = f"{name}: {obj['kind']} {obj['metadata'].get('name')}"
        assert obj["metadata"].get("namespace") == NAMESPACE, f"{what} is not in {NAMESPACE}"
        if obj["apiVersion"].startswith(CUSTOM_GROUPS):
            continue  # no schema in kubernetes-validate; checked by hand below
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{what} is not valid Kubernetes {KUBERNETES_VERSION}: {exc}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{what}: no schema ({exc}); a custom resource needs hand checks")


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_corral_command_line_parses_with_corrals_parser(name: str) -> None:
    commands = []
    for _, c in all_containers(rendered(name)):
        expanded(c, c.get("command", []) + c.get("args", []))  # every $(VAR) is defined
        if c.get("command") == ["corral"]:
            ns = corral_args(c)
            corral_settings(c, ns)  # flags and CORRAL_* environment, validated together
            commands.append(ns.command)
    assert sorted(commands) == ["agent", "balancer"]


@pytest.mark.parametrize("name", WORKLOADS)
def test_containers_run_as_non_root_on_a_read_only_root(name: str) -> None:
    for workload, c in all_containers(rendered(name)):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec.get("automountServiceAccountToken") is False
        context = c["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, c["name"]
        assert context["allowPrivilegeEscalation"] is False, c["name"]
        assert context["capabilities"]["drop"] == ["ALL"], c["name"]


# -- balancers -----------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKLOADS)
def test_balancer_probes_ask_the_probe_routes_on_the_management_port(name: str) -> None:
    _, c, settings = the_balancer(rendered(name))
    _, management_port = settings.management_host_port()
    probes = {"readinessProbe": "/readyz", "livenessProbe": "/livez"}
    assert set(probes.values()) <= PROBE_PATHS
    scheme = "HTTPS" if settings.tls_cert is not None else "HTTP"
    assert (scheme == "HTTPS") == (name in TLS_WORKLOADS)
    for probe, path in probes.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert container_port(c, get["port"]) == management_port, probe
        assert get.get("scheme", "HTTP") == scheme, probe


@pytest.mark.parametrize("name", WORKLOADS)
def test_balancer_listens_beyond_loopback_on_the_ports_it_declares(name: str) -> None:
    _, c, settings = the_balancer(rendered(name))
    for (host, port), port_name in (
        (settings.inference_host_port(), "inference"),
        (settings.management_host_port(), "management"),
    ):
        assert host == "0.0.0.0", f"{port_name} listens on {host}: other pods cannot reach it"
        assert container_port(c, port_name) == port


def test_balancers_are_two_spread_over_nodes_and_never_all_disrupted() -> None:
    objs = rendered("base")
    deployment, _, _ = the_balancer(objs)
    labels = pod_labels(deployment)
    assert deployment["spec"]["replicas"] == 2
    spread = pod_spec(deployment)["topologySpreadConstraints"]
    by_host = [s for s in spread if s["topologyKey"] == "kubernetes.io/hostname"]
    assert by_host and by_host[0]["whenUnsatisfiable"] == "DoNotSchedule"
    assert selects(by_host[0]["labelSelector"]["matchLabels"], labels)
    budget = only(objs, "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert selects(budget["spec"]["selector"]["matchLabels"], labels)


def test_balancer_gets_longer_to_stop_than_its_shutdown_timeout() -> None:
    deployment, c, settings = the_balancer(rendered("base"))
    pause = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    needed = settings.shutdown_timeout + float(pause[1])
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > needed


@pytest.mark.parametrize("name", WORKLOADS)
def test_services_select_the_balancers_and_target_the_ports_they_listen_on(name: str) -> None:
    objs = rendered(name)
    deployment, c, settings = the_balancer(objs)
    labels = pod_labels(deployment)
    wanted = {
        "corral": settings.inference_host_port()[1],
        "corral-management": settings.management_host_port()[1],
        "corral-balancers": settings.management_host_port()[1],
    }
    for service_name, port in wanted.items():
        spec = only(objs, "Service", service_name)["spec"]
        assert selects(spec["selector"], labels), service_name
        (service_port,) = spec["ports"]
        assert container_port(c, service_port["targetPort"]) == port, service_name
    assert only(objs, "Service", "corral-balancers")["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("name", WORKLOADS)
def test_agents_dial_every_balancer_through_the_headless_service(name: str) -> None:
    objs = rendered(name)
    _, _, settings = the_balancer(objs)
    _, _, _, agent = the_agent(objs)
    headless = only(objs, "Service", "corral-balancers")
    (address,) = agent.balancers
    url = urlsplit(balancer_socket_url(address))
    assert url.hostname == headless["metadata"]["name"]
    # a headless Service's A records are the pods themselves: the port is the pod's
    assert url.port == settings.management_host_port()[1] == headless["spec"]["ports"][0]["port"]
    assert url.scheme == ("wss" if name in TLS_WORKLOADS else "ws")


# -- agents ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKLOADS)
def test_agent_pod_is_one_corral_agent_that_owns_its_llama_server(name: str) -> None:
    statefulset, c, ns, settings = the_agent(rendered(name))
    assert [x["name"] for x in pod_spec(statefulset)["containers"]] == [c["name"]]
    # cmd_agent refuses an agent that both watches a server and starts one
    assert ns.model and not settings.local_llama_server
    # only corral runs llama-server: no container starts the binary itself
    for _, other in all_containers(rendered(name)):
        assert not other.get("command", [""])[0].endswith("llama-server"), other["name"]
    # corral's own flags, before `--`: after it they would go to llama-server
    llama_args = _llama_args(ns.llama_args)
    assert c["args"].index("--") == len(c["args"]) - len(llama_args) - 1
    misplaced = agent_flags() & set(llama_args)
    assert not misplaced, f"corral flags after `--` go to llama-server: {misplaced}"
    check_reserved(llama_args)  # corral sets --model, --alias, --host and --port itself


@pytest.mark.parametrize("name", WORKLOADS)
def test_agent_reports_a_llama_server_the_balancers_can_reach(name: str) -> None:
    _, c, settings, instance = agent_instance(rendered(name))
    port = pinned_port(settings)
    assert container_port(c, "llama-server") == port
    # llama-server, as corral starts it, listens on the pod on that port
    server = instance.supervisor.args
    assert server[0] == flag_value(corral_words(c), "--llama-server")
    assert not is_loopback(flag_value(server, "--host")), "other pods could not reach it"
    assert int(flag_value(server, "--port")) == port
    # over https when the overlay says so (CORRAL_LLAMA_SERVER_TLS, with the pod's pair)
    scheme = "https" if settings.llama_server_tls else "http"
    assert ("--ssl-cert-file" in server) == settings.llama_server_tls
    # the agent reads it on loopback, and reports it at the pod's IP, the downward API's
    assert instance.agent.local_url == f"{scheme}://127.0.0.1:{port}"
    # without a port: the URL gets the one llama-server leased (or it moves with it)
    external = flag_value(corral_words(c), "--external-llama-server")
    assert urlsplit(external).netloc == "$(POD_IP)"
    pod_ip = next(v for v in c["env"] if v["name"] == "POD_IP")
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    reported = urlsplit(instance.agent.url)
    assert (reported.scheme, reported.hostname, reported.port) == (
        scheme,
        FIELD_VALUES["status.podIP"],
        port,
    )
    # the probes read the /health corral itself waits for, on that port
    health = urlsplit(instance.supervisor.health_url)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert container_port(c, get["port"]) == health.port == port, probe
        assert get["path"] == health.path == "/health", probe
        assert get.get("scheme", "HTTP") == scheme.upper(), probe


def test_agent_probes_and_grace_leave_restarts_and_shutdown_to_corral() -> None:
    statefulset, c, _, settings = the_agent(rendered("base"))
    # the kubelet must not kill a first load that corral still waits for
    assert probe_budget(c["startupProbe"]) > settings.startup_timeout
    # nor a llama-server corral is restarting: a backoff, then a whole new load
    liveness = c["livenessProbe"]
    assert probe_budget(liveness) > settings.restart_backoff_max + settings.startup_timeout
    assert liveness.get("timeoutSeconds", 1) >= 5, "1 s fails on a loaded node: a restart"
    # on SIGTERM: deregister, let the requests it was sent finish (drain_timeout), then
    # SIGTERM llama-server and SIGKILL after stop_grace
    grace = pod_spec(statefulset)["terminationGracePeriodSeconds"]
    assert grace > DEREGISTER_S + settings.drain_timeout + settings.stop_grace
    # a preStop hook would run while the agent is still registered: balancers keep
    # sending requests, so waiting there drains nothing, it only delays the shutdown
    assert "lifecycle" not in c


def run_fetch_model(
    fetch: Obj, root: Path, model_name: str, present: bool
) -> subprocess.CompletedProcess[str]:
    """Run the init container's script with its mounts under ``root`` (the same paths
    below it) and a fake ``hf`` that "downloads" by writing the file."""
    mounts = sorted((m["mountPath"] for m in fetch["volumeMounts"]), key=len, reverse=True)
    for mount in mounts:
        (root / mount.lstrip("/")).mkdir(parents=True, exist_ok=True)
    script = re.sub(
        "|".join(re.escape(m) for m in mounts),
        lambda match: str(root / match.group(0).lstrip("/")),
        fetch["args"][0],
    )
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    hf = bin_dir / "hf"
    hf.write_text('#!/bin/sh\n[ "$1 $4" = "download --local-dir" ] && echo gguf > "$5/$3"\n')
    hf.chmod(0o755)
    env = {var["name"]: env_value(fetch, var["name"]) for var in fetch["env"]}
    env |= {"MODEL_NAME": model_name, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    if present:
        models = next(m["mountPath"] for m in fetch["volumeMounts"] if m["name"] == "models")
        (root / models.lstrip("/") / env["MODEL_FILE"]).write_text("gguf")
        hf.write_text("#!/bin/sh\nexit 1\n")  # a model on the volume is never fetched again
    return subprocess.run(
        [*fetch["command"], script], env=env, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize("name", WORKLOADS)
def test_agent_loads_the_model_the_init_container_fetches_by_its_name(name: str) -> None:
    objs = rendered(name)
    statefulset, c, _, instance = agent_instance(objs)
    fetch = container(statefulset, "fetch-model")
    assert env_value(c, "MODEL_NAME") == env_value(fetch, "MODEL_NAME")
    # the name clients ask for is the model file's stem: MODEL_NAME, through the link
    assert instance.model_id == env_value(fetch, "MODEL_NAME")
    assert flag_value(instance.supervisor.args, "--alias") == instance.model_id
    agent_mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    fetch_mounts = {m["name"]: m["mountPath"] for m in fetch["volumeMounts"]}
    # the link and its target are where the agent sees them too
    for volume in ("models", "model-link"):
        assert agent_mounts[volume] == fetch_mounts[volume], volume
    model = Path(flag_value(expanded(c, c["args"]), "--model"))
    for present in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            done = run_fetch_model(fetch, root, instance.model_id, present)
            assert done.returncode == 0, done.stdout + done.stderr
            link = root / str(model).lstrip("/")
            assert link.is_file(), f"the agent's --model {model} is not what fetch-model made"
            models = root / fetch_mounts["models"].lstrip("/")
            assert link.resolve() == (models / env_value(fetch, "MODEL_FILE")).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        done = run_fetch_model(fetch, Path(tmp), "org/model", present=True)
        assert done.returncode != 0, "a MODEL_NAME with a slash names no file"
    volumes = {v["name"]: v for v in pod_spec(statefulset)["volumes"]}
    assert "emptyDir" in volumes["model-link"], "the link is made anew in each pod"
    claims = [t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]]
    assert claims == ["models"]
    assert "replicas" not in statefulset["spec"], "an autoscaler or kubectl scale owns it"


def test_pods_run_the_binary_and_user_the_dockerfiles_final_stage_makes() -> None:
    build, final = re.split(r"^FROM ", (ROOT / "Dockerfile").read_text(), flags=re.M)[1:]
    assert "corral llama-server install" in build
    assert "g++" not in final, "the final image must have no compiler"
    for stage in (build, final):
        # corral finds a build with extra CMake options only where the variable is set
        assert "ARG LLAMA_CMAKE_ARGS\n" in stage
        assert 'CORRAL_LLAMA_SERVER_CMAKE_ARGS="$LLAMA_CMAKE_ARGS"' in stage
        assert "CORRAL_CACHE_DIR=/opt/corral/cache" in stage
    assert "COPY --from=build /opt/corral/cache/llama-server " in final
    link = re.search(r'ln -s "\$\(dirname "\$bin"\)" (\S+)', final)
    assert link, "the final stage no longer links llama-server's folder to a fixed path"
    user = re.search(r"^USER (\d+):(\d+)$", final, re.M)
    assert user, "the image must run as a numeric non-root user"
    for name in WORKLOADS:
        for workload, _ in all_containers(rendered(name)):
            context = pod_spec(workload)["securityContext"]
            assert (str(context["runAsUser"]), str(context["runAsGroup"])) == user.groups()
        _, c, _, instance = agent_instance(rendered(name))
        assert instance.supervisor.args[0] == link.group(1) + "/llama-server"
        # corral adds --path to the web UI beside the binary; one given would win
        assert "--path" not in _llama_args(corral_args(c).llama_args)


def test_gpu_overlay_puts_one_agent_with_one_gpu_on_each_gpu_node() -> None:
    statefulset, c, _, instance = agent_instance(rendered("overlays/gpu"))
    spec = pod_spec(statefulset)
    assert flag_value(instance.llama_args, "-ngl") == "99"  # llama-server's, after `--`
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    (rule,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert rule["topologyKey"] == "kubernetes.io/hostname"
    assert selects(rule["labelSelector"]["matchLabels"], pod_labels(statefulset))
    images = {c["image"] for _, c in all_containers(rendered("overlays/gpu"))}
    assert len(images) == 1 and images.pop().endswith("-cuda")


# -- network policy -------------------------------------------------------------------


def test_only_agents_and_operators_reach_management_while_inference_stays_open() -> None:
    objs = rendered("base")
    deployment, _, settings = the_balancer(objs)
    statefulset, _, _, _ = the_agent(objs)
    policy = only(objs, "NetworkPolicy", "corral-balancer")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels(deployment))
    rules = {rule["ports"][0]["port"]: rule for rule in policy["ingress"]}
    assert set(rules) == {settings.inference_host_port()[1], settings.management_host_port()[1]}
    assert "from" not in rules[settings.inference_host_port()[1]], "inference must stay open"
    peers = rules[settings.management_host_port()[1]]["from"]
    pods = [p["podSelector"]["matchLabels"] for p in peers if "podSelector" in p]
    namespaces = [p["namespaceSelector"]["matchLabels"] for p in peers if "namespaceSelector" in p]
    assert len(pods) == 1 and selects(pods[0], pod_labels(statefulset))
    assert not selects(pods[0], pod_labels(deployment)), "the rule must not be any corral pod"
    assert namespaces == [OPERATOR_LABEL]


def test_only_balancers_reach_the_agents_llama_server() -> None:
    objs = rendered("base")
    deployment, _, _ = the_balancer(objs)
    statefulset, c, _, settings = the_agent(objs)
    port = pinned_port(settings)
    policy = only(objs, "NetworkPolicy", "corral-agent")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels(statefulset))
    (rule,) = policy["ingress"]
    assert [p["port"] for p in rule["ports"]] == [port]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}
    assert selects(peer["podSelector"]["matchLabels"], pod_labels(deployment))
    # the StatefulSet's governing Service names the same port
    service = only(objs, "Service", statefulset["spec"]["serviceName"])["spec"]
    assert selects(service["selector"], pod_labels(statefulset))
    (service_port,) = service["ports"]
    assert container_port(c, service_port["targetPort"]) == port


# -- secrets and certificates ------------------------------------------------------------


def test_secret_generator_makes_the_token_secret_from_the_files() -> None:
    secret = only(rendered("secrets"), "Secret")
    assert secret["metadata"]["name"] == "corral-tokens", "the base refers to it by this name"
    assert set(secret["data"]) == set(SECRET_FILES)


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_secret_key_the_pods_need_is_one_the_secrets_have(name: str) -> None:
    keys = generated_secret_keys()
    objs = rendered(name)
    for workload, c in all_containers(objs):
        for var in c.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                assert ref["key"] in keys[ref["name"]], f"{c['name']}: {var['name']}"
        for volume in pod_spec(workload).get("volumes", []):
            secret = volume.get("secret")
            if secret:
                for item in secret.get("items", []):
                    assert item["key"] in keys[secret["secretName"]], volume["name"]


#: corral's flags that name a file, and the Secret key each must be (SECRET/KEY).
FILE_FLAGS = {
    "--management-token-file": "corral-tokens/management-token",
    "--cluster-token-file": "corral-tokens/cluster-token",
    "--tls-cert": "corral-tls/tls.crt",
    "--tls-key": "corral-tls/tls.key",
    "--tls-ca": "corral-tls/ca.crt",  # the agents': the CA of the balancers' certificate
    "--tls-client-ca": "corral-agent-tls/ca.crt",  # the CA of the agents' certificate
    "--tls-client-cert": "corral-agent-tls/tls.crt",
    "--tls-client-key": "corral-agent-tls/tls.key",
}
TLS_FLAGS = {"--tls-cert", "--tls-key", "--tls-ca"}
MTLS_FLAGS = {"--tls-client-ca", "--tls-client-cert", "--tls-client-key"}
#: Settings given as variables that name files: the Secret key each must be.
FILE_VARIABLES = {
    "CORRAL_TLS_CERT": "corral-tls/tls.crt",  # the agents': their llama-server's pair
    "CORRAL_TLS_KEY": "corral-tls/tls.key",
    "CORRAL_TLS_CA": "corral-tls/ca.crt",  # the balancers': the agents' llama-servers' CA
}


@pytest.mark.parametrize("name", WORKLOADS)
def test_file_flags_name_files_the_mounted_secrets_provide(name: str) -> None:
    keys = generated_secret_keys()
    seen = set()
    for workload, c in all_containers(rendered(name)):
        if c.get("command") != ["corral"]:
            continue
        files = secret_files(pod_spec(workload), c, keys)
        for flag, wanted in FILE_FLAGS.items():
            if flag in corral_words(c):
                path = flag_value(corral_words(c), flag)
                assert path in files, f"{c['name']}: {flag} {path} is not a mounted file"
                assert files[path] == wanted, f"{c['name']}: {flag} {path} is {files[path]}"
                seen.add(flag)
        for variable in c.get("env", []):
            wanted = FILE_VARIABLES.get(variable["name"])
            if wanted is not None:
                path = variable["value"]
                assert files.get(path) == wanted, f"{c['name']}: {variable['name']} {path}"
                seen.add(variable["name"])
        for mount in c.get("volumeMounts", []):
            assert "subPath" not in mount, "a subPath mount never sees a rotated Secret"
    expected = {"--management-token-file", "--cluster-token-file"}
    if name in TLS_WORKLOADS:
        expected |= TLS_FLAGS | set(FILE_VARIABLES)
    if name == "overlays/mtls":
        expected |= MTLS_FLAGS
    assert seen == expected


@pytest.mark.parametrize("name", TLS_WORKLOADS)
def test_certificate_names_what_agents_check_it_against(name: str) -> None:
    objs = rendered("cert-manager")
    certificate = only(objs, "Certificate", "corral-tls")["spec"]
    issuers = {o["metadata"]["name"] for o in objs if o["kind"] == "Issuer"}
    assert certificate["issuerRef"]["name"] in issuers
    assert certificate["secretName"] == "corral-tls"
    dns = set(certificate["dnsNames"])
    tls = rendered(name)
    _, _, _, instance = agent_instance(tls)
    agent = instance.agent

    async def lookup(host: str, port: int) -> list[str]:
        return BALANCER_POD_IPS  # what a headless Service's A records give

    agent.options.resolve = lookup
    asyncio.run(agent._discover())
    # one wss:// link per balancer pod, each checked against the Service's name (the
    # name is sent as SNI too), never against the pod address it dials
    assert sorted(urlsplit(link.socket_url).hostname or "" for link in agent.links) == sorted(
        BALANCER_POD_IPS
    )
    for link in agent.links:
        assert link.socket_url.startswith("wss://")
        assert link.server_name in dns, f"{link.server_name} is not in the certificate"
    assert not dns & set(BALANCER_POD_IPS)
    for service in ("corral", "corral-management", "corral-balancers"):
        only(tls, "Service", service)
        assert {service, f"{service}.{NAMESPACE}.svc"} <= dns, service
    assert certificate["usages"] == ["server auth"], "not a client certificate for agents"


def test_mtls_lets_in_agents_with_the_certificate_and_the_token() -> None:
    objs = rendered("overlays/mtls")
    _, _, balancer = the_balancer(objs)
    _, _, _, agent = the_agent(objs)
    assert balancer.agent_auth == "both"
    assert balancer.tls_client_ca is not None and balancer.tls_cert is not None
    assert agent.tls_client_cert is not None and agent.tls_client_key is not None
    assert agent.cluster_token_file is not None, "both: the token as well"
    issued = rendered("cert-manager")
    client = only(issued, "Certificate", "corral-agent-tls")["spec"]
    issuers = {o["metadata"]["name"] for o in issued if o["kind"] == "Issuer"}
    assert client["issuerRef"]["name"] in issuers
    assert client["secretName"] == "corral-agent-tls"  # what FILE_FLAGS' files come from
    assert client["usages"] == ["client auth"]
    # agents load the certificate at start: renewal must leave time to restart them
    assert int(client["renewBefore"].removesuffix("h")) >= 24 * 30
    # the plain tls overlay asks no client for a certificate
    _, _, tls_only = the_balancer(rendered("overlays/tls"))
    assert tls_only.tls_client_ca is None and tls_only.agent_auth == "token"


# -- autoscaling ----------------------------------------------------------------------


def test_keda_scales_the_agents_on_the_wanted_instances_of_their_model() -> None:
    assert documented_metrics()["corral_autoscaling_wanted_instances"] == "gauge"
    statefulset = only(rendered("base"), "StatefulSet")
    scaled = only(rendered("autoscaling/keda"), "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "StatefulSet",
        statefulset["metadata"]["name"],
    )
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] == "AverageValue"
    metadata = trigger["metadata"]
    assert all(isinstance(v, str) for v in metadata.values()), "KEDA wants string metadata"
    assert metadata["threshold"] == "1"
    assert metadata["serverAddress"].startswith(("http://", "https://"))
    model = model_name(rendered("base"))
    assert metadata["query"] == f'max(corral_autoscaling_wanted_instances{{model="{model}"}})'


def test_hpa_scales_the_agents_on_the_external_wanted_instances_metric() -> None:
    statefulset = only(rendered("base"), "StatefulSet")
    spec = only(rendered("autoscaling/hpa"), "HorizontalPodAutoscaler")["spec"]
    target = spec["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", statefulset["metadata"]["name"])
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
    (metric,) = spec["metrics"]
    external = metric["external"]
    assert external["metric"]["name"] == "corral_autoscaling_wanted_instances"
    assert external["metric"]["selector"]["matchLabels"] == {"model": model_name(rendered("base"))}
    assert external["target"] == {"type": "AverageValue", "averageValue": "1"}

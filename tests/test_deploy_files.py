"""The deployment files (config/dapr, config/k8s, Dockerfile) against the code they deploy.

Nothing here needs a cluster, a Docker engine or daprd:
- every YAML document parses; Kubernetes objects validate against the Kubernetes JSON schemas
  (`kubernetes-validate`, strict: an unknown key fails); Dapr resources are checked for the
  fields Dapr needs, and secrets in them must come from a secret store;
- the cluster gateway config, and its copy in the ConfigMap, load with the real config and policy
  loaders, so a renamed or removed config key fails here;
- names that tie the files together agree: app id, Dapr Configuration, Secrets and ConfigMaps,
  ports, probe paths, the image's user, the packages the image installs;
- the cluster config really serves: the files laid out as kubelet mounts them, the embedded
  sidecar standing in for daprd (with an API token), `python -m gateway serve` over TLS; the
  probes answer, a JWT-SVID caller of the tenant gets a result, others are refused, and a
  rotated certificate and an edited policy reach the running gateway through the mounts.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from starlette.routing import Route

from gateway.config import GatewayConfig, load_config, parse_config
from gateway.http_app import build_app
from gateway.mcp_front import McpFront
from gateway.registry import Registry
from gateway.server import Gateway
from identity.dev_ca import DevCA, write_x509_svid
from policies.loader import PolicyStore, parse_policy
from tests.gateway.conftest import INIT, MCP_HEADERS
from tests.sidecar.conftest import start_sidecar_process

REPO = Path(__file__).resolve().parents[1]
DAPR_DIR = REPO / "config" / "dapr"
K8S_DIR = REPO / "config" / "k8s"
CLUSTER_CONFIG = DAPR_DIR / "gateway.yaml"
CLUSTER_POLICIES = DAPR_DIR / "policies"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
DOCKERFILE = REPO / "Dockerfile"
# Kubernetes versions whose schemas the manifests must satisfy: an old one still in support by
# the big providers, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", "latest")
# Metadata names in Dapr components that hold credentials: never an inline `value`.
SECRET_NAME = re.compile(r"password|secret|token|connectionstring|credential|key$", re.I)

Doc = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# reading the files


def yaml_files() -> list[Path]:
    return sorted([*DAPR_DIR.rglob("*.yaml"), *K8S_DIR.rglob("*.yaml")])


def documents(path: Path) -> list[Doc]:
    """Every non-empty document of a (multi-document) YAML file."""
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def is_resource_file(path: Path) -> bool:
    """Kubernetes (and Dapr) resources, as opposed to Duragate's own config and policy files."""
    return path != CLUSTER_CONFIG and CLUSTER_POLICIES not in path.parents


def resources() -> list[tuple[Path, Doc]]:
    return [
        (path, doc)
        for path in yaml_files()
        if is_resource_file(path) and path.name != "kustomization.yaml"
        for doc in documents(path)
    ]


def the(kind: str, name: str | None = None) -> Doc:
    found = [
        d
        for _, d in resources()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec() -> Doc:
    spec: Doc = the("Deployment")["spec"]["template"]["spec"]
    return spec


def gateway_container() -> Doc:
    containers = pod_spec()["containers"]
    assert [c["name"] for c in containers] == ["gateway"], "Dapr injects daprd; no other"
    container: Doc = containers[0]
    return container


def pod_annotations() -> dict[str, str]:
    found: dict[str, str] = the("Deployment")["spec"]["template"]["metadata"]["annotations"]
    return found


def configmap_data(name: str) -> dict[str, str]:
    data: dict[str, str] = the("ConfigMap", name)["data"]
    return data


def volume(name: str) -> Doc:
    (found,) = [v for v in pod_spec()["volumes"] if v["name"] == name]
    return dict(found)


def mount_for(path: Path) -> tuple[Doc, Doc]:
    """The volume mount of the gateway container that holds `path`, and its volume."""
    for mount in gateway_container()["volumeMounts"]:
        if path.is_relative_to(mount["mountPath"]):
            return mount, volume(mount["name"])
    raise AssertionError(f"{path} is on no volume of the gateway container")


def cli_config_path() -> Path:
    args = gateway_container()["args"]
    assert args[0] == "serve", args
    return Path(args[args.index("--config") + 1])


def cluster_config() -> GatewayConfig:
    return load_config(CLUSTER_CONFIG)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


# ---------------------------------------------------------------------------------------------
# every file parses; Kubernetes objects match the schemas; Dapr resources are well formed


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
        if is_resource_file(path):
            assert {"apiVersion", "kind"} <= doc.keys(), f"{path}: not a Kubernetes resource"
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], path


def test_kubernetes_objects_match_the_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    latest = kubernetes_validate.utils.latest_version()
    checked = set()
    for path, doc in resources():
        if doc["apiVersion"].startswith("dapr.io/"):
            continue  # a CRD: checked below
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(
                    doc, latest if version == "latest" else version, strict=True
                )
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.name} {doc['kind']} (Kubernetes {version}): {exc.message}")
        checked.add(doc["kind"])
    expected = {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service"}
    expected |= {"PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"}
    assert expected <= checked


def test_the_schema_check_refuses_an_unknown_key() -> None:
    # The strict schemas are what make the test above worth having: a misspelt key fails.
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = the("Deployment")
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["httpGet"]["pth"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError, match="pth"):
        kubernetes_validate.validate(deployment, "1.29.0", strict=True)


def test_dapr_components_take_secrets_from_a_secret_store() -> None:
    components = [d for _, d in resources() if d["kind"] == "Component"]
    assert components
    for component in components:
        assert component["apiVersion"] == "dapr.io/v1alpha1"
        spec = component["spec"]
        assert spec["type"] and re.fullmatch(r"v\d+", spec["version"]), component
        for item in spec["metadata"]:
            name = item["name"]
            assert (("value" in item) + ("secretKeyRef" in item)) == 1, (component, name)
            if SECRET_NAME.search(name):
                assert "secretKeyRef" in item, f"{name} must come from a secret store"
            if "secretKeyRef" in item:
                assert item["secretKeyRef"].keys() == {"name", "key"}, item
            else:
                # Dapr reads metadata values as strings; YAML would make `true` a boolean.
                assert isinstance(item["value"], str), (component["metadata"]["name"], name)
        if any("secretKeyRef" in item for item in spec["metadata"]):
            assert component["auth"] == {"secretStore": "kubernetes"}


def test_state_stores_hold_actor_state_for_the_gateway_app() -> None:
    stores = [d for _, d in resources() if d["kind"] == "Component"]
    stores = [d for d in stores if d["spec"]["type"].startswith("state.")]
    assert {d["spec"]["type"] for d in stores} == {"state.redis", "state.postgresql"}
    app_id = pod_annotations()["dapr.io/app-id"]
    for store in stores:
        settings = {m["name"]: m.get("value") for m in store["spec"]["metadata"]}
        # Dapr workflows keep their state in the actor state store, as the string "true".
        assert settings["actorStateStore"] == "true", store["metadata"]["name"]
        assert store["scopes"] == [app_id]
        if store["spec"]["type"] == "state.postgresql":
            assert store["spec"]["version"] == "v2"
    # Alternatives under one name: applying one replaces the other, never two actor stores.
    assert len({d["metadata"]["name"] for d in stores}) == 1


def test_dapr_configuration_traces_and_denies_the_secrets_api() -> None:
    configuration = the("Configuration")
    spec = configuration["spec"]
    rate = float(spec["tracing"]["samplingRate"])
    assert isinstance(spec["tracing"]["samplingRate"], str) and 0 < rate <= 1
    otel = spec["tracing"]["otel"]
    assert otel["protocol"] in ("grpc", "http") and otel["endpointAddress"]
    assert {"storeName": "kubernetes", "defaultAccess": "deny"} in spec["secrets"]["scopes"]


def test_kustomizations_name_existing_files_and_one_state_store() -> None:
    k8s = documents(K8S_DIR / "kustomization.yaml")[0]
    dapr = documents(DAPR_DIR / "kustomization.yaml")[0]
    for base, kustomization in ((K8S_DIR, k8s), (DAPR_DIR, dapr)):
        for entry in kustomization["resources"]:
            target = base / entry
            assert target.is_file() or (target / "kustomization.yaml").is_file(), entry
    # Every manifest of config/k8s is applied (nothing written and forgotten).
    listed = set(k8s["resources"])
    assert {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"} <= listed
    assert "../dapr" in listed
    stores = [r for r in dapr["resources"] if r.startswith("statestore-")]
    assert len(stores) == 1, stores
    assert "configuration.yaml" in dapr["resources"]
    # The image the Deployment names is the one the kustomization points at a registry.
    assert gateway_container()["image"].split(":")[0] in {i["name"] for i in k8s["images"]}


# ---------------------------------------------------------------------------------------------
# the gateway config and the tenant policies load with the real loaders


def test_cluster_config_loads_and_is_fit_for_a_cluster() -> None:
    config = cluster_config()
    engine = config.engine
    assert engine.kind == "dapr"
    assert engine.grpc_address == "127.0.0.1:50001"
    assert engine.api_token_env == "DAPR_API_TOKEN"
    # Off loopback: TLS, callers proved by their SPIFFE identity, never anonymous.
    assert config.listen.host == "0.0.0.0"
    assert config.listen.tls is not None and config.listen.tls.client_certs != "required"
    assert config.identity.allow_anonymous is False
    assert config.identity.bundles and config.identity.require_tenant_rule
    assert config.policy.dir is not None
    # Every tool's target imports (what `serve` checks before starting).
    assert len(Registry.from_config(config)) == len(config.tools) > 0


def test_configmap_carries_the_files_of_config_dapr() -> None:
    gateway = configmap_data("duragate-config")
    assert gateway == {"gateway.yaml": CLUSTER_CONFIG.read_text(encoding="utf-8")}, (
        "config/k8s/configmap.yaml: copy config/dapr/gateway.yaml into duragate-config"
    )
    policies = configmap_data("duragate-policies")
    expected = {p.name: p.read_text(encoding="utf-8") for p in CLUSTER_POLICIES.glob("*.yaml")}
    assert policies == expected, (
        "config/k8s/configmap.yaml: copy config/dapr/policies/*.yaml into duragate-policies"
    )


def test_configmap_files_load_where_they_are_mounted() -> None:
    mounted = cli_config_path()
    mount, source = mount_for(mounted)
    assert source["configMap"]["name"] == "duragate-config"
    text = configmap_data("duragate-config")[mounted.name]
    config = parse_config(text, str(mounted), mounted.parent)
    assert config.policy.dir is not None
    policy_mount, policy_source = mount_for(Path(config.policy.dir))
    assert Path(policy_mount["mountPath"]) == Path(config.policy.dir)
    assert policy_source["configMap"]["name"] == "duragate-policies"
    loaded = {
        name: parse_policy(body, f"duragate-policies/{name}", name)
        for name, body in configmap_data("duragate-policies").items()
    }
    tenants = {policy.tenant for policy in loaded.values()}
    # A tenant the identity rules hand callers to, without a policy, could call nothing.
    assert {rule.tenant for rule in config.identity.tenants} <= tenants
    # Every tool some policy grants exists in the config (a typo would grant nothing).
    configured = {tool.name for tool in config.tools}
    for policy in loaded.values():
        for rule in policy.rules:
            if rule.key != "*" and not any(c in rule.key for c in "*?["):
                assert rule.key in configured, f"{policy.tenant}: {rule.key} is no tool"


def test_every_file_the_config_names_is_on_a_volume() -> None:
    config = cluster_config()
    tls = config.listen.tls
    assert tls is not None
    files = [Path(tls.cert), Path(tls.key), *map(Path, config.identity.bundles.values())]
    for path in files:
        mount, source = mount_for(path)
        assert mount.get("readOnly") is True, mount
        assert "subPath" not in mount, "a subPath mount is never updated in place"
        if "secret" in source:
            # A kubernetes.io/tls Secret holds exactly these two keys.
            assert path.name in ("tls.crt", "tls.key"), path
    env = {e["name"]: e for e in gateway_container()["env"]}
    data_dir = Path(env["DURAGATE_DATA_DIR"]["value"])
    mount, source = mount_for(data_dir)
    assert Path(mount["mountPath"]) == data_dir and "emptyDir" in source


# ---------------------------------------------------------------------------------------------
# the Deployment, Service, PDB, HPA and NetworkPolicy agree with the config and each other


def test_dapr_annotations_name_the_app_and_its_configuration() -> None:
    notes = pod_annotations()
    assert notes["dapr.io/enabled"] == "true"
    assert notes["dapr.io/app-id"] == "duragate"
    assert notes["dapr.io/config"] == the("Configuration")["metadata"]["name"]
    assert notes["dapr.io/log-level"] in ("debug", "info", "warn", "error")
    for key in ("cpu-request", "memory-request", "cpu-limit", "memory-limit"):
        assert notes[f"dapr.io/sidecar-{key}"], key
    # No app port: daprd never calls into the gateway (whose port speaks TLS only).
    assert "dapr.io/app-port" not in notes


def test_daprd_and_the_gateway_share_one_api_token() -> None:
    config = cluster_config()
    assert config.engine.kind == "dapr"
    env = {e["name"]: e for e in gateway_container()["env"]}
    token = env[config.engine.api_token_env]
    assert "value" not in token, "the token comes from the Secret, never inline"
    ref = token["valueFrom"]["secretKeyRef"]
    # dapr.io/api-token-secret names a Secret whose key `token` daprd reads.
    assert ref == {"name": pod_annotations()["dapr.io/api-token-secret"], "key": "token"}


def test_probes_and_port_match_the_gateway(tmp_path: Path) -> None:
    config = cluster_config()
    container = gateway_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"https": config.listen.port}
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] == "https" and get["scheme"] == "HTTPS"  # listen.tls is on
        paths[probe] = get["path"]
    assert paths == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    # ... and they are GET routes of the gateway's HTTP app (the live test below calls them).
    gateway = Gateway(GatewayConfig(), tmp_path)
    app = build_app(gateway, McpFront(gateway, gateway.sessions, front_door="mcp-http"), "0.0.0.0")
    routes = {r.path: r.methods for r in app.routes if isinstance(r, Route)}
    for path in paths.values():
        assert "GET" in (routes.get(path) or ()), f"{path} is no GET route of the gateway"
    service = the("Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["https"]
    labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]
    for selector in (
        service["spec"]["selector"],
        the("Deployment")["spec"]["selector"]["matchLabels"],
        the("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        the("NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items(), selector
    allowed = {p["port"] for rule in the("NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]}
    # The front door, and daprd-to-daprd traffic, without which replicas cannot share work.
    assert {config.listen.port, 50002} <= allowed


def test_scaling_keeps_a_replica_serving() -> None:
    hpa = the("HorizontalPodAutoscaler")["spec"]
    deployment = the("Deployment")
    assert hpa["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    pdb = the("PodDisruptionBudget")["spec"]
    assert hpa["minReplicas"] - pdb["maxUnavailable"] >= 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # CPU utilization is measured against the request.
    assert gateway_container()["resources"]["requests"]["cpu"]


def test_pod_runs_as_the_images_non_root_user_on_a_read_only_root() -> None:
    pod = pod_spec()["securityContext"]
    user = [args for word, args in final_stage() if word == "USER"][-1]
    uid, _, gid = user.partition(":")
    # Kubernetes' runAsNonRoot can only verify a numeric user.
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, user
    assert pod["runAsNonRoot"] is True
    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(uid), int(gid))
    container = gateway_container()["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    mounts = gateway_container()["volumeMounts"]
    assert {m["mountPath"] for m in mounts if not m.get("readOnly")} == {"/data", "/tmp"}


def test_referenced_secrets_and_configmaps_exist_or_are_documented() -> None:
    """Each Secret or ConfigMap the pods and components use is in config/k8s, or listed, with
    its keys, in docs/deploy.md's "What you supply" (which also keeps the guide true)."""
    referenced: dict[tuple[str, str], set[str]] = {}

    def need(kind: str, name: str, *keys: str) -> None:
        referenced.setdefault((kind, name), set()).update(keys)

    config = cluster_config()
    tls = config.listen.tls
    assert tls is not None
    # The files the gateway reads from its volumes: each is a key of the volume's source.
    files = [Path(tls.cert), Path(tls.key), cli_config_path()]
    files += [Path(p) for p in config.identity.bundles.values()]
    for item in pod_spec()["volumes"]:
        mount = next(m for m in gateway_container()["volumeMounts"] if m["name"] == item["name"])
        names = [f.name for f in files if f.parent == Path(mount["mountPath"])]
        if "secret" in item:
            need("Secret", item["secret"]["secretName"], *names)
        elif "configMap" in item:
            need("ConfigMap", item["configMap"]["name"], *names)
    for entry in gateway_container()["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            need("Secret", ref["name"], ref["key"])
    need("Secret", pod_annotations()["dapr.io/api-token-secret"], "token")
    for _, doc in resources():
        if doc["kind"] == "Component":
            for item in doc["spec"]["metadata"]:
                if "secretKeyRef" in item:
                    need("Secret", item["secretKeyRef"]["name"], item["secretKeyRef"]["key"])

    defined = {(d["kind"], d["metadata"]["name"]): d for _, d in resources()}
    assert not any(kind == "Secret" for kind, _ in defined), "no Secret values in the repo"
    supplied = user_supplied_section()
    for (kind, name), keys in referenced.items():
        if (kind, name) in defined:
            assert keys <= set(defined[(kind, name)].get("data", {})), (kind, name, keys)
            continue
        row = next((line for line in supplied if f"`{name}`" in line), None)
        assert row is not None, f"{kind} {name} is neither defined nor in docs/deploy.md"
        assert kind in row, row
        for key in keys:
            assert f"`{key}`" in row, f"docs/deploy.md: {name} should name its key {key}"


def user_supplied_section() -> list[str]:
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    match = re.search(r"^## What you supply\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, "docs/deploy.md has no '## What you supply' section"
    return [line for line in match.group(1).splitlines() if line.startswith("|")]


# ---------------------------------------------------------------------------------------------
# the image


def test_dockerfile_installs_every_package_of_the_project() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    copied = {
        shlex.split(args)[0].rstrip("/")
        for word, args in dockerfile_instructions()
        if word == "COPY" and not args.startswith("--from")
    }
    missing = packages - copied
    assert not missing, f"the Dockerfile copies no {sorted(missing)} (pyproject.toml has them)"
    for package in packages:
        assert (REPO / package / "__init__.py").is_file(), package
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not packages & ignored, "a package is in .dockerignore"


def test_dockerfile_runs_duragate_with_a_healthcheck() -> None:
    stage = final_stage()
    words = [word for word, _ in stage]
    first = dict(stage)  # the first FROM is this stage's
    assert first["FROM"].startswith("python:3.11-slim")
    # The health check calls the URL of DURAGATE_HEALTHCHECK_URL (checked below).
    assert "HEALTHCHECK" in words and "DURAGATE_HEALTHCHECK_URL" in first["HEALTHCHECK"]
    env = " ".join(args for word, args in stage if word == "ENV")
    entrypoint = [args for word, args in stage if word == "ENTRYPOINT"][-1]
    assert yaml.safe_load(entrypoint) == ["duragate"]
    command = yaml.safe_load([args for word, args in stage if word == "CMD"][-1])
    config = command[command.index("--config") + 1]
    # The demo config the default command serves is copied into the image, and loads.
    workdir, copied = "/", {}
    for word, args in stage:
        if word == "WORKDIR":
            workdir = posixpath.join(workdir, args)
        elif word == "COPY" and not args.startswith("--from"):
            source, dest = shlex.split(args)
            copied[posixpath.normpath(posixpath.join(workdir, dest))] = source
    demo = load_config(REPO / copied[config])
    assert demo.engine.kind == "embedded" and demo.listen.host == "127.0.0.1"
    # The health check's default URL is that config's port.
    port = re.search(r"DURAGATE_HEALTHCHECK_URL=http://127\.0\.0\.1:(\d+)/readyz", env)
    assert port and int(port.group(1)) == demo.listen.port


# ---------------------------------------------------------------------------------------------
# kubelet's volume layout: policies and certificates reach the running gateway


def write_volume(directory: Path, files: dict[str, bytes], version: int) -> None:
    """Write `files` as kubelet's atomic writer does for a ConfigMap or Secret volume: a hidden
    directory per version, `..data` pointing at the current one (swapped in one rename), and a
    symlink per key through `..data`."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = directory / f"..2026_11_21_v{version}"
    payload.mkdir()
    for name, content in files.items():
        (payload / name).write_bytes(content)
    link = directory / "..data_tmp"
    link.symlink_to(payload.name)
    os.replace(link, directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def test_policy_store_follows_a_configmap_update(tmp_path: Path) -> None:
    policies = {k: v.encode() for k, v in configmap_data("duragate-policies").items()}
    write_volume(tmp_path, policies, 1)
    store = PolicyStore.open(tmp_path, strict=True)
    # The hidden version directories and `..data` are not taken for policy files.
    assert store.tenants() == sorted(p.removesuffix(".yaml") for p in policies)
    before = store.get("team-a")
    assert before is not None and before.rules_for("add")

    edited = policies["team-a.yaml"].decode().replace("  add:\n", "  add_numbers:\n")
    write_volume(tmp_path, {**policies, "team-a.yaml": edited.encode()}, 2)
    report = store.refresh()
    assert report.loaded == ["team-a"] and not report.failed
    after = store.get("team-a")
    assert after is not None
    assert not [r for r in after.rules_for("add") if r.key == "add"]
    assert [r.key for r in after.rules_for("add_numbers") if r.key == "add_numbers"]


# ---------------------------------------------------------------------------------------------
# the cluster config, served


class Pod:
    """The gateway's volumes laid out under `root` as kubelet mounts them."""

    def __init__(self, root: Path, ca: DevCA) -> None:
        self.root = root
        self.ca = ca
        self.version = 0
        config = cluster_config()
        self.bundle_files = {
            Path(p).name: (ca.directory / "bundle.json").read_bytes()
            for p in config.identity.bundles.values()
        }

    def path(self, mount_path: str) -> Path:
        return self.root / mount_path.lstrip("/")

    def write(self) -> None:
        """Every volume of the gateway container (a new version of each on each call)."""
        self.version += 1
        for mount in gateway_container()["volumeMounts"]:
            source = volume(mount["name"])
            target = self.path(mount["mountPath"])
            if "emptyDir" in source:
                target.mkdir(parents=True, exist_ok=True)
            elif "configMap" in source and source["configMap"]["name"] == "duragate-trust-bundles":
                write_volume(target, self.bundle_files, self.version)
            elif "configMap" in source:
                data = configmap_data(source["configMap"]["name"])
                write_volume(target, {k: v.encode() for k, v in data.items()}, self.version)
            elif "secret" in source:
                cert, key = self.ca.issue_x509_svid(
                    "spiffe://example.org/duragate",
                    timedelta(hours=1),
                    server_names=["127.0.0.1", "localhost"],
                    for_server=True,
                )
                scratch = self.root / f"svid-{self.version}"
                scratch.mkdir()
                write_x509_svid(scratch / "tls.crt", scratch / "tls.key", cert, key)
                files = {n: (scratch / n).read_bytes() for n in ("tls.crt", "tls.key")}
                write_volume(target, files, self.version)
            else:
                raise AssertionError(f"volume {mount['name']}: a kind this test cannot lay out")

    def config_file(self, grpc_address: str) -> Path:
        """gateway.yaml as mounted, its paths moved under `root` and daprd's address replaced
        by the stand-in's; nothing else of it changes."""
        mounted = self.path(str(cli_config_path()))
        text = mounted.read_text()
        assert text.count("127.0.0.1:50001") == 1
        text = text.replace("127.0.0.1:50001", grpc_address)
        for mount in gateway_container()["volumeMounts"]:
            text = re.sub(
                rf"(?<=[ :]){re.escape(mount['mountPath'])}(?=[/\n])",
                str(self.path(mount["mountPath"])),
                text,
            )
        rewritten = self.root / "gateway.yaml"
        rewritten.write_text(text)
        return rewritten


def served_serial(port: int) -> int:
    context = ssl._create_unverified_context()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture
def token() -> str:
    return "deploy-test-" + os.urandom(16).hex()


@pytest.fixture
def stand_in_daprd(tmp_path: Path, token: str) -> Iterator[str]:
    """The embedded sidecar run on its own, as daprd is: it requires the API token."""
    env = {**os.environ, "DAPR_API_TOKEN": token}
    sidecar = start_sidecar_process(tmp_path / "engine.db", http_listen=None, env=env)
    try:
        yield sidecar.grpc_address
    finally:
        sidecar.popen.send_signal(signal.SIGTERM)
        try:
            sidecar.popen.wait(15)
        except subprocess.TimeoutExpired:
            sidecar.popen.kill()
            sidecar.popen.wait(10)


def start_gateway(config: Path, data_dir: Path, token: str, log: Path) -> tuple[Any, int]:
    """`python -m gateway serve --config ...` as the container runs it (on a free port)."""
    env = {**os.environ, "DAPR_API_TOKEN": token, "DURAGATE_DATA_DIR": str(data_dir)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", "0"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(r"MCP at https://0\.0\.0\.0:(\d+)/mcp", log.read_text(errors="replace"))
        if found:
            return proc, int(found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait(10)
    raise AssertionError(f"the gateway did not start:\n{log.read_text(errors='replace')}")


def stop(proc: Any) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_cluster_config_serves_over_tls_with_a_daprd(
    tmp_path: Path, token: str, stand_in_daprd: str
) -> None:
    ca = DevCA.create(tmp_path / "ca", "example.org")
    pod = Pod(tmp_path / "pod", ca)
    pod.write()
    config = pod.config_file(stand_in_daprd)
    log = tmp_path / "gateway.log"
    proc, port = start_gateway(config, tmp_path / "data", token, log)
    try:
        base = f"https://127.0.0.1:{port}"
        container = gateway_container()
        # kubelet's probes: HTTPS without verifying the certificate, no credentials.
        async with httpx.AsyncClient(base_url=base, verify=False) as kubelet:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                path = container[probe]["httpGet"]["path"]
                response = await kubelet.get(path)
                assert response.status_code == 200, (probe, response.text, log.read_text())

        trusted = ssl.create_default_context(cafile=str(ca.directory / "bundle.pem"))
        async with httpx.AsyncClient(base_url=base, verify=trusted) as http:
            anonymous = await http.post("/mcp", json=INIT, headers=MCP_HEADERS)
            assert anonymous.status_code == 401
            outsider = ca.issue_jwt_svid(
                "spiffe://example.org/team-b/bob", "duragate", timedelta(minutes=5)
            )
            refused = await http.post(
                "/mcp", json=INIT, headers={**MCP_HEADERS, "Authorization": f"Bearer {outsider}"}
            )
            # require_tenant_rule: a caller no tenant rule names is refused.
            assert refused.status_code == 403, refused.text

        alice = ca.issue_jwt_svid(
            "spiffe://example.org/team-a/people/alice", "duragate", timedelta(minutes=5)
        )
        headers = {"Authorization": f"Bearer {alice}"}
        async with httpx.AsyncClient(verify=trusted, headers=headers, timeout=60) as http:
            async with streamable_http_client(f"{base}/mcp", http_client=http) as (read, write, _):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    listed = await session.list_tools()
                    # team-a's policy grants these; the workflow runs on the daprd stand-in.
                    assert {t.name for t in listed.tools} == {"add", "slow_echo", "word_count"}
                    result = await session.call_tool("add", {"a": 2, "b": 3})
                    assert not result.isError, result
                    assert result.structuredContent == {"result": 5}

        # A rotated certificate (a new Secret version, swapped in by kubelet) is served without
        # a restart.
        first = served_serial(port)
        pod.write()
        deadline = time.monotonic() + 60
        while served_serial(port) == first:
            assert time.monotonic() < deadline, "the rotated certificate was never served"
            time.sleep(0.5)
        assert proc.poll() is None
    finally:
        stop(proc)

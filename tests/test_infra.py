"""infra/ checked without a cloud: launcher configs against Ray's own schema and loader, Kubernetes manifests against
the Kubernetes API schemas (kubernetes-validate) and the KubeRay fields athanor relies on, the compose file, the
image pins, and the security rules (no public dashboard / job / MLflow port, no committed secret).

Each checker is also run on a deliberately broken copy, so a check that cannot fail would show up here.
"""

from __future__ import annotations

import base64
import configparser
import copy
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from secrets import token_urlsafe as secrets_token

import boto3
import jsonschema
import kubernetes_validate
import pytest
import ray.autoscaler
import tomllib
import yaml
from mlflow.tracking import MlflowClient
from moto.server import ThreadedMotoServer
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

from athanor.config import load_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
K8S_VERSION = kubernetes_validate.latest_version()

LAUNCHERS = {"aws": INFRA / "ray" / "aws.yaml", "gcp": INFRA / "ray" / "gcp.yaml"}
CLUSTER_CONFIGS = {"aws": ROOT / "configs" / "cluster-aws.yaml", "gcp": ROOT / "configs" / "cluster-gcp.yaml"}
H100_TYPES = {"aws": ("InstanceType", "p5."), "gcp": ("machineType", "a3-")}
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
MLFLOW_K8S = sorted((INFRA / "mlflow" / "k8s").glob("*.yaml"))
COMPOSE = INFRA / "mlflow" / "compose.yaml"
# Ray dashboard + job API, Ray client, MLflow, GCS: none may be reachable from outside the cluster.
PRIVATE_PORTS = {8265, 10001, 5000, 6379}
IMAGE_REPO = "athanor"


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _pin(name: str) -> str:
    """The exact `==` pin of a dependency in pyproject.toml."""
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)", dep.split(";")[0].strip())
        if m:
            return m.group(2)
    raise AssertionError(f"pyproject.toml pins no {name}==")


def _spec(deps: list[str], name: str) -> SpecifierSet:
    for dep in deps:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?\s*([<>=!~][^;]*)?", dep.split(";")[0].strip())
        if m:
            return SpecifierSet(m.group(2) or "")
    raise AssertionError(f"no {name} in {deps}")


def _walk(node, path=""):
    """Every (dotted path, key, value) in a YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{path}.{k}", k, v
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


# ---------------------------------------------------------------- security checkers (each also tested on bad input)

SECRET_KEY = re.compile(r"(password|passwd|secret|(^|_)token$|access_key|private_key)", re.IGNORECASE)
REFERENCE = re.compile(r"^\$\{[A-Z0-9_]+(:\?[^}]*)?\}$")  # ${VAR} or ${VAR:?message}: taken from the environment
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET = re.compile(r"aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}", re.IGNORECASE)
PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")  # compose's ${VAR:-default}: the default is used


def literal_secrets(text: str, docs: list[dict]) -> list[str]:
    """Committed credentials: key patterns in the text, or a password/secret/token field with a literal value."""
    found = [f"AWS access key id {m.group(0)}" for m in AWS_KEY_ID.finditer(text)]
    found += ["AWS secret access key" for _ in AWS_SECRET.finditer(text)]
    found += ["private key block" for _ in PRIVATE_KEY.finditer(text)]
    for doc in docs:
        if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            found.append(f"Secret {doc['metadata']['name']} with values")
        for where, key, value in _walk(doc):
            if key == "env" and isinstance(value, list):  # k8s [{name, value}] or compose ["NAME=value"]
                for item in value:
                    name, val = (item.get("name", ""), item.get("value")) if isinstance(item, dict) else (
                        item.split("=", 1) + [None])[:2]
                    if SECRET_KEY.search(name) and val not in (None, "") and not REFERENCE.match(str(val)):
                        found.append(f"{where}: {name} has a literal value")
            elif key == "environment" and isinstance(value, (list, dict)):
                items = value.items() if isinstance(value, dict) else [(i.split("=", 1) + [None])[:2] for i in value]
                for name, val in items:
                    if SECRET_KEY.search(name) and val not in (None, "") and not REFERENCE.match(str(val)):
                        found.append(f"{where}: {name} has a literal value")
            elif (isinstance(key, str) and SECRET_KEY.search(key) and isinstance(value, (str, int)) and value != ""
                  and not REFERENCE.match(str(value))):
                found.append(f"{where} is a literal")
    return found


def public_exposure(docs: list[dict]) -> list[str]:
    """Services or published ports that reach beyond the cluster / the host's loopback."""
    found = []
    for doc in docs:
        for where, key, value in _walk(doc):
            if key in ("type", "serviceType") and value in ("LoadBalancer", "NodePort"):
                found.append(f"{where}: {value}")
            if key == "hostPort" or (key == "hostNetwork" and value is True):
                found.append(f"{where}: {key}")
        for name, service in (doc.get("services") or {}).items():  # compose
            for port in service.get("ports", []):
                spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}:x"
                spec = INTERPOLATION.sub(lambda m: m.group(2) or "", str(spec))
                parts = spec.rsplit(":", 2)
                host_ip = parts[0] if len(parts) == 3 else ""
                if host_ip not in ("127.0.0.1", "localhost", "::1", "[::1]"):
                    found.append(f"services.{name}.ports: {port} publishes on {host_ip or 'every interface'}")
    return found


def open_ray_ports(launcher: dict) -> list[str]:
    """Launcher settings that expose the dashboard / job API or open cluster ports to the internet."""
    found = []
    for cmd in launcher.get("head_start_ray_commands", []):
        if "ray start" in cmd and "--dashboard-host=127.0.0.1" not in cmd:
            found.append(f"head start command does not bind the dashboard to loopback: {cmd}")
    for rule in launcher.get("provider", {}).get("security_group", {}).get("IpPermissions", []):
        ports = range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1)
        if rule.get("IpProtocol") == "-1" or any(p in ports for p in PRIVATE_PORTS):
            found.append(f"security group rule opens {rule}")
    text = yaml.safe_dump(launcher)
    if "0.0.0.0/0" in text or "--dashboard-host=0.0.0.0" in text:
        found.append("0.0.0.0 in the launcher config")
    return found


# ---------------------------------------------------------------- Ray cluster launcher configs


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_passes_ray_schema_and_loader(cloud):
    raw = yaml.safe_load(LAUNCHERS[cloud].read_text())
    jsonschema.validate(raw, RAY_SCHEMA)
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` does before it talks to the cloud
    validate_config(prepared)
    assert prepared["provider"]["type"] == cloud
    # Our commands replace Ray's defaults (which pip-install a nightly wheel); the image carries everything.
    assert prepared["setup_commands"] == [] and "ray-wheels" not in json.dumps(prepared)
    docker = prepared["docker"]
    assert docker["image"].rsplit("/", 1)[-1] == f"{IMAGE_REPO}:{PYPROJECT['project']['version']}"


@pytest.mark.parametrize("broken", ["unknown_key", "string_resource", "no_node_config", "negative_gpu"])
def test_ray_schema_rejects_broken_launcher(broken):
    cfg = yaml.safe_load(LAUNCHERS["aws"].read_text())
    gpu = cfg["available_node_types"]["gpu_worker"]
    if broken == "unknown_key":
        cfg["max_worker"] = 3
    elif broken == "string_resource":
        gpu["resources"]["GPU"] = "eight"
    elif broken == "no_node_config":
        del gpu["node_config"]
    else:
        gpu["resources"]["GPU"] = -1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, RAY_SCHEMA)


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_node_types(cloud):
    cfg = yaml.safe_load(LAUNCHERS[cloud].read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head runs the driver only"
    cpu, gpu = types["cpu_worker"], types["gpu_worker"]
    assert cpu["min_workers"] == 0 and cpu["max_workers"] >= 1 and "GPU" not in cpu["resources"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1 and gpu["resources"]["GPU"] >= 1
    field, prefix = H100_TYPES[cloud]
    assert gpu["node_config"][field].startswith(prefix), f"{gpu['node_config'][field]} is not an H100 type"
    assert cpu["max_workers"] + gpu["max_workers"] <= cfg["max_workers"]
    assert cfg["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_keeps_ray_ports_private(cloud):
    cfg = yaml.safe_load(LAUNCHERS[cloud].read_text())
    assert open_ray_ports(cfg) == []
    assert literal_secrets(LAUNCHERS[cloud].read_text(), [cfg]) == []
    bad = copy.deepcopy(cfg)
    bad["head_start_ray_commands"][-1] = bad["head_start_ray_commands"][-1].replace("127.0.0.1", "0.0.0.0")
    bad["provider"]["security_group"] = {"IpPermissions": [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
    assert len(open_ray_ports(bad)) == 3


@pytest.mark.parametrize("cloud", sorted(CLUSTER_CONFIGS))
def test_training_size_matches_autoscaler(cloud):
    cfg = load_config(CLUSTER_CONFIGS[cloud])
    gpu = yaml.safe_load(LAUNCHERS[cloud].read_text())["available_node_types"]["gpu_worker"]
    per_node = gpu["resources"]["GPU"]
    assert cfg.train.use_gpu
    assert cfg.train.num_workers == gpu["max_workers"] * per_node
    assert cfg.train.min_workers is not None and cfg.train.min_workers % per_node == 0
    assert per_node <= cfg.train.min_workers <= cfg.train.num_workers
    assert cfg.train.cpus_per_worker * per_node <= gpu["resources"]["CPU"]
    assert cfg.run.workdir.startswith({"aws": "s3://", "gcp": "gs://"}[cloud])
    # Reference files are read by absolute path from the image (a job's working_dir carries no data/).
    for path in [cfg.curate.langid.model_path, cfg.curate.url_filter.blocklist_dir, *cfg.curate.quality.high,
                 *cfg.curate.quality.low, *cfg.curate.decontam.task_files, cfg.curate.toxicity.wordlist_dir]:
        assert path.startswith("/opt/athanor/data/"), path


# ---------------------------------------------------------------- KubeRay


def _raycluster() -> dict:
    return next(d for d in _yaml_docs(RAYCLUSTER) if d["kind"] == "RayCluster")


def _as_pod(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "template"}, "spec": template["spec"]}


def test_kuberay_manifests_have_required_fields():
    for path in (RAYCLUSTER, RAYJOB):
        for doc in _yaml_docs(path):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            assert doc["metadata"]["namespace"] == "athanor", path
            if doc["apiVersion"].startswith("ray.io/"):
                assert doc["apiVersion"] == "ray.io/v1", path
            else:  # plain Kubernetes objects: the API's own schema
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_raycluster_autoscales_cpu_and_gpu_groups_from_zero():
    rc = _raycluster()
    spec = rc["spec"]
    assert spec["rayVersion"] == _pin("ray")
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    templates = [head["template"]] + [g["template"] for g in groups.values()]
    for g in groups.values():
        assert g["minReplicas"] == 0 and g["replicas"] == 0 and g["maxReplicas"] >= 1, g["groupName"]
    for template in templates:
        kubernetes_validate.validate(_as_pod(template), K8S_VERSION, strict=True)
        for c in template["spec"]["containers"]:
            assert c["image"].rsplit("/", 1)[-1] == f"{IMAGE_REPO}:{PYPROJECT['project']['version']}"
            res = c["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[kind]), f"{c['name']} lacks {kind}"
    cpu_res = groups["cpu-workers"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in cpu_res["limits"]
    gpu_res = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]
    assert int(gpu_res["limits"]["nvidia.com/gpu"]) >= 1
    assert gpu_res["requests"]["nvidia.com/gpu"] == gpu_res["limits"]["nvidia.com/gpu"]


def test_pod_schema_rejects_broken_template():
    template = copy.deepcopy(_raycluster()["spec"]["workerGroupSpecs"][1]["template"])
    template["spec"]["containers"][0]["resourcez"] = template["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_as_pod(template), K8S_VERSION, strict=True)
    template["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": [8]}}
    del template["spec"]["containers"][0]["resourcez"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_as_pod(template), K8S_VERSION, strict=True)


def test_rayjob_runs_athanor_on_the_cluster_with_shared_outputs():
    job = _yaml_docs(RAYJOB)[0]
    rc = _raycluster()
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["athanor", "run"]
    config = ROOT / Path(argv[2]).relative_to("/opt/athanor")  # the image's copy of configs/
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(config, overrides)
    assert cfg.run.workdir.startswith("s3://")
    mlflow_service = next(d for d in _yaml_docs(INFRA / "mlflow" / "k8s" / "mlflow.yaml") if d["kind"] == "Service")
    port = mlflow_service["spec"]["ports"][0]["port"]
    meta = mlflow_service["metadata"]
    assert cfg.mlflow.tracking_uri == f"http://{meta['name']}.{meta['namespace']}.svc.cluster.local:{port}"
    # The job's training size is the GPU group's maxima.
    gpu = next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-workers")
    per_pod = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert cfg.train.num_workers == gpu["maxReplicas"] * per_pod
    assert cfg.train.min_workers % per_pod == 0


def test_nodes_hold_their_own_credentials_and_jobs_carry_none():
    """Every Ray pod gets the MLflow client's secrets from a Secret and S3 from its role (or the optional athanor-s3
    Secret); every `ray up` node from its cloud's secret store, read with its role into the container's env-file.
    The RayJob forwards nothing: a job's runtime_env is in its spec, which the dashboard shows."""
    from athanor.cluster.submit import secret_names

    rc = _raycluster()["spec"]
    templates = [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]
    for template in templates:
        assert template["spec"]["serviceAccountName"] == "athanor-ray"  # the cloud role (IRSA / Workload Identity)
        for c in template["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "athanor-mlflow-client", name
            assert {"secretRef": {"name": "athanor-s3", "optional": True}} in c["envFrom"]
            assert not [n for n in secret_names(list(env)) if "value" in env[n]]
    job = _yaml_docs(RAYJOB)[0]["spec"]
    assert "runtimeEnvYAML" not in job and not secret_names(re.findall(r"[A-Z][A-Z0-9_]+", job["entrypoint"]))
    for cloud, path in LAUNCHERS.items():
        cfg = yaml.safe_load(path.read_text())
        env_file = next(o.split()[1] for o in cfg["docker"]["run_options"] if o.startswith("--env-file "))
        fetch = next(c for c in cfg["initialization_commands"] if env_file in c)
        assert fetch.startswith("umask 077;") and "MLFLOW_TRACKING_PASSWORD=" in fetch, cloud
        assert {"aws": "aws ssm get-parameter", "gcp": "gcloud secrets versions access"}[cloud] in fetch


# ---------------------------------------------------------------- MLflow server


def _container(docs: list[dict], kind: str, name: str) -> dict:
    doc = next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)
    return doc["spec"]["template"]["spec"]["containers"][0]


def test_mlflow_k8s_manifests_pass_kubernetes_schema():
    kinds = []
    for path in MLFLOW_K8S:
        for doc in _yaml_docs(path):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            kinds.append(doc["kind"])
            assert doc["metadata"]["namespace"] == "athanor"
    assert {"Deployment", "Service", "StatefulSet", "ConfigMap", "NetworkPolicy"} <= set(kinds)
    assert "Secret" not in kinds, "Secrets are created by hand, never committed"


def test_mlflow_k8s_server_auth_postgres_s3():
    docs = [d for p in MLFLOW_K8S for d in _yaml_docs(p)]
    server = _container(docs, "Deployment", "mlflow")
    assert server["args"][:2] == ["--app-name", "basic-auth"]
    env = {e["name"]: e for e in server["env"]}
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"] == "athanor-mlflow-server"
    backend = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert re.fullmatch(r"postgresql://\w+@mlflow-postgres:5432/mlflow", backend), backend
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert {"requests", "limits"} <= set(server["resources"])
    postgres = _container(docs, "StatefulSet", "mlflow-postgres")
    pg_env = {e["name"]: e for e in postgres["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "athanor-mlflow-server",
                                                                       "key": "db-password"}
    # The ConfigMaps carry the very files compose mounts, so both deployments run one configuration.
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    assert configmaps["mlflow-auth-config"]["basic_auth.ini"] == (INFRA / "mlflow" / "basic_auth.ini").read_text()
    initdb = INFRA / "mlflow" / "initdb" / "10-auth-db.sql"
    assert configmaps["mlflow-postgres-initdb"][initdb.name] == initdb.read_text()
    services = [d for d in docs if d["kind"] == "Service"]
    assert services and all(s["spec"]["type"] == "ClusterIP" for s in services)


def test_auth_config_has_no_secret_and_uses_postgres():
    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow" / "basic_auth.ini")
    section = ini["mlflow"]
    assert "admin_password" not in section, "the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD"
    assert re.fullmatch(r"postgresql://\w+@[\w.-]+:5432/mlflow_auth", section["database_uri"])
    assert section["default_permission"] in {"READ", "NO_PERMISSIONS"}


def test_compose_mlflow_postgres_s3_on_loopback():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    server, db = services["mlflow"], services["mlflow-postgres"]
    assert server["command"][:2] == ["--app-name", "basic-auth"]
    env = dict((item.split("=", 1) + [None])[:2] for item in server["environment"])
    assert re.fullmatch(r"postgresql://\w+@mlflow-postgres:5432/mlflow", env["MLFLOW_BACKEND_STORE_URI"])
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD",
                 "MLFLOW_ARTIFACTS_DESTINATION"):
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", env[name]), f"{name} must be required from the environment"
    assert env["AWS_ACCESS_KEY_ID"] is None, "AWS keys pass through from the shell, never written here"
    assert db["environment"]["POSTGRES_PASSWORD"] == env["PGPASSWORD"]
    assert "ports" not in db, "PostgreSQL is published nowhere"
    mounted = {v.split(":")[0] for v in server["volumes"] + db["volumes"] if v.startswith("./")}
    for rel in mounted:
        assert (COMPOSE.parent / rel).exists(), rel
    assert server["depends_on"]["mlflow-postgres"]["condition"] == "service_healthy"
    assert server["image"].endswith(":" + _pin("mlflow"))
    assert public_exposure([compose]) == []


# ---------------------------------------------------------------- security sweep over every infra file


def _infra_files() -> list[Path]:
    files = [p for p in INFRA.rglob("*") if p.is_file()] + list(CLUSTER_CONFIGS.values())
    assert len(files) >= 10
    return files


def test_no_public_ports_and_no_literal_secrets_anywhere():
    for path in _infra_files():
        text = path.read_text()
        docs = _yaml_docs(path) if path.suffix in (".yaml", ".yml") else []
        assert public_exposure(docs) == [], path
        assert literal_secrets(text, docs) == [], path
        if path.suffix == ".ini":
            assert not re.search(r"^\s*\w*password\s*=\s*\S", text, re.MULTILINE | re.IGNORECASE), path


def test_security_checkers_catch_bad_files():
    lb = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"type": "LoadBalancer"}}
    head = {"spec": {"headGroupSpec": {"serviceType": "NodePort"}}}
    compose = {"services": {
        "all": {"ports": ["5000:5000"]}, "any": {"ports": ["0.0.0.0:8265:8265"]},
        "env": {"ports": ["${BIND:-0.0.0.0}:10001:10001"]}, "ok": {"ports": ["${BIND:-127.0.0.1}:6379:6379"]}}}
    assert len(public_exposure([lb, head, compose])) == 5
    leaky = {"kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"},
             "env": [{"name": "DB_PASSWORD", "value": "hunter2"}, {"name": "MLFLOW_TRACKING_URI", "value": "x"}],
             "environment": ["MLFLOW_AUTH_ADMIN_PASSWORD=hunter2", "TOKEN=${TOKEN:?set it}", "AWS_SESSION_TOKEN"],
             "admin_password": "hunter2"}
    key_id = "AKIA" + "ABCDEFGHIJKLMNOP"  # split so this file does not trip a repository-wide scan
    found = literal_secrets(f"aws_access_key_id = {key_id}\n", [leaky])
    assert len(found) == 5, found


# ---------------------------------------------------------------- image pins


def _dockerfile_args(path: Path) -> dict[str, str]:
    """ARG defaults; an ARG declared twice (before and after FROM) must say the same both times."""
    args: dict[str, set[str]] = {}
    for name, value in re.findall(r"^ARG (\w+)=\"?([^\"\n]+)\"?$", path.read_text(), re.MULTILINE):
        args.setdefault(name, set()).add(value)
    assert all(len(v) == 1 for v in args.values()), f"{path}: an ARG has two defaults: {args}"
    return {k: v.pop() for k, v in args.items()}


def test_gpu_image_pins_agree_with_pyproject():
    dockerfile = INFRA / "docker" / "Dockerfile"
    args = _dockerfile_args(dockerfile)
    text = dockerfile.read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-\$\{CUDA_TAG\}$", text, re.MULTILINE)
    assert args["RAY_VERSION"] == _pin("ray")
    assert Version(args["TORCH_VERSION"]) in _spec(PYPROJECT["project"]["dependencies"], "torch")
    make_torch = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == make_torch, "the image's torch is the one `make` tests with"
    assert Version(args["FLASH_ATTN_VERSION"]) in _spec(PYPROJECT["project"]["optional-dependencies"]["gpu"],
                                                        "flash-attn")
    py = re.fullmatch(r"py(\d)(\d+)", args["PYTHON_TAG"])
    assert Version(f"{py.group(1)}.{py.group(2)}") in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert re.fullmatch(r"cu\d{3}", args["CUDA_TAG"])
    assert '"/opt/athanor[gpu]"' in text, "the project is installed with its flash-attn extra"
    # Everything copied is in the repository (or fetched by `make data`) and let through the build's ignore file.
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    for src in re.findall(r"^COPY (?:--chown=\S+ )?(.+) \S+$", text, re.MULTILINE):
        for item in src.split():
            assert f"!{item}" in ignore, f"{item} is copied but not let through Dockerfile.dockerignore"
            if not item.startswith("data/"):
                assert (ROOT / item).exists(), item


def test_mlflow_image_pins_agree_with_pyproject():
    args = _dockerfile_args(INFRA / "mlflow" / "Dockerfile")
    assert args["MLFLOW_VERSION"] == _pin("mlflow")
    docs = [d for p in MLFLOW_K8S for d in _yaml_docs(p)]
    assert _container(docs, "Deployment", "mlflow")["image"].endswith(f"/athanor-mlflow:{_pin('mlflow')}")


def test_mlflow_server_uses_a_driver_the_image_installs():
    """SQLAlchemy picks the driver for a bare postgresql:// URI; the server image must ship that one."""
    from sqlalchemy.engine import make_url

    packages = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary"}
    text = (INFRA / "mlflow" / "Dockerfile").read_text()
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]
    backend = dict(i.split("=", 1) for i in compose["environment"] if "=" in i)["MLFLOW_BACKEND_STORE_URI"]
    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow" / "basic_auth.ini")
    for uri in (backend, ini["mlflow"]["database_uri"]):
        driver = make_url(uri).get_dialect().driver
        assert f'"{packages[driver]}' in text, f"{uri} needs {packages[driver]} in infra/mlflow/Dockerfile"


# ---------------------------------------------------------------- the MLflow server, run for real


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_server_runs_the_committed_config(tmp_path, monkeypatch):
    """`mlflow server` with compose's arguments and environment, the committed basic_auth.ini and the Kubernetes
    allowed-hosts list, artifacts in S3 (moto on loopback). Only the database differs: SQLite, as no PostgreSQL
    server ships with the test environment (the Postgres run is in the README's notes)."""
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    s3_url = "http://{}:{}".format(*moto.get_host_and_port())
    s3 = boto3.client("s3", endpoint_url=s3_url, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    s3.create_bucket(Bucket="athanor-runs")
    port = _free_port()
    secrets = {"MLFLOW_ADMIN_PASSWORD": secrets_token(), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets_token(),
               "MLFLOW_DB_PASSWORD": "unused-by-sqlite", "MLFLOW_ARTIFACTS_DESTINATION": "s3://athanor-runs/mlflow",
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "MLFLOW_S3_ENDPOINT_URL": s3_url}
    service = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    for item in service["environment"]:  # compose's substitution: ${VAR:?msg} must be given; bare names pass through
        name, _, value = item.partition("=")
        if value:
            env[name] = re.sub(r"\$\{(\w+)(:\?[^}]*)?\}", lambda m: secrets[m.group(1)], value)
        elif name in secrets:
            env[name] = secrets[name]
    ini = (INFRA / "mlflow" / "basic_auth.ini").read_text()
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "basic_auth.ini")
    auth_db = f"database_uri = sqlite:///{tmp_path}/auth.db"
    (tmp_path / "basic_auth.ini").write_text(re.sub(r"database_uri = .*", auth_db, ini))
    env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    deployment = _container([d for p in MLFLOW_K8S for d in _yaml_docs(p)], "Deployment", "mlflow")
    hosts = next(e["value"] for e in deployment["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS")
    env["MLFLOW_SERVER_ALLOWED_HOSTS"] = hosts.replace(":5000", f":{port}")
    args = list(service["command"])
    args[args.index("--host") + 1], args[args.index("--port") + 1] = "127.0.0.1", str(port)
    args[args.index("--workers") + 1] = "1"
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args], env=env, cwd=tmp_path,
                                  stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)

        def status(user=None, password=None, host=None) -> int:
            req = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1")
            if user:
                req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
            if host:
                req.add_header("Host", host)
            try:
                return urllib.request.urlopen(req, timeout=10).status
            except urllib.error.HTTPError as err:
                return err.code

        admin = secrets["MLFLOW_ADMIN_PASSWORD"]
        assert status() == 401
        assert status("admin", "wrong") == 401
        assert status("admin", admin) == 200
        assert status("admin", admin, host=f"mlflow.athanor.svc.cluster.local:{port}") == 200
        assert status("admin", admin, host=f"evil.example.com:{port}") == 403  # DNS-rebinding guard

        # A client with the tracking credentials and no bucket access: the artifact goes through the server to S3.
        for name in [n for n in os.environ if n.startswith(("AWS_", "MLFLOW_"))]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin)
        client = MlflowClient(base)
        run = client.create_run(client.create_experiment("infra-test"))
        client.log_metric(run.info.run_id, "loss", 2.5, step=1)
        (tmp_path / "report.txt").write_text("curation report")
        client.log_artifact(run.info.run_id, str(tmp_path / "report.txt"))
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="athanor-runs", Prefix="mlflow/").get("Contents", [])]
        assert keys == [f"mlflow/{run.info.experiment_id}/{run.info.run_id}/artifacts/report.txt"]
        assert client.get_metric_history(run.info.run_id, "loss")[0].value == 2.5
    finally:
        server.terminate()
        server.wait(30)
        moto.stop()

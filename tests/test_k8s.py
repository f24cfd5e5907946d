"""The Kubernetes manifests under docker/k8s, checked offline.

Each overlay is rendered (tests/kustomize_render.py; compared with `kubectl kustomize` where
kubectl is installed) from a copy of the tree whose secrets.env is the committed example.
Every resource is validated against the Kubernetes OpenAPI schemas that kubernetes-validate
ships, the KEDA ScaledObjects against the CRD's fields (tests/data), and the manifests
against the project itself: Dockerfiles, compose, settings classes, RQ's queue keys, the
gateway's routes and metrics, docker/redis.conf.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
from PIL import Image

from ddim_inversion.keys import queue_name_for
from tests.conftest import EVENT_GUARD_S, STOP_GUARD_S, free_port, wait_for
from tests.kustomize_render import render
from worker.rq_worker import SHUTDOWN_S

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")
promql = pytest.importorskip("promql_parser")

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "docker" / "k8s"
KEDA_SCHEMA = Path(__file__).parent / "data" / "keda_scaledobject.schema.json"
OVERLAYS = ("production", "external-redis", "scale-to-zero")
"""The shipped overlays, and production with components/scale-to-zero (built by the test)."""
MODEL_LABEL = "ddim-inversion.io/model"
"""The label naming the model a worker Deployment and its ScaledObject serve."""

K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
"""The oldest Kubernetes still widely run, and the newest the package knows."""


# -- rendering ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of docker/k8s with each overlay's secrets.env from its example, and a
    scale-to-zero overlay (production plus the component)."""
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("secrets.env"))
    for example in copy.glob("overlays/*/secrets.env.example"):
        shutil.copy(example, example.with_name("secrets.env"))
    zero = copy / "overlays" / "scale-to-zero"
    zero.mkdir()
    (zero / "kustomization.yaml").write_text(
        "resources: [../production]\ncomponents: [../../components/scale-to-zero]\n"
    )
    return copy


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(tree / "overlays" / overlay) for overlay in OVERLAYS}


def by_kind(resources: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind]


def one(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [r for r in by_kind(resources, kind) if r["metadata"]["name"] == name]
    return found


def component(resource: dict[str, Any]) -> str:
    return resource["metadata"]["labels"]["app.kubernetes.io/component"]


def pod_spec(resource: dict[str, Any]) -> dict[str, Any]:
    return resource["spec"]["template"]["spec"]


def workloads(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] in ("Deployment", "StatefulSet")]


def containers_of(resources: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return [
        c for w in workloads(resources) if component(w) == role for c in pod_spec(w)["containers"]
    ]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def key(resource: dict[str, Any]) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


kubectl = shutil.which("kubectl")


@pytest.mark.skipif(kubectl is None, reason="kubectl is not installed")
def test_the_renderer_agrees_with_kubectl_kustomize(tree: Path, rendered) -> None:
    for overlay in OVERLAYS:
        done = subprocess.run(
            [kubectl, "kustomize", str(tree / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=EVENT_GUARD_S,
        )
        assert done.returncode == 0, done.stderr
        real = {key(r): r for r in yaml.safe_load_all(done.stdout) if r}
        ours = {key(r): r for r in rendered[overlay]}
        assert ours == real, overlay


def test_every_overlay_has_the_whole_pool(rendered) -> None:
    for overlay, resources in rendered.items():
        kinds = {key(r) for r in resources}
        for wanted in (
            ("Namespace", "ddim-inversion"),
            ("Deployment", "gateway"),
            ("Service", "gateway"),
            ("HorizontalPodAutoscaler", "gateway"),
            ("Deployment", "worker-sd15"),
            ("ScaledObject", "worker-sd15"),
            ("Secret", "ddim-inversion"),
            ("ConfigMap", "redis-connection"),
            ("PersistentVolumeClaim", "model-cache"),
            ("NetworkPolicy", "default-deny-ingress"),
        ):
            assert wanted in kinds, f"{overlay}: {wanted} missing"
        in_cluster = ("StatefulSet", "redis") in kinds
        assert in_cluster == (overlay != "external-redis"), overlay
        for resource in resources:
            if resource["kind"] != "Namespace":
                assert resource["metadata"]["namespace"] == "ddim-inversion", key(resource)


# -- schemas ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_resource_validates_against_the_kubernetes_schemas(rendered, version: str) -> None:
    for overlay, resources in rendered.items():
        for resource in resources:
            if resource["apiVersion"].startswith("keda.sh/"):
                continue
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {key(resource)} on {version}: {exc.message}")


def test_the_schema_check_refuses_an_unknown_field(rendered) -> None:
    gateway = json.loads(json.dumps(one(rendered["production"], "Deployment", "gateway")))
    pod_spec(gateway)["containers"][0]["readinesProbe"] = pod_spec(gateway)["containers"][0].pop(
        "readinessProbe"
    )
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(gateway, K8S_VERSIONS[-1], strict=True)


def keda_errors(scaled: dict[str, Any]) -> list[str]:
    schema = json.loads(KEDA_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(scaled)]
    for trigger in scaled["spec"].get("triggers", []):
        known = schema["x-trigger-metadata"].get(trigger["type"])
        if known is None:
            errors.append(f"trigger type {trigger['type']} is not one this project uses")
            continue
        metadata = set(trigger["metadata"])
        errors += [
            f"{trigger['type']}: {k} missing" for k in known["required"] if k not in metadata
        ]
        unknown = metadata - set(known["required"]) - set(known["optional"])
        errors += [f"{trigger['type']}: unknown metadata {k}" for k in sorted(unknown)]
    return errors


def test_keda_objects_match_the_crd_fields(rendered) -> None:
    for overlay, resources in rendered.items():
        for scaled in by_kind(resources, "ScaledObject"):
            assert keda_errors(scaled) == [], overlay
        assert not [
            r
            for r in resources
            if r["apiVersion"].startswith("keda.sh/") and r["kind"] != "ScaledObject"
        ], "only ScaledObjects have a schema here"


def test_the_keda_check_refuses_misspelt_fields(rendered) -> None:
    scaled = json.loads(json.dumps(one(rendered["production"], "ScaledObject", "worker-sd15")))
    scaled["spec"]["minReplicaCont"] = scaled["spec"].pop("minReplicaCount")
    scaled["spec"]["triggers"][1]["metadata"]["listname"] = "rq:queue:inversions"
    errors = keda_errors(scaled)
    assert any("minReplicaCont" in e for e in errors)
    assert any("unknown metadata listname" in e for e in errors)


# -- images, commands, ports and settings against the project -----------------------------


def dockerfile(name: str) -> str:
    lines = [
        ln for ln in (ROOT / "docker" / name).read_text().splitlines() if not ln.startswith("#")
    ]
    return re.sub(r"\\\n", " ", "\n".join(lines))


def compose_services() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_images_commands_and_ports_match_the_dockerfiles_and_compose(rendered) -> None:
    services = compose_services()
    for overlay, resources in rendered.items():
        for role, docker in (("gateway", "gateway.Dockerfile"), ("worker", "worker.Dockerfile")):
            text = dockerfile(docker)
            assert services[role]["build"]["dockerfile"] == f"docker/{docker}"
            cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
            uid = int(re.search(r"^USER (\d+)", text, re.M).group(1))
            for workload in workloads(resources):
                if component(workload) != role:
                    continue
                spec = pod_spec(workload)
                assert spec["securityContext"]["runAsUser"] == uid, (overlay, role)
                (container,) = spec["containers"]
                assert container["image"] == services[role]["image"], (overlay, role)
                assert container.get("command", cmd) == cmd and "args" not in container
        (gateway,) = containers_of(resources, "gateway")
        exposed = int(re.search(r"^EXPOSE (\d+)", dockerfile("gateway.Dockerfile"), re.M).group(1))
        ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
        assert ports == {"http": exposed}
        assert env_of(gateway)["INVERSION_PORT"]["value"] == str(exposed)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert gateway[probe]["httpGet"]["port"] in ("http", exposed), probe
        service = one(resources, "Service", "gateway")
        assert service["spec"]["ports"][0]["targetPort"] in ("http", exposed)
        volume = re.search(r"^VOLUME (\S+)", dockerfile("worker.Dockerfile"), re.M).group(1)
        for worker in containers_of(resources, "worker"):
            assert volume in {m["mountPath"] for m in worker["volumeMounts"]}
            assert env_of(worker)["INVERSION_MODEL_CACHE_DIR"]["value"].startswith(volume + "/")
        for redis in containers_of(resources, "redis"):
            assert redis["image"] == services["redis"]["image"]


def settings_classes() -> dict[str, Any]:
    from service.settings import GatewaySettings
    from worker.settings import WorkerSettings

    return {"gateway": GatewaySettings, "worker": WorkerSettings}


def test_every_inversion_variable_is_a_field_of_its_process_settings(rendered) -> None:
    """Per container: a setting renamed or removed in the code fails here."""
    for role, cls in settings_classes().items():
        fields = {cls.model_config["env_prefix"] + name.upper() for name in cls.model_fields}
        for overlay, resources in rendered.items():
            for container in containers_of(resources, role):
                used = {n for n in env_of(container) if n.startswith("INVERSION_")}
                assert used, (overlay, role)
                assert used <= fields, (
                    f"{overlay} {role}: not {cls.__name__} fields: {used - fields}"
                )


def resolved_env(container: dict[str, Any], resources: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: references read from the
    rendered Secret and ConfigMaps, then `$(VAR)` expanded from variables defined before."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "valueFrom" in item:
            ((source, ref),) = item["valueFrom"].items()
            found = one(
                resources, "Secret" if source == "secretKeyRef" else "ConfigMap", ref["name"]
            )
            assert ref["key"] in found["data"], f"{item['name']}: {ref['name']} has no {ref['key']}"
            value = found["data"][ref["key"]]
            env[item["name"]] = (
                base64.b64decode(value).decode() if source == "secretKeyRef" else value
            )
        else:
            for name in re.findall(r"\$\((\w+)\)", item["value"]):
                assert name in env, f"{item['name']} uses $({name}) before it is defined"
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
    return env


def test_the_environment_resolves_and_validates_in_the_settings_classes(
    rendered, monkeypatch
) -> None:
    for overlay, resources in rendered.items():
        secret = one(resources, "Secret", "ddim-inversion")
        secret["data"]["api-key-hashes"] = base64.b64encode(b"a" * 64).decode()
        secret["data"]["redis-password"] = base64.b64encode(b"0f1e2d").decode()
        for role, cls in settings_classes().items():
            for container in containers_of(resources, role):
                env = resolved_env(container, resources)
                for name in [n for n in os.environ if n.startswith("INVERSION_")]:
                    monkeypatch.delenv(name)
                for name, value in env.items():
                    monkeypatch.setenv(name, value)
                settings = cls()
                address = env["REDIS_ADDRESS"]
                user = env["REDIS_USERNAME"]
                assert settings.redis_url == f"redis://{user}:0f1e2d@{address}/0", overlay
                if role == "gateway":
                    assert settings.api_key_hashes == ("a" * 64,)
                    assert settings.http_workers == 1
                else:
                    assert settings.device == "cuda" and settings.model


def test_volumes_name_existing_claims_and_config_maps(rendered) -> None:
    for overlay, resources in rendered.items():
        names = {key(r) for r in resources}
        for workload in workloads(resources):
            for volume in pod_spec(workload).get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    claim = volume["persistentVolumeClaim"]["claimName"]
                    assert ("PersistentVolumeClaim", claim) in names, (overlay, claim)
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in names, overlay


# -- gateway ------------------------------------------------------------------------------


def test_gateway_probes_use_the_health_routes_and_hpa_scales_it_on_cpu(rendered) -> None:
    from service.app import create_app

    routes = set(create_app().openapi()["paths"])
    for resources in rendered.values():
        (gateway,) = containers_of(resources, "gateway")
        assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert {"/readyz", "/healthz"} <= routes
        deployment = one(resources, "Deployment", "gateway")
        assert deployment["spec"]["replicas"] >= 2
        hpa = one(resources, "HorizontalPodAutoscaler", "gateway")
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "gateway",
        }
        assert hpa["spec"]["minReplicas"] >= 2
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert gateway["resources"]["requests"]["cpu"], "CPU utilisation needs a CPU request"
        selector = one(resources, "Service", "gateway")["spec"]["selector"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()


# -- workers and their scaling ------------------------------------------------------------


def test_workers_take_one_gpu_and_outlast_the_job_timeout(rendered) -> None:
    from service.settings import GatewaySettings

    for overlay, resources in rendered.items():
        (gateway,) = containers_of(resources, "gateway")
        timeout = int(
            env_of(gateway).get("INVERSION_JOB_TIMEOUT_S", {}).get("value")
            or GatewaySettings.model_fields["job_timeout_s"].default
        )
        for workload in workloads(resources):
            if component(workload) != "worker":
                continue
            (container,) = pod_spec(workload)["containers"]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            grace = pod_spec(workload)["terminationGracePeriodSeconds"]
            # A batch ends by its jobs' timeout, then the worker exits within SHUTDOWN_S.
            assert grace >= timeout + SHUTDOWN_S, f"{overlay}: a batch may run {timeout} s"
            assert "replicas" not in workload["spec"], "KEDA owns the replica count"


def rq_queue_key(name: str) -> str:
    """The Redis list RQ keeps the queue in, as the installed rq names it."""
    from rq import Queue

    return Queue(name, connection=redis_lib.Redis()).key


def exported_families() -> dict[str, set[str]]:
    """The gateway's /metrics families and their label names, rendered over FakeRedis."""
    import fakeredis
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import GatewayMetrics
    from service.settings import GatewaySettings

    connection = fakeredis.FakeRedis()
    settings = GatewaySettings(redis_url="redis://unused.invalid", default_model="m")
    text = GatewayMetrics().render(connection, settings).decode()
    families: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            families.setdefault(sample.name, set()).update(sample.labels)
    return families


def test_keda_triggers_follow_each_model_queue(rendered) -> None:
    families = exported_families()
    for overlay, resources in rendered.items():
        deployments = {r["metadata"]["name"]: r for r in by_kind(resources, "Deployment")}
        for scaled in by_kind(resources, "ScaledObject"):
            target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
            assert component(target) == "worker"
            (container,) = pod_spec(target)["containers"]
            env = env_of(container)
            queue = queue_name_for(
                env["INVERSION_MODEL_NAME"]["value"], env["INVERSION_QUEUE_NAME"]["value"]
            )
            triggers = {t["type"]: t["metadata"] for t in scaled["spec"]["triggers"]}
            assert set(triggers) == {"redis", "prometheus"}
            redis_trigger, prom = triggers["redis"], triggers["prometheus"]
            assert redis_trigger["listName"] == rq_queue_key(queue)
            assert redis_trigger["addressFromEnv"] in env
            assert redis_trigger["passwordFromEnv"] in env
            assert redis_trigger["usernameFromEnv"] in env
            assert redis_trigger["listLength"] == prom["threshold"], "one per-worker target"
            assert prom["ignoreNullValues"] == "false"
            expr = promql.parse(prom["query"])
            (selector,) = selectors(expr)
            assert selector.name in families, f"{selector.name} is not exported"
            assert {"queue", "model", "state"} <= families[selector.name]
            matchers = {m.name: m.value for m in selector.matchers.matchers}
            assert matchers == {"queue": queue}, "queued and running of this queue, no state"
            # Every gateway exports the same Redis-wide figure: max across them, never sum.
            assert isinstance(expr, promql.AggregateExpr) and str(expr.op) == "max"
            minimum = scaled["spec"]["minReplicaCount"]
            assert minimum == (0 if overlay == "scale-to-zero" else 1), overlay


def test_a_pool_at_zero_keeps_gateways_ready_and_a_new_job_wakes_it(
    rendered, processes, redis_client
) -> None:
    """What components/scale-to-zero needs of the gateway: with no worker alive, the
    readiness probe answers 200 (gateways stay in the Service), and a job submitted then
    lands in the list the ScaledObject's Redis trigger reads, which starts a worker. A real
    gateway process with the manifest's model settings, on a real Redis, no worker."""
    resources = rendered["scale-to-zero"]
    scaled_objects = by_kind(resources, "ScaledObject")
    assert len(scaled_objects) >= 2, "one per model"
    assert all(scaled["spec"]["minReplicaCount"] == 0 for scaled in scaled_objects)
    (gateway,) = containers_of(resources, "gateway")
    env = env_of(gateway)
    # A job that names no model goes to the default model's queue: its trigger must see it.
    (scaled,) = [
        scaled
        for scaled in scaled_objects
        if scaled["metadata"]["labels"][MODEL_LABEL] == env["INVERSION_DEFAULT_MODEL"]["value"]
    ]
    (trigger,) = [t["metadata"] for t in scaled["spec"]["triggers"] if t["type"] == "redis"]
    from_manifest = {
        name: env[name]["value"]
        for name in ("INVERSION_DEFAULT_MODEL", "INVERSION_QUEUE_NAME")
        if name in env
    }
    base = processes.gateway(**from_manifest)
    probe = httpx.get(base + gateway["readinessProbe"]["httpGet"]["path"])
    assert probe.status_code == 200, probe.text
    image = io.BytesIO()
    Image.new("RGB", (64, 64)).save(image, format="PNG")
    files = {"image": ("a.png", image.getvalue())}
    answer = httpx.post(base + "/v1/inversions", data={"prompt": "a cat"}, files=files)
    assert answer.status_code == 202, answer.text
    activation = int(trigger.get("activationListLength", "0"))
    assert redis_client.llen(trigger["listName"]) > activation


def selectors(expr: Any) -> list[Any]:
    found: list[Any] = []
    promql.walk(expr, lambda n: found.append(n) if isinstance(n, promql.VectorSelector) else None)
    return found


promtool = shutil.which("promtool")


@pytest.mark.skipif(promtool is None, reason="promtool is not installed")
def test_the_prometheus_trigger_counts_running_jobs_once_across_gateways(
    rendered, tmp_path: Path
) -> None:
    """The ScaledObject's query, evaluated by Prometheus' own engine: three gateways report
    the same Redis-wide figures; the pool owes 2 queued + 3 running jobs = 5, not 15 and
    not 2. Another queue's jobs do not count."""
    scaled = one(rendered["production"], "ScaledObject", "worker-sd15")
    (prom,) = [t["metadata"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    queue = prom["query"].split('queue="')[1].split('"')[0]
    series = []
    for gateway in ("gw-a", "gw-b", "gw-c"):
        for state, value in (("queued", 2), ("running", 3)):
            labels = f'instance="{gateway}",queue="{queue}",state="{state}"'
            series.append({"series": f"inversion_queue_jobs{{{labels}}}", "values": f"{value}x5"})
        labels = f'instance="{gateway}",queue="other-model",state="queued"'
        series.append({"series": f"inversion_queue_jobs{{{labels}}}", "values": "40x5"})
    rules = {"groups": [{"name": "keda", "rules": [{"record": "owed", "expr": prom["query"]}]}]}
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": "owed",
                        "eval_time": "2m",
                        "exp_samples": [{"labels": "owed", "value": 5}],
                    }
                ],
            }
        ],
    }
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "test.yml").write_text(yaml.safe_dump(tests))
    done = subprocess.run(
        [promtool, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- Redis --------------------------------------------------------------------------------


def directives(text: str) -> dict[str, str]:
    conf = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            conf[name.lower()] = value.strip()
    return conf


def test_redis_config_is_docker_redis_conf_and_its_address_this_namespace(rendered) -> None:
    for overlay in ("production", "scale-to-zero"):
        resources = rendered[overlay]
        config = one(resources, "ConfigMap", "redis-config")["data"]["redis.conf"]
        assert directives(config) == directives((ROOT / "docker" / "redis.conf").read_text())
        assert directives(config)["maxmemory-policy"] == "noeviction"
        assert directives(config)["appendonly"] == "yes"
        address = one(resources, "ConfigMap", "redis-connection")["data"]["address"]
        service = one(resources, "Service", "redis")
        host, port = address.rsplit(":", 1)
        # KEDA's operator resolves it from its own namespace: the full name is needed.
        namespace = service["metadata"]["namespace"]
        assert host == f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
        assert int(port) == service["spec"]["ports"][0]["port"]
        statefulset = one(resources, "StatefulSet", "redis")
        mounts = {m["mountPath"] for m in pod_spec(statefulset)["containers"][0]["volumeMounts"]}
        assert directives(config)["dir"] in mounts, "the AOF lives on the claimed volume"
        claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
        data_mount = [
            m
            for m in pod_spec(statefulset)["containers"][0]["volumeMounts"]
            if m["mountPath"] == directives(config)["dir"]
        ]
        assert data_mount[0]["name"] in claims


def test_the_redis_container_requires_its_password(rendered, tmp_path: Path) -> None:
    """The StatefulSet's own command, run with a real redis-server: it refuses to start
    without a password, and with one it admits only the service's ACL user."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    statefulset = one(rendered["production"], "StatefulSet", "redis")
    (container,) = pod_spec(statefulset)["containers"]
    config = one(rendered["production"], "ConfigMap", "redis-config")["data"]["redis.conf"]
    (mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config"]
    port = free_port()
    local = re.sub(r"^dir .*$", f"dir {tmp_path}", config, flags=re.M)
    local = re.sub(r"^port .*$", f"port {port}", local, flags=re.M)
    local = re.sub(r"^bind .*$", "bind 127.0.0.1", local, flags=re.M)
    local = re.sub(r"^maxmemory .*$", "maxmemory 64mb", local, flags=re.M)
    (tmp_path / "redis.conf").write_text(local)
    command = [
        part.replace(f"{mount}/redis.conf", str(tmp_path / "redis.conf"))
        for part in container["command"]
    ]

    refused = subprocess.run(
        command,
        env={"PATH": "/usr/bin:/bin", "REDIS_PASSWORD": ""},
        capture_output=True,
        text=True,
        timeout=EVENT_GUARD_S,
    )
    assert refused.returncode != 0
    assert "redis-password is empty" in refused.stderr

    server = subprocess.Popen(
        command,
        env={"PATH": "/usr/bin:/bin", "REDIS_PASSWORD": "s3cret"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        authed = redis_lib.Redis(port=port, username="inversion", password="s3cret")
        wait_for(authed.ping, EVENT_GUARD_S, "the redis container's server")
        with pytest.raises(redis_lib.AuthenticationError):
            redis_lib.Redis(port=port).ping()
        with pytest.raises(redis_lib.AuthenticationError):  # the default user is off
            redis_lib.Redis(port=port, password="s3cret").ping()
        assert authed.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert authed.config_get("appendonly") == {"appendonly": "yes"}
        authed.close()
    finally:
        server.terminate()
        server.wait(STOP_GUARD_S)


# -- network policies and pod security ----------------------------------------------------


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        value, op = labels.get(expression["key"]), expression["operator"]
        if op == "In" and value not in expression["values"]:
            return False
        if op == "NotIn" and value in expression["values"]:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
    return True


def ingress_allowed(
    policies: list[dict[str, Any]],
    pod: dict[str, str],
    peer: dict[str, str],
    peer_namespace: dict[str, str],
    same_namespace: bool,
    port: int,
) -> bool:
    """NetworkPolicy semantics: a pod selected by any ingress policy admits only what one
    of those policies' rules allows; a pod selected by none admits everything."""
    applying = [
        p
        for p in policies
        if selects(p["spec"]["podSelector"], pod) and "Ingress" in p["spec"]["policyTypes"]
    ]
    if not applying:
        return True
    for policy in applying:
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for source in peers:
                if "namespaceSelector" in source:
                    ok = selects(source["namespaceSelector"], peer_namespace)
                else:
                    ok = same_namespace
                if ok and selects(source.get("podSelector"), peer):
                    return True
    return False


def labels_of(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def test_only_gateways_workers_and_keda_reach_redis(rendered) -> None:
    resources = rendered["production"]
    policies = by_kind(resources, "NetworkPolicy")
    redis = labels_of(one(resources, "StatefulSet", "redis"))
    gateway = labels_of(one(resources, "Deployment", "gateway"))
    worker = labels_of(one(resources, "Deployment", "worker-sd15"))
    namespace = {"kubernetes.io/metadata.name": "ddim-inversion"}
    keda = {"kubernetes.io/metadata.name": "keda"}

    def reaches(peer, peer_ns=namespace, port=6379, target=redis) -> bool:
        return ingress_allowed(policies, target, peer, peer_ns, peer_ns == namespace, port)

    assert reaches(gateway) and reaches(worker)
    assert reaches({"app.kubernetes.io/name": "keda-operator"}, keda)
    assert not reaches({"app": "debug-shell"})
    assert not reaches({"app.kubernetes.io/name": "ddim-inversion"})  # no component
    assert not reaches(gateway, {"kubernetes.io/metadata.name": "other"})
    assert not reaches({"app.kubernetes.io/name": "keda-operator"}, namespace)
    assert not reaches({"app.kubernetes.io/name": "keda-operator", "x": "y"}, {"name": "keda"})
    # Gateways take HTTP from anywhere; workers take nothing.
    anyone, elsewhere = {"app": "ingress-nginx"}, {"kubernetes.io/metadata.name": "ingress"}
    assert ingress_allowed(policies, gateway, anyone, elsewhere, False, 8000)
    assert not ingress_allowed(policies, gateway, anyone, elsewhere, False, 6379)
    assert not ingress_allowed(policies, worker, gateway, namespace, True, 8000)


def test_the_policy_evaluator_sees_a_missing_deny() -> None:
    """Without the namespace's default deny, a worker admits anyone: the test above
    depends on that policy, and would fail without it."""
    assert ingress_allowed([], {"a": "b"}, {"c": "d"}, {}, True, 1234)


def test_every_pod_meets_the_restricted_pod_security_standard(rendered) -> None:
    for resources in rendered.values():
        namespace = one(resources, "Namespace", "ddim-inversion")
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        for workload in workloads(resources):
            spec = pod_spec(workload)
            pod_security = spec.get("securityContext", {})
            assert pod_security.get("runAsNonRoot") is True, key(workload)
            assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault"
            assert spec.get("automountServiceAccountToken") is False, key(workload)
            for container in spec["containers"]:
                security = container["securityContext"]
                assert security["allowPrivilegeEscalation"] is False, key(workload)
                assert security["capabilities"]["drop"] == ["ALL"], key(workload)
                assert "add" not in security["capabilities"]
                assert "privileged" not in security
            for volume in spec.get("volumes", []):
                assert "hostPath" not in volume, key(workload)

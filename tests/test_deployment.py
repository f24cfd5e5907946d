"""Static checks of the container deployment: no Docker engine needed, fast.

The compose files, Dockerfiles and redis.conf are read as text/YAML and checked against the
project: the files they reference exist, the gateway image stays free of torch, every
`INVERSION_*` variable they set is a real settings field, the CPU override really drops
the GPU reservation and binds the auth-less gateway to this host (merged here the way
`docker compose -f a -f b` merges, `!reset`, `!override` and merged port lists included),
Redis admits only its password-protected ACL user and every Redis URL carries it.
tests/e2e/test_redis_acl.py runs that ACL on a real redis-server.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from tests.compose_files import (
    COMPOSE,
    COMPOSE_CPU,
    GATEWAY_DOCKERFILE,
    REDIS_CONF,
    REDIS_START,
    ROOT,
    WORKER_DOCKERFILE,
    environment,
    load_compose,
    merge,
)
from tests.conftest import EVENT_GUARD_S

REDIS_USER = "inversion"
"""The ACL user of the service in compose's Redis."""
PASSWORD_VARIABLE = "REDIS_PASSWORD"

HEAVY = ("torch", "diffusers", "transformers")

PENDING_SETTINGS: set[str] = set()
"""Set in docker-compose.yml ahead of its settings field (GatewaySettings.gateway_workers,
the number of uvicorn processes). Remove from here once the field exists."""


def published_ports(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each published port; "" = every address."""
    found = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            found.append(
                (
                    str(entry.get("host_ip", "")),
                    str(entry.get("published", "")),
                    str(entry["target"]),
                )
            )
            continue
        parts = str(entry).rsplit(":", 2)
        parts = [""] * (3 - len(parts)) + parts
        found.append((parts[0].strip("[]"), parts[1], parts[2]))
    return found


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = service.get("deploy") or {}
    return ((deploy.get("resources") or {}).get("reservations") or {}).get("devices") or []


def dockerfile_instructions(path: Path) -> str:
    """The Dockerfile without comments, continuation lines joined."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    return re.sub(r"\\\n", " ", "\n".join(lines))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_cpu(compose: dict[str, Any]) -> dict[str, Any]:
    return merge(compose, load_compose(COMPOSE_CPU))


# -- compose files --------------------------------------------------------------------------


def test_compose_files_parse_and_reference_existing_dockerfiles(
    compose: dict[str, Any], compose_cpu: dict[str, Any]
) -> None:
    assert {"redis", "gateway", "worker", "rq-dashboard"} <= set(compose["services"])
    for merged in (compose, compose_cpu):
        for name, service in merged["services"].items():
            build = service.get("build")
            if build is None:
                continue
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build["dockerfile"]
            assert (context / dockerfile).is_file(), f"{name}: {dockerfile} does not exist"


def test_services_scale_without_fixed_names(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert "container_name" not in service, f"{name} has a container_name"
    assert "ports" not in compose["services"]["worker"], "workers must scale: no host ports"
    assert "ports" not in compose["services"]["redis"], "redis must stay on the private network"


def required_variable(value: str) -> str:
    """The name in a compose `${NAME:?message}` reference (compose then refuses to start
    without it); fails unless the value is exactly such a reference."""
    match = re.fullmatch(r"\$\{([A-Z0-9_]+):\?[^}]+\}", value)
    assert match, f"{value!r} is not a required ${{VAR:?message}} reference"
    return match.group(1)


def test_redis_service(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    mounts = [str(v) for v in redis["volumes"]]
    for source, target in (
        ("./docker/redis.conf", "/usr/local/etc/redis/redis.conf"),
        ("./docker/redis-start.sh", "/usr/local/etc/redis/start.sh"),
    ):
        assert f"{source}:{target}:ro" in mounts, f"{source} is mounted read-only"
        assert (ROOT / source).is_file()
    assert redis["command"] == ["sh", "/usr/local/etc/redis/start.sh"]
    data = [m for m in mounts if m.split(":")[1:2] == ["/data"]]
    assert data and data[0].split(":")[0] in compose["volumes"], "/data is a named volume"


def test_redis_requires_the_password_of_the_service_user(compose: dict[str, Any]) -> None:
    """The default user is off; the one user has the password of REDIS_PASSWORD, required."""
    redis = compose["services"]["redis"]
    assert required_variable(environment(redis)[PASSWORD_VARIABLE]) == PASSWORD_VARIABLE
    conf = [line.split() for line in REDIS_CONF.read_text().splitlines()]
    assert ["user", "default", "off"] in conf, "redis.conf admits no password-less client"
    assert not any(words[:1] == ["requirepass"] for words in conf)

    script = REDIS_START.read_text()
    assert re.search(rf'^: "\$\{{{PASSWORD_VARIABLE}:\?[^}}]+\}}"$', script, re.M)
    assert re.search(rf"printf '%s' \"\${PASSWORD_VARIABLE}\" \| sha256sum", script)
    command = dockerfile_instructions(REDIS_START).split("exec ", 1)[1]
    words = command.replace("\n", " ").split()
    assert words[:3] == ["docker-entrypoint.sh", "redis-server", "/usr/local/etc/redis/redis.conf"]
    user = words[words.index("--user") :]
    assert user[1:4] == [REDIS_USER, "on", '"#$hash"'], "on, with the password's hash only"
    assert "'-@dangerous'" in user and "'+@all'" in user

    probe = " ".join(redis["healthcheck"]["test"])
    assert f'REDISCLI_AUTH="$${PASSWORD_VARIABLE}"' in probe
    assert f"--user {REDIS_USER} ping" in probe and "grep -q PONG" in probe


def test_every_redis_url_carries_the_service_user_and_the_password(
    compose: dict[str, Any], compose_cpu: dict[str, Any]
) -> None:
    urls = 0
    for merged in (compose, compose_cpu):
        for name, service in merged["services"].items():
            env = environment(service)
            for var in ("INVERSION_REDIS_URL", "RQ_DASHBOARD_REDIS_URL"):
                if var not in env:
                    continue
                urls += 1
                url = env[var]
                match = re.fullmatch(r"redis://([^:@/]+):(\$\{[^}]+\})@redis:6379/0", url)
                assert match, f"{name}: {var}={url!r} does not name user and password"
                assert match.group(1) == REDIS_USER, f"{name}: not the ACL user"
                assert required_variable(match.group(2)) == PASSWORD_VARIABLE, name
    assert urls == 8, "gateway, two workers (one per model) and dashboard, in both files"


def test_published_ports_bind_this_host_where_nothing_else_guards_them(
    compose: dict[str, Any], compose_cpu: dict[str, Any]
) -> None:
    # The dashboard has no login and can delete jobs: this host only, and only on request.
    dashboard = compose["services"]["rq-dashboard"]
    assert published_ports(dashboard) == [("127.0.0.1", "9181", "9181")]
    # The base gateway needs API keys and may face the network...
    gateway = compose["services"]["gateway"]
    assert published_ports(gateway) == [("", "8000", "8000")]
    assert "INVERSION_AUTH_DISABLED" not in environment(gateway)
    # ... the CPU override's has auth off: this host only, with no all-interfaces entry left.
    cpu_gateway = compose_cpu["services"]["gateway"]
    assert environment(cpu_gateway)["INVERSION_AUTH_DISABLED"] == "true"
    assert published_ports(cpu_gateway) == [("127.0.0.1", "8000", "8000")]
    for merged in (compose, compose_cpu):
        for name in ("redis", "worker"):
            assert published_ports(merged["services"][name]) == [], f"{name} publishes a port"


def test_the_merge_appends_ports_as_compose_does(compose: dict[str, Any]) -> None:
    """Without `!override`, an override's port would be added beside the base file's."""
    plain = {"services": {"gateway": {"ports": ["127.0.0.1:8000:8000"]}}}
    ports = published_ports(merge(compose, plain)["services"]["gateway"])
    assert ports == [("", "8000", "8000"), ("127.0.0.1", "8000", "8000")]


def test_gateway_service(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    assert gateway["build"]["dockerfile"] == "docker/gateway.Dockerfile"
    assert any(str(p).endswith(":8000") for p in gateway["ports"])
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_has_a_gpu_in_the_base_file_and_none_with_the_cpu_override(
    compose: dict[str, Any], compose_cpu: dict[str, Any]
) -> None:
    worker = compose["services"]["worker"]
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    devices = gpu_devices(worker)
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["count"] == 1
    assert devices[0]["capabilities"] == ["gpu"]
    env = environment(worker)
    assert env["INVERSION_MODEL"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert any(str(v).endswith(":/cache") for v in worker["volumes"])

    cpu_worker = compose_cpu["services"]["worker"]
    assert gpu_devices(cpu_worker) == []
    cpu_env = environment(cpu_worker)
    assert cpu_env["INVERSION_MODEL"] == "tiny"
    assert cpu_env["INVERSION_DEVICE"] == "cpu"
    assert cpu_env["INVERSION_REDIS_URL"] == env["INVERSION_REDIS_URL"], "kept from the base"
    assert cpu_worker["build"]["args"]["BASE_IMAGE"].startswith("python:3.11")
    assert cpu_worker["image"] != worker["image"], "CPU and CUDA images must not share a tag"


def test_dashboard_is_behind_a_profile(compose: dict[str, Any]) -> None:
    dashboard = compose["services"]["rq-dashboard"]
    assert dashboard["profiles"] == ["dashboard"]
    assert "RQ_DASHBOARD_REDIS_URL" in environment(dashboard)


# -- Dockerfiles and redis.conf -------------------------------------------------------------


def test_gateway_dockerfile_installs_the_gateway_extra_only() -> None:
    text = dockerfile_instructions(GATEWAY_DOCKERFILE)
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"pip install [^\n]*\"\.\[gateway\]\"", text)
    for word in ("torch", "diffusers", "transformers", "[worker]", ".[gateway,"):
        assert word not in text, f"the gateway image mentions {word}"
    assert re.search(r"^COPY worker\b", text, re.M) is None, "the worker package is not needed"
    assert re.search(r"^USER (?!root\b|0\b)\S+", text, re.M), "runs as a non-root user"
    assert re.search(r"^EXPOSE 8000\b", text, re.M)
    assert re.search(r"^HEALTHCHECK .*127\.0\.0\.1:8000/healthz", text, re.M)
    assert re.search(r'^CMD \["ddim-invert", "gateway"\]', text, re.M)


def test_worker_dockerfile_installs_the_worker_extra_keeping_the_image_torch() -> None:
    text = dockerfile_instructions(WORKER_DOCKERFILE)
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:\S*cuda", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    assert re.search(r"pip install [^\n]*--constraint \S+ \"\.\[worker\]\"", text)
    assert re.search(r"^ARG TORCH_CPU_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert '--index-url "${TORCH_CPU_INDEX}"' in text, "a CPU base gets the CPU build of torch"
    assert re.search(r"^USER (?!root\b|0\b)\S+", text, re.M), "runs as a non-root user"
    assert re.search(r"HF_HOME=/cache/huggingface", text)
    assert re.search(r"^VOLUME /cache\b", text, re.M)
    assert re.search(r'^CMD \["ddim-invert", "worker"\]', text, re.M)


SHARED_PACKAGES = ("ddim_inversion", "ddim_inversion_cli")
"""What both images need besides their room: the shared package and the `ddim-invert` CLI."""


def test_both_images_get_the_shared_packages_and_their_room() -> None:
    """A package left out of an image fails only when the container starts."""
    for dockerfile, room in ((GATEWAY_DOCKERFILE, "service"), (WORKER_DOCKERFILE, "worker")):
        text = dockerfile_instructions(dockerfile)
        copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.M))
        assert copied == {*SHARED_PACKAGES, room}, dockerfile.name
        ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
        for package in (*SHARED_PACKAGES, room):
            assert f"!{package}" in ignore, f"{dockerfile.name}.dockerignore drops {package}"


def test_redis_conf_persists_and_never_evicts() -> None:
    conf: dict[str, str] = {}
    for line in REDIS_CONF.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            conf[key.lower()] = value.strip()
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    assert conf["dir"] == "/data"


# -- settings names -------------------------------------------------------------------------


def _setting_env_names() -> set[str]:
    from worker.settings import WorkerSettings

    try:
        from service.settings import GatewaySettings
    except ImportError:  # pragma: no cover - the gateway is written concurrently
        pytest.skip("service/settings.py is not there yet")
    names: set[str] = set()
    for cls in (WorkerSettings, GatewaySettings):
        prefix = cls.model_config.get("env_prefix", "")
        assert prefix == "INVERSION_"
        names |= {prefix + field.upper() for field in cls.model_fields}
    return names


def test_every_inversion_variable_is_a_settings_field(
    compose: dict[str, Any], compose_cpu: dict[str, Any]
) -> None:
    used: dict[str, str] = {}
    for label, merged in (("docker-compose.yml", compose), ("+cpu override", compose_cpu)):
        for name, service in merged["services"].items():
            for var in environment(service):
                if var.startswith("INVERSION_"):
                    used[var] = f"{label}: {name}"
    for path in (GATEWAY_DOCKERFILE, WORKER_DOCKERFILE):
        for var in re.findall(r"\bINVERSION_[A-Z0-9_]+", dockerfile_instructions(path)):
            used[var] = path.name
    assert used, "no INVERSION_* variable found: the parsing is broken"
    known = _setting_env_names()
    unknown = {var: where for var, where in used.items() if var not in known | PENDING_SETTINGS}
    assert not unknown, f"not a WorkerSettings/GatewaySettings field: {unknown}"


# -- the gateway stays light ----------------------------------------------------------------


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_gateway_extra_has_no_heavy_dependency() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    for requirement in extras["gateway"]:
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()
        assert name not in HEAVY, f"the gateway extra pulls {requirement}"


def _third_party_imports(paths: list[Path]) -> set[str]:
    local = {"service", "worker", "ddim_inversion_client", *SHARED_PACKAGES}
    modules: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in local and m not in sys.stdlib_module_names}


def _installable_closure(requirements: list[str]) -> set[str]:
    """Distribution names the requirements install, following installed metadata."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(
                sub.marker.evaluate({"extra": extra}) for extra in {"", *req.extras}
            ):
                todo.append(sub)
    return {key.split("[")[0] for key in seen}


def test_gateway_imports_are_installed_by_base_and_gateway_deps() -> None:
    """What the gateway image installs (base deps + `gateway` extra) covers service/'s imports."""
    from packaging.utils import canonicalize_name

    project = _pyproject()["project"]
    files = [
        path for package in ("service", *SHARED_PACKAGES) for path in (ROOT / package).rglob("*.py")
    ]
    imports = _third_party_imports(files)
    providers = importlib.metadata.packages_distributions()
    installed = _installable_closure(
        project["dependencies"] + project["optional-dependencies"]["gateway"]
    )
    missing = {}
    for module in sorted(imports):
        dists = {canonicalize_name(d) for d in providers.get(module, [module])}
        if not dists & installed:
            missing[module] = sorted(dists)
    assert not missing, (
        f"service/ imports modules the gateway image does not install: {missing}; "
        "add them to the `gateway` extra (or the base dependencies) in pyproject.toml"
    )
    assert not imports & set(HEAVY), f"service/ imports {imports & set(HEAVY)}"


def test_create_app_imports_no_torch_in_a_fresh_process() -> None:
    if not (ROOT / "service" / "app.py").is_file():
        pytest.skip("service/app.py is not there yet")
    code = (
        "import sys\n"
        "from service.app import create_app\n"
        "create_app()\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=EVENT_GUARD_S,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importing the gateway loaded {done.stdout.strip()}"


def test_the_client_installs_alone_without_torch_fastapi_or_redis() -> None:
    """`pip install ddim-inversion-service` (no extra) is the Python client: the base
    dependencies cover what ddim_inversion_client and ddim_inversion import at module level,
    and pull nothing heavy, no web framework and no Redis."""
    from packaging.utils import canonicalize_name

    base = _installable_closure(_pyproject()["project"]["dependencies"])
    assert not base & {canonicalize_name(n) for n in (*HEAVY, "fastapi", "redis", "rq")}, base
    files = [
        path
        for package in ("ddim_inversion", "ddim_inversion_client")
        for path in (ROOT / package).rglob("*.py")
    ]
    top_level = {
        alias.name.split(".")[0] if isinstance(node, ast.Import) else (node.module or "")
        for path in files
        for node in ast.parse(path.read_text()).body
        if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "level", 0) == 0
        for alias in node.names
    }
    top_level = {name.split(".")[0] for name in top_level}
    local = {"ddim_inversion", "ddim_inversion_client", "__future__"}
    providers = importlib.metadata.packages_distributions()
    missing = {
        module
        for module in top_level - local - set(sys.stdlib_module_names)
        if not {canonicalize_name(d) for d in providers.get(module, [module])} & base
    }
    assert not missing, f"the client imports {missing} at module level without installing it"

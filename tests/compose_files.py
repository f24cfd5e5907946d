"""The compose files and Redis configuration of the deployment, read the way
`docker compose` reads them: YAML with compose's `!reset` and `!override` tags, merged as
`docker compose -f a -f b` merges. Shared by the static deployment checks
(tests/test_deployment.py) and the Redis ACL test on a real server (tests/e2e/test_redis_acl.py).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
GATEWAY_DOCKERFILE = DOCKER / "gateway.Dockerfile"
WORKER_DOCKERFILE = DOCKER / "worker.Dockerfile"
REDIS_CONF = DOCKER / "redis.conf"
REDIS_START = DOCKER / "redis-start.sh"


# -- YAML with compose's merge tags ---------------------------------------------------------


class _Reset:
    """`!reset`: the override removes the attribute from the merged file."""


RESET = _Reset()


class _Override:
    """`!override VALUE`: the override replaces the attribute instead of merging into it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct_reset(loader: yaml.SafeLoader, node: yaml.Node) -> _Reset:
    return RESET


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> _Override:
    if isinstance(node, yaml.MappingNode):
        return _Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return _Override(loader.construct_sequence(node, deep=True))
    return _Override(loader.construct_scalar(node))


ComposeLoader.add_constructor("!reset", _construct_reset)
ComposeLoader.add_constructor("!override", _construct_override)


def load_compose(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=ComposeLoader)
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


REPLACED_SEQUENCES = {"command", "entrypoint", "test"}
"""Lists an override replaces; compose appends to every other one (ports, volumes, ...)."""


def merge(base: Any, override: Any, key: str = "") -> Any:
    """A deep merge like compose's: mappings merge, most lists append, scalars are replaced."""
    if isinstance(override, _Override):
        return copy.deepcopy(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for name, value in override.items():
            if value is RESET:
                merged.pop(name, None)
            elif name in merged:
                merged[name] = merge(merged[name], value, name)
            else:
                merged[name] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED_SEQUENCES:
        return copy.deepcopy(base) + [v for v in copy.deepcopy(override) if v not in base]
    return copy.deepcopy(override)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}

"""Render the kustomizations under docker/k8s without a kustomize binary.

Only the features docker/k8s uses are implemented, the way kustomize applies them:
`resources` (files and folders), `components`, `secretGenerator` (env files, no hash
suffix), `patches` (strategic merge, by name or by `target`), `configurations`
(nameReference), `nameSuffix` and `namespace`. Any other field is refused, so that a
manifest using a feature this renderer does not know fails loudly instead of rendering
wrong. tests/test_k8s.py compares its output with `kubectl kustomize` where kubectl exists.
"""

from __future__ import annotations

import base64
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KNOWN_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "secretGenerator",
    "patches",
    "configurations",
    "nameSuffix",
    "namespace",
}

CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole"}
"""Kinds `namespace:` leaves alone."""

MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
"""List fields of the built-in workload kinds that a strategic merge merges by key (from
Kubernetes' patchMergeKey); every other list, and every list of a custom resource, is
replaced whole."""

BUILTIN_GROUPS = {"v1", "apps/v1", "batch/v1", "autoscaling/v2", "policy/v1"}
"""apiVersions whose kinds kustomize knows the merge keys of."""


class KustomizeError(ValueError):
    """A kustomization this renderer cannot render faithfully."""


@dataclass
class Rendered:
    resources: list[dict[str, Any]] = field(default_factory=list)
    name_references: list[dict[str, Any]] = field(default_factory=list)


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources `kubectl kustomize DIRECTORY` would print."""
    return _build(directory, expected_kind="Kustomization").resources


def _load(directory: Path) -> dict[str, Any]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN_FIELDS
    if unknown:
        raise KustomizeError(f"{directory}: fields this renderer does not know: {sorted(unknown)}")
    return spec


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _build(directory: Path, expected_kind: str) -> Rendered:
    spec = _load(directory)
    if spec.get("kind", "Kustomization") != expected_kind:
        raise KustomizeError(f"{directory} is a {spec.get('kind')}, not a {expected_kind}")
    out = Rendered()
    for config in spec.get("configurations", []):
        out.name_references += yaml.safe_load((directory / config).read_text())["nameReference"]
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            child = _build(path, "Kustomization")
            out.resources += child.resources
            out.name_references += child.name_references
        else:
            out.resources += _documents(path)
    for generator in spec.get("secretGenerator", []):
        out.resources.append(_secret(directory, generator))
    for entry in spec.get("components", []):
        component = _build((directory / entry).resolve(), "Component")
        out.resources += component.resources
        out.name_references += component.name_references
        _apply_patches(directory / entry, _load(directory / entry), out.resources)
    if expected_kind == "Component":
        if {"nameSuffix", "namespace"} & set(spec):
            raise KustomizeError(f"{directory}: a component here only adds and patches")
        return out  # its patches apply to the kustomization that includes it (above)
    _apply_patches(directory, spec, out.resources)
    if "nameSuffix" in spec:
        _rename(out, spec["nameSuffix"])
    if "namespace" in spec:
        for resource in out.resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = spec["namespace"]
    return out


def _secret(directory: Path, generator: dict[str, Any]) -> dict[str, Any]:
    if set(generator) - {"name", "envs", "options"} or generator.get("options") != {
        "disableNameSuffixHash": True
    }:
        raise KustomizeError(f"secretGenerator {generator['name']}: only envs, without hash")
    data = {}
    for env_file in generator["envs"]:
        for line in (directory / env_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                data[key] = base64.b64encode(value.encode()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": generator["name"]},
        "type": "Opaque",
        "data": data,
    }


def _apply_patches(directory: Path, spec: dict[str, Any], resources: list[dict[str, Any]]) -> None:
    for entry in spec.get("patches", []):
        if set(entry) - {"path", "target"}:
            raise KustomizeError(f"{directory}: patches support path and target only")
        for patch in _documents(directory / entry["path"]):
            targets = [r for r in resources if _matches(r, patch, entry.get("target"))]
            if not targets:
                raise KustomizeError(f"{directory}: patch {entry} matches no resource")
            for resource in targets:
                patched = _merge(resource, patch, builtin=resource["apiVersion"] in BUILTIN_GROUPS)
                if entry.get("target") is not None:
                    patched["metadata"]["name"] = resource["metadata"]["name"]
                resource.clear()
                resource.update(patched)


def _matches(resource: dict[str, Any], patch: dict[str, Any], target: Any) -> bool:
    if target is None:
        return (
            resource["kind"] == patch["kind"]
            and resource["metadata"]["name"] == patch["metadata"]["name"]
        )
    if set(target) - {"kind", "name"}:
        raise KustomizeError(f"patch target {target}: kind and name only")
    return all(
        (resource["kind"] if key == "kind" else resource["metadata"]["name"]) == value
        for key, value in target.items()
    )


def _merge(base: Any, patch: Any, builtin: bool, key: str = "") -> Any:
    """A strategic merge patch: maps merge, keyed lists merge by key, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for name, value in patch.items():
            if value is None or name.startswith("$"):
                raise KustomizeError(f"{name}: deletions and directives are not supported")
            merged[name] = _merge(base[name], value, builtin, name) if name in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and builtin and key in MERGE_KEYS:
        merge_key = MERGE_KEYS[key]
        by_key = {item[merge_key]: item for item in base}
        added = [copy.deepcopy(item) for item in patch if item[merge_key] not in by_key]
        patches = {item[merge_key]: item for item in patch}
        kept = [
            _merge(item, patches[item[merge_key]], builtin) if item[merge_key] in patches else item
            for item in base
        ]
        return added + kept  # kustomize puts the patch's new items first
    return copy.deepcopy(patch)


def _rename(rendered: Rendered, suffix: str) -> None:
    renamed: dict[tuple[str, str], str] = {}
    for resource in rendered.resources:
        old = resource["metadata"]["name"]
        resource["metadata"]["name"] = old + suffix
        renamed[(resource["kind"], old)] = old + suffix
    for reference in rendered.name_references:
        for spec in reference["fieldSpecs"]:
            for resource in rendered.resources:
                if resource["kind"] != spec["kind"]:
                    continue
                *parents, leaf = spec["path"].split("/")
                node = resource
                for part in parents:
                    node = node.get(part, {})
                new = renamed.get((reference["kind"], node.get(leaf)))
                if new is not None:
                    node[leaf] = new

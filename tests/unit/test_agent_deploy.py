"""The deployment files, offline: every Kubernetes manifest valid against the Kubernetes schemas
(kubernetes-validate, strict), the kustomization complete, and the configuration they ship a valid agent
configuration that requires its token, the same in the image and in the ConfigMap."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from bpfscope.agent.config import parse_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
VERSION = "1.37.0"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_are_valid_kubernetes(path: Path) -> None:
    for document in documents(path):
        kubernetes_validate.validate(document, VERSION, strict=True)
        if document["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert document["metadata"]["namespace"] == "bpfscope", path


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = documents(KUBERNETES / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]
    assert kustomization["namespace"] == "bpfscope"


def test_the_shipped_configuration_is_the_agents() -> None:
    image = (DEPLOY / "agent.yaml").read_text()
    (configmap,) = documents(KUBERNETES / "configmap.yaml")
    assert configmap["data"]["agent.yaml"] == image
    config = parse_config(image, "deploy/agent.yaml")
    assert not config.loopback and config.token_file == "/etc/bpfscope/token/token"
    (daemonset,) = documents(KUBERNETES / "daemonset.yaml")
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert container["command"][-1] == f"{mounts['config']}/agent.yaml"
    assert config.token_file.startswith(mounts["token"] + "/")
    assert config.store.path.startswith(mounts["store"])
    assert container["ports"][0]["containerPort"] == config.host_port[1]
    assert pod["hostPID"] and pod["serviceAccountName"] == "bpfscope-agent"

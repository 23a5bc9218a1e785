"""deploy/kserve: the ServingRuntime and InferenceService examples are valid and keep the rules.

The ``kserve`` SDK is not a dependency (it pulls pandas, kubernetes and a model server), so the
manifests are checked against the CRD field names of its generated models (kserve 0.21.0:
V1alpha1ServingRuntime/Spec, V1alpha1SupportedModelFormat, V1beta1InferenceService/Spec,
V1beta1PredictorSpec, V1beta1ModelSpec, V1beta1ModelFormat; Kubernetes core/v1 for the
container): every key must be a field of its type, with the type's value kind. The runtime's
``args`` are parsed by the real ``trtpipe serve`` command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

KSERVE = Path(__file__).resolve().parents[2] / "deploy" / "kserve"

# type name -> {camelCase field: value type}; value types: str, int, bool, map (string map),
# another type name, or [type] for a list. Only the types these manifests use are spelled out.
SCHEMA: dict[str, dict[str, Any]] = {
    "ServingRuntime": {
        "apiVersion": "str",
        "kind": "str",
        "metadata": "ObjectMeta",
        "spec": "ServingRuntimeSpec",
        "status": "any",
    },
    "InferenceService": {
        "apiVersion": "str",
        "kind": "str",
        "metadata": "ObjectMeta",
        "spec": "InferenceServiceSpec",
        "status": "any",
    },
    "ObjectMeta": {"name": "str", "namespace": "str", "annotations": "map", "labels": "map"},
    "ServingRuntimeSpec": {
        **{k: "any" for k in ("affinity", "builtInAdapter", "imagePullSecrets", "tolerations")},
        **{k: "any" for k in ("resourceClaims", "storageHelper", "volumes", "workerSpec")},
        "annotations": "map",
        "containers": ["Container"],
        "disabled": "bool",
        "grpcDataEndpoint": "str",
        "grpcEndpoint": "str",
        "hostIPC": "bool",
        "httpDataEndpoint": "str",
        "labels": "map",
        "multiModel": "bool",
        "nodeSelector": "map",
        "protocolVersions": ["str"],
        "replicas": "int",
        "schedulerName": "str",
        "supportedModelFormats": ["SupportedModelFormat"],
    },
    "SupportedModelFormat": {
        "autoSelect": "bool",
        "name": "str",
        "priority": "int",
        "version": "str",
    },
    "InferenceServiceSpec": {
        "canary": "any",
        "explainer": "any",
        "predictor": "PredictorSpec",
        "tracing": "any",
        "transformer": "any",
    },
    "PredictorSpec": {
        "annotations": "map",
        "labels": "map",
        "containerConcurrency": "int",
        "canaryTrafficPercent": "int",
        "maxReplicas": "int",
        "minReplicas": "int",
        "model": "ModelSpec",
        "nodeSelector": "map",
        "scaleMetric": "str",
        "scaleTarget": "int",
        "serviceAccountName": "str",
        "timeout": "int",
        "tolerations": "any",
    },
    "ModelSpec": {
        "args": ["str"],
        "command": ["str"],
        "env": ["EnvVar"],
        "image": "str",
        "modelFormat": "ModelFormat",
        "name": "str",
        "ports": ["ContainerPort"],
        "protocolVersion": "str",
        "readinessProbe": "any",
        "resources": "ResourceRequirements",
        "runtime": "str",
        "runtimeVersion": "str",
        "storageUri": "str",
    },
    "ModelFormat": {"name": "str", "version": "str"},
    "Container": {
        "args": ["str"],
        "command": ["str"],
        "env": ["EnvVar"],
        "image": "str",
        "imagePullPolicy": "str",
        "livenessProbe": "any",
        "name": "str",
        "ports": ["ContainerPort"],
        "readinessProbe": "any",
        "resources": "ResourceRequirements",
        "securityContext": "any",
        "startupProbe": "any",
        "volumeMounts": "any",
        "workingDir": "str",
    },
    "ContainerPort": {"containerPort": "int", "hostPort": "int", "name": "str", "protocol": "str"},
    "EnvVar": {"name": "str", "value": "str", "valueFrom": "any"},
    "ResourceRequirements": {"limits": "map", "requests": "map", "claims": "any"},
}


def check(value: Any, kind: Any, where: str) -> None:
    """``value`` must have the shape of ``kind`` (see SCHEMA); raises AssertionError naming it."""
    if kind == "any":
        return
    if isinstance(kind, list):
        assert isinstance(value, list), f"{where} must be a list"
        for index, item in enumerate(value):
            check(item, kind[0], f"{where}[{index}]")
        return
    if kind == "map":
        assert isinstance(value, dict), f"{where} must be a map"
        assert all(isinstance(v, str) for v in value.values()), f"{where} values must be strings"
        return
    primitive = {"str": str, "int": int, "bool": bool}.get(kind)
    if primitive is not None:
        assert isinstance(value, primitive), f"{where} must be a {kind}, got {value!r}"
        return
    assert isinstance(value, dict), f"{where} must be a {kind} object"
    fields = SCHEMA[kind]
    unknown = sorted(set(value) - set(fields))
    assert not unknown, f"{where}: {unknown} are not fields of {kind}"
    for name, item in value.items():
        check(item, fields[name], f"{where}.{name}")


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((KSERVE / name).read_text())
    check(doc, doc["kind"], name)
    return doc


@pytest.fixture(scope="module")
def runtime() -> dict[str, Any]:
    doc = load("servingruntime.yaml")
    assert doc["apiVersion"] == "serving.kserve.io/v1alpha1"
    return doc


def test_the_schema_check_catches_a_misspelled_field() -> None:
    with pytest.raises(AssertionError, match=r"\['storageURI'\] are not fields of ModelSpec"):
        check({"storageURI": "gs://x"}, "ModelSpec", "model")
    with pytest.raises(AssertionError, match="containerPort must be a int"):
        check({"containerPort": "8080"}, "ContainerPort", "port")


def test_serving_runtime_rules(runtime: dict[str, Any]) -> None:
    spec = runtime["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    command = container["command"] + container["args"]
    assert command[:2] == ["trtpipe", "serve"]
    assert "{{.Name}}=/mnt/models" in command  # model named after the InferenceService
    ports = container["ports"]
    assert len(ports) == 1 and ports[0]["containerPort"] == 8080  # Knative: one port
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(ports[0]["containerPort"])


def test_runtime_args_are_valid_trtpipe_serve_options(runtime: dict[str, Any]) -> None:
    from trtpipe.cli.serve import command as serve

    (container,) = runtime["spec"]["containers"]
    args = [a.replace("{{.Name}}", "minilm") for a in container["args"][1:]]
    context = serve.make_context("serve", args)
    assert context.params["named"] == ("minilm=/mnt/models",)
    assert context.params["http_port"] == 8080 and context.params["grpc_port"] == 9000
    assert context.params["host"] == "0.0.0.0" and context.params["gpus"] == "0"


@pytest.mark.parametrize("name", ["isvc-http.yaml", "isvc-grpc.yaml", "isvc-raw.yaml"])
def test_inference_services_use_the_runtime(runtime: dict[str, Any], name: str) -> None:
    doc = load(name)
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
    model = doc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"].startswith(("gs://", "s3://", "pvc://", "https://"))
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    ports = {p["name"]: p["containerPort"] for p in model.get("ports", [])}
    mode = doc["metadata"].get("annotations", {}).get("serving.kserve.io/deploymentMode")
    if name == "isvc-grpc.yaml":
        assert mode is None and ports == {"h2c": 9000}  # Knative: the gRPC port alone, h2c
        assert model["protocolVersion"] == "grpc-v2"
    elif name == "isvc-raw.yaml":
        assert mode == "RawDeployment" and ports == {"http1": 8080, "h2c": 9000}
    else:
        assert ports == {} and model["protocolVersion"] == "v2"

"""deploy/kserve: the ServingRuntime and InferenceService examples are valid and keep the rules.

The manifests are checked against the ``kserve`` SDK's generated models (and the Kubernetes
client's, for the container, ports and resources): every key must be a field of its type, every
value of the field's type, recursively, the way the API server's schema validation reads them
(the SDK's own deserializer silently drops unknown keys, so it cannot catch a misspelled one).
The runtime's ``args`` are parsed by the real ``trtpipe serve`` command.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

KSERVE = Path(__file__).resolve().parents[2] / "deploy" / "kserve"
KINDS = {"ServingRuntime": "V1alpha1ServingRuntime", "InferenceService": "V1beta1InferenceService"}
PRIMITIVES: dict[str, Any] = {"str": str, "int": int, "bool": bool, "float": (int, float)}

# Run in a child process: importing ``kserve`` registers its own copy of the KServe v2 gRPC
# protos ("inference.ServerLiveRequest", ...), which clashes with tritonclient's in the test
# process (protobuf refuses a second definition of the same symbol).
SDK_FIELDS = """
import json, re, kserve.models, kubernetes.client.models
def model(name):
    for module in (kserve.models, kubernetes.client.models):
        if hasattr(module, name):
            return getattr(module, name)
table, todo = {}, list(ROOTS)
while todo:
    name = todo.pop()
    cls = model(name)
    if name in table or cls is None:
        continue
    table[name] = {key: cls.openapi_types[attr] for attr, key in cls.attribute_map.items()}
    for kind in table[name].values():
        todo += [t for t in re.findall(r"[A-Za-z0-9]+", kind) if model(t) is not None]
print(json.dumps(table))
"""


@functools.cache
def sdk_fields() -> dict[str, dict[str, str]]:
    """type name -> {JSON key: OpenAPI type} for every model reachable from the two kinds."""
    script = f"ROOTS = {sorted(KINDS.values())!r}\n{SDK_FIELDS}"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    table: dict[str, dict[str, str]] = json.loads(done.stdout)
    return table


def check(value: Any, type_name: str, where: str) -> None:
    """``value`` must have the shape of the SDK type ``type_name``; AssertionError names it."""
    if type_name == "object":
        return  # free-form (status, raw extensions)
    if match := re.fullmatch(r"[Ll]ist\[(.+)\]", type_name):
        assert isinstance(value, list), f"{where} must be a list"
        for index, item in enumerate(value):
            check(item, match.group(1), f"{where}[{index}]")
        return
    if match := re.fullmatch(r"(?:[Dd]ict\[|dict\()str, (.+)[\])]", type_name):
        assert isinstance(value, dict), f"{where} must be a map"
        for key, item in value.items():
            check(item, match.group(1), f"{where}.{key}")
        return
    if type_name in PRIMITIVES:
        wrong_bool = isinstance(value, bool) and type_name != "bool"
        assert isinstance(value, PRIMITIVES[type_name]) and not wrong_bool, (
            f"{where} must be a {type_name}, got {value!r}"
        )
        return
    fields = sdk_fields().get(type_name)
    assert fields is not None, f"no SDK model named {type_name}"
    assert isinstance(value, dict), f"{where} must be a {type_name} object"
    unknown = sorted(set(value) - set(fields))
    assert not unknown, f"{where}: {unknown} are not fields of {type_name}"
    for key, item in value.items():
        check(item, fields[key], f"{where}.{key}")


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((KSERVE / name).read_text())
    check(doc, KINDS[doc["kind"]], name)
    return doc


@pytest.fixture(scope="module")
def runtime() -> dict[str, Any]:
    doc = load("servingruntime.yaml")
    assert doc["apiVersion"] == "serving.kserve.io/v1alpha1"
    return doc


def test_the_schema_check_catches_a_misspelled_field() -> None:
    with pytest.raises(
        AssertionError, match=r"\['storageURI'\] are not fields of V1beta1ModelSpec"
    ):
        check({"storageURI": "gs://x"}, "V1beta1ModelSpec", "model")
    with pytest.raises(AssertionError, match="containerPort must be a int"):
        check({"containerPort": "8080"}, "V1ContainerPort", "port")
    with pytest.raises(AssertionError, match=r"limits.nvidia.com/gpu must be a str, got 1"):
        check({"limits": {"nvidia.com/gpu": 1}}, "V1ResourceRequirements", "resources")


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

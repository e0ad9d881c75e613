"""The CRD: a valid apiextensions object; its schema and CEL rules accept the examples and reject what is wrong,
for the right reason; its defaults and rules agree with tandem.operator.spec."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

import crd_schema
from tandem.operator import spec as spec_module
from tandem.operator.spec import SpecError, parse_spec, validate_name

EXAMPLES = sorted((crd_schema.ROOT / "examples").glob("*.yaml"))


def llmd(spec: dict[str, Any], name: str = "m") -> dict[str, Any]:
    return {"apiVersion": "tandem.dev/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name}, "spec": spec}


def test_crd_is_a_valid_v1_custom_resource_definition():
    crd = crd_schema.load_crd()
    kubernetes_validate.validate(crd, "1.37.0", strict=True)
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == ["llmd"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.decode.replicas"
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Prefill"] == ".status.prefill.ready" and columns["Phase"] == ".status.phase"
    assert columns["Endpoint"] == ".status.endpoint" and columns["Age"] == ".metadata.creationTimestamp"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_accepted(example):
    obj = yaml.safe_load(example.read_text())
    defaulted, errors = crd_schema.check(obj)
    assert errors == []
    parse_spec(defaulted["spec"])  # the operator agrees


def test_defaults_fill_an_empty_spec_like_the_operator_does():
    defaulted, errors = crd_schema.check(llmd({}))
    assert errors == []
    spec = defaulted["spec"]
    parsed = parse_spec({})
    assert spec["image"] == parsed.image == "ghcr.io/tandem-llm/tandem:0.1.0"
    assert spec["model"] == {"uri": "bundled", "dtype": "bfloat16", "maxModelLen": 2048}
    assert spec["engine"] == {"kind": "tandem", "device": "auto", "cudaImage": "ghcr.io/tandem-llm/tandem:0.1.0-cuda",
                              "gpuMemoryUtilization": 0.9, "blockSize": 16, "maxNumSeqs": 64,
                              "maxNumBatchedTokens": 2048, "enablePrefixCaching": True, "enableChunkedPrefill": True,
                              "maxLongPartialPrefills": 1, "longPrefillTokenThreshold": 0}
    assert spec["prefill"] == {"replicas": 0} and spec["decode"] == {"replicas": 1}
    assert spec["router"]["replicas"] == parsed.router.replicas == 1
    assert spec["router"]["scorerWeights"] == parsed.router.scorer_weights.model_dump() == {
        "prefix": 3, "queue": 1, "kv": 1, "inflight": 1}
    assert spec["router"]["disaggThreshold"] == 256
    assert spec["kvTransfer"] == {"backend": "nixl", "port": 5600, "leaseSeconds": 30, "loadFailurePolicy": "recompute"}
    assert spec["redis"] == {"mode": "Disabled", "image": "redis:7.4-alpine"}
    # Defaulted by the server or by the operator, a spec renders the same.
    assert parse_spec(spec) == parsed


def test_the_operator_validates_against_the_packaged_copy_of_the_crd():
    # The operator reads the CRD the image ships (tandem/operator/crds/), a byte-for-byte copy of crds/.
    assert spec_module.crd() == crd_schema.load_crd()


def test_nested_defaults_of_optional_blocks():
    defaulted, errors = crd_schema.check(llmd({"prefill": {}, "decode": {"autoscaling": {"maxReplicas": 4}},
                                               "apiKeySecretRef": {"name": "k"}}))
    assert errors == []
    spec = defaulted["spec"]
    assert spec["prefill"]["replicas"] == 0
    assert spec["decode"]["autoscaling"] == {"minReplicas": 1, "maxReplicas": 4, "metric": {
        "name": "vllm:num_requests_waiting", "targetAverageValue": "4"}}
    assert spec["apiKeySecretRef"] == {"name": "k", "key": "api-key"}
    parsed = parse_spec(spec)
    assert parsed.decode.autoscaling.metric_name == "vllm:num_requests_waiting"
    assert parsed.api_key.key == "api-key"


# (case id, spec, the CRD's error (substring), the operator's error (substring))
INVALID = [
    ("negative-replicas", {"decode": {"replicas": -1}}, "spec.decode.replicas: -1 is less than the minimum of 0",
     "spec.decode.replicas: must be >= 0"),
    ("unknown-dtype", {"model": {"dtype": "float16"}}, "spec.model.dtype: 'float16' is not one of",
     "spec.model.dtype: unsupported value 'float16' (one of bfloat16, float32)"),
    ("min-above-max", {"decode": {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}},
     "autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
     "spec.decode.autoscaling: minReplicas (3) must not exceed maxReplicas (2)"),
    ("unknown-uri-scheme", {"model": {"uri": "s3://bucket/model"}}, "spec.model.uri: 's3://bucket/model' does not match",
     "spec.model.uri: invalid value 's3://bucket/model'"),
    ("hf-uri-without-org", {"model": {"uri": "hf://just-a-name"}}, "spec.model.uri",
     "spec.model.uri: invalid value 'hf://just-a-name'"),
    ("unknown-engine-kind", {"engine": {"kind": "sglang"}}, "spec.engine.kind: 'sglang' is not one of",
     "spec.engine.kind: unsupported value 'sglang' (one of tandem, vllm)"),
    ("unknown-device", {"engine": {"device": "tpu"}}, "spec.engine.device: 'tpu' is not one of",
     "spec.engine.device: unsupported value 'tpu'"),
    ("gpu-utilization-above-one", {"engine": {"gpuMemoryUtilization": 1.5}}, "spec.engine.gpuMemoryUtilization",
     "spec.engine.gpuMemoryUtilization: must be <= 1, got 1.5"),
    ("vllm-with-the-bundled-model", {"engine": {"kind": "vllm"}}, "engine.kind vllm needs model.uri",
     "spec.model.uri: engine.kind vllm needs model.uri"),
    ("cache-for-a-pvc-model", {"model": {"uri": "pvc://w/m", "cache": {"size": "10Gi"}}},
     "model.cache is only used for hf:// models", "spec.model.cache: model.cache is only used for hf://"),
    ("cache-with-claim-and-size", {"model": {"uri": "hf://o/m", "cache": {"size": "10Gi", "claimName": "c"}}},
     "model.cache needs exactly one of claimName", "model.cache needs exactly one of claimName"),
    ("empty-cache", {"model": {"uri": "hf://o/m", "cache": {}}},
     "model.cache needs exactly one of claimName", "model.cache needs exactly one of claimName"),
    ("storage-class-without-size", {"model": {"uri": "hf://o/m", "cache": {"claimName": "c",
                                                                            "storageClassName": "nfs"}}},
     "storageClassName is only used with model.cache.size", "storageClassName is only used with model.cache.size"),
    ("bad-cache-size", {"model": {"uri": "hf://o/m", "cache": {"size": "lots"}}}, "spec.model.cache.size",
     "spec.model.cache.size: invalid value 'lots'"),
    ("external-redis-without-url", {"redis": {"mode": "External"}}, "redis.url is required when redis.mode is External",
     "redis.url is required"),
    ("redis-url-without-external", {"redis": {"url": "redis://r:6379"}}, "redis.url is only used",
     "redis.url is only used"),
    ("prefill-autoscaling-at-zero", {"prefill": {"autoscaling": {"maxReplicas": 3}}},
     "prefill.autoscaling needs prefill.replicas >= 1", "prefill.autoscaling needs"),
    ("disaggregated-without-decode", {"prefill": {"replicas": 1}, "decode": {"replicas": 0}},
     "a disaggregated deployment needs decode replicas >= 1", "needs decode replicas >= 1"),
    ("batched-below-block", {"engine": {"maxNumBatchedTokens": 8}}, "maxNumBatchedTokens must be at least",
     "maxNumBatchedTokens must be at least"),
    ("bad-kv-memory", {"engine": {"kvCacheMemory": "2GB"}}, "spec.engine.kvCacheMemory",
     "spec.engine.kvCacheMemory: invalid value '2GB' (KV cache size: bytes (536870912)"),
    ("unknown-transport", {"kvTransfer": {"ucxTransports": ["carrier-pigeon"]}}, "spec.kvTransfer.ucxTransports.0",
     "spec.kvTransfer.ucxTransports.0: unsupported value 'carrier-pigeon'"),
    ("negative-weight", {"router": {"scorerWeights": {"prefix": -1}}}, "spec.router.scorerWeights.prefix",
     "spec.router.scorerWeights.prefix: must be >= 0, got -1"),
    ("wrong-type", {"decode": {"replicas": "two"}}, "spec.decode.replicas", "spec.decode.replicas: must be of type "
     "integer, got 'two'"),
    ("zero-routers", {"router": {"replicas": 0}}, "spec.router.replicas: 0 is less than the minimum of 1",
     "spec.router.replicas: must be >= 1"),
]


@pytest.mark.parametrize("spec, crd_error, operator_error", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_objects_are_rejected_for_the_right_reason(spec, crd_error, operator_error):
    _, errors = crd_schema.check(llmd(spec))
    assert errors, "the CRD accepted an invalid object"
    assert any(crd_error in e for e in errors), errors
    # The operator enforces the same rules (for clusters where CEL did not run).
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert any(operator_error in p for p in info.value.problems), info.value.problems


def test_unknown_fields_are_rejected():
    _, errors = crd_schema.check(llmd({"model": {"uri": "bundled", "quantisation": "int4"}}))
    assert any("quantisation" in e for e in errors), errors
    with pytest.raises(SpecError) as info:
        parse_spec({"model": {"uri": "bundled", "quantisation": "int4"}, "engine": {"devcie": "cuda"}})
    assert info.value.problems == ["spec.engine.devcie: unknown field", "spec.model.quantisation: unknown field"]


def test_operator_only_rules():
    # Rules the CRD cannot state (they depend on the device a role resolves to) are the operator's alone.
    gpu = {"resources": {"limits": {"nvidia.com/gpu": 1}}}
    with pytest.raises(SpecError, match="spec.engine.kvCacheMemory: a fraction is a share of a CPU worker's"):
        parse_spec({"decode": gpu, "engine": {"kvCacheMemory": "0.5"}})
    with pytest.raises(SpecError, match="vLLM takes a size"):
        parse_spec({"model": {"uri": "hf://o/m"}, "engine": {"kind": "vllm", "kvCacheMemory": "0.5"}})
    with pytest.raises(SpecError) as info:
        parse_spec({"decode": {"resources": {"limits": {"nvidia.com/gpu": "500m"}}},
                    "prefill": {"replicas": 1, "resources": {"requests": {"nvidia.com/gpu": 2},
                                                             "limits": {"nvidia.com/gpu": 1}}}})
    assert info.value.problems == [
        "spec.prefill.resources: requests and limits of nvidia.com/gpu must be equal",
        "spec.decode.resources.limits.nvidia.com/gpu: must be a whole number of GPUs, got '500m'"]
    with pytest.raises(SpecError, match=r"spec.decode.resources: a Tandem worker uses one GPU, so nvidia.com/gpu: 2 "
                                        r"would leave 1 idle"):
        parse_spec({"decode": {"resources": {"limits": {"nvidia.com/gpu": 2}}}})
    # Accepted where they make sense: a fraction on CPU, sizes anywhere.
    assert parse_spec({"engine": {"kvCacheMemory": "0.5"}}).engine.kv_cache_memory_arg == "0.5"
    assert parse_spec({"decode": gpu, "engine": {"kvCacheMemory": "8Gi"}}).engine.kv_cache_memory_arg == str(8 * 2**30)
    assert parse_spec({"model": {"uri": "hf://o/m"}, "engine": {"kind": "vllm", "kvCacheMemory": "4Gi"}})


def test_name_length_rule():
    _, errors = crd_schema.check(llmd({}, name="n" * 41))
    assert any("at most 40 characters" in e for e in errors)
    assert validate_name("n" * 41) and not validate_name("n" * 40)
    _, errors = crd_schema.check(llmd({}, name="n" * 40))
    assert errors == []


def test_every_cel_rule_compiles_and_can_fail():
    # Each rule must be exercised by a case above; a rule no case breaks would be untested.
    crd = crd_schema.load_crd()
    rules = []

    def walk(schema: dict[str, Any]) -> None:
        rules.extend(r["message"] for r in schema.get("x-kubernetes-validations") or [])
        for sub in (schema.get("properties") or {}).values():
            walk(sub)
        if isinstance(schema.get("items"), dict):
            walk(schema["items"])

    walk(crd_schema.storage_schema(crd))
    broken = {m for c in INVALID for m in crd_schema.check(llmd(c[1]))[1]}
    broken |= set(crd_schema.check(llmd({}, name="n" * 41))[1])
    for message in set(rules):
        assert any(message in b for b in broken), f"no test case breaks the rule {message!r}"


def test_status_schema_accepts_what_the_operator_writes():
    obj = llmd({})
    obj["status"] = {"phase": "Ready", "mode": "aggregated", "endpoint": "http://m.ns.svc.cluster.local:8000/v1",
                     "observedGeneration": 2,
                     "decode": {"replicas": 1, "readyReplicas": 1, "ready": "1/1", "selector": "a=b"},
                     "conditions": [{"type": "Ready", "status": "True", "reason": "AllReplicasReady", "message": "",
                                     "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 2}]}
    assert crd_schema.check(copy.deepcopy(obj))[1] == []
    obj["status"]["phase"] = "Sleepy"
    assert crd_schema.check(obj)[1]

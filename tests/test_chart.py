"""The Helm chart charts/eps: rendered with Helm's own engine (helm-python-sdk from the dev extra, or a `helm`
binary), linted, and checked: RBAC, store ConfigMap, secret references without values, GPU classes the Argo
engine reads, the GPU semaphore, the PriorityClass. The values file is checked structurally even without Helm."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from workflows.engines import argo
from workflows.engines.argo import ClusterSettings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "eps"
NAMESPACE = "eps-research"
SECRET_LIKE = re.compile(r"(sk-ant-|hf_[A-Za-z0-9]{8}|AKIA[0-9A-Z]{12}|BEGIN [A-Z ]*PRIVATE KEY)")


def _render_sdk(values: dict | None) -> list[dict]:
    import helm_python

    chart = helm_python.Chart.load(str(CHART))
    out = chart.render(values, name="eps", namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def _render_binary(values: dict | None) -> list[dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
        yaml.safe_dump(values or {}, fh)
        fh.flush()
        out = subprocess.run(["helm", "template", "eps", str(CHART), "--namespace", NAMESPACE, "-f", fh.name],
                             capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise RuntimeError(out.stderr.strip())
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def renderer():
    try:
        import helm_python  # noqa: F401

        return _render_sdk
    except ImportError:
        pass
    if shutil.which("helm"):
        return _render_binary
    return None


RENDER = renderer()  # Helm is in the dev extra: without it the rendering tests fail, never skip


def render(values: dict | None = None) -> list[dict]:
    if RENDER is None:
        pytest.fail("no Helm here: `pip install -e '.[dev]'` brings helm-python-sdk (or put a `helm` binary on PATH)")
    return RENDER(values)


def by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return render()


# ---------------------------------------------------------------------------------------------------------------
# rendered with Helm


def test_helm_lint_is_clean():
    if RENDER is None:
        pytest.fail("no Helm here: `pip install -e '.[dev]'` brings helm-python-sdk (or put a `helm` binary on PATH)")
    try:
        import helm_python
    except ImportError:
        out = subprocess.run(["helm", "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        return
    report = helm_python.lint(str(CHART), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_renders_the_expected_objects_in_the_release_namespace(docs):
    objects = by_kind(docs)
    expected = {
        ("ServiceAccount", "eps-workflow"), ("ServiceAccount", "eps-submitter"),
        ("Role", "eps-workflow"), ("RoleBinding", "eps-workflow"), ("Role", "eps-submitter"),
        ("RoleBinding", "eps-submitter"), ("ConfigMap", "eps-store"), ("ConfigMap", "eps-gpu-semaphore"),
        ("ConfigMap", "eps-cluster-config"), ("PriorityClass", "eps-batch"),
        ("Secret", "eps-submitter.service-account-token"),
    }
    assert expected <= set(objects)
    for (kind, _), doc in objects.items():
        if kind == "PriorityClass":
            assert "namespace" not in doc["metadata"]  # the one cluster-scoped object
        else:
            assert doc["metadata"]["namespace"] == NAMESPACE, (kind, doc["metadata"]["name"])
        assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert not [k for k in objects if k[0] in ("ClusterRole", "ClusterRoleBinding")]  # namespace-scoped RBAC


def test_rbac_gives_workflow_pods_only_what_argo_needs(docs):
    objects = by_kind(docs)
    role = objects[("Role", "eps-workflow")]
    assert role["rules"] == [{"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"],
                              "verbs": ["create", "patch"]}]
    binding = objects[("RoleBinding", "eps-workflow")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "eps-workflow"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "eps-workflow", "namespace": NAMESPACE}]
    submitter = objects[("Role", "eps-submitter")]
    verbs = {r: set(rule["verbs"]) for rule in submitter["rules"] for r in rule["resources"]}
    assert {"create", "get", "list", "watch", "update", "patch"} <= verbs["workflows"]
    assert "get" in verbs["pods/log"]
    # a retry through the Argo Server (client auth mode) deletes the failed tasks' pods with the caller's token
    assert "delete" in verbs["pods"] and "delete" not in verbs["pods/log"]
    # the Argo Server opens artifacts with the viewer's token: the submitter may read the S3 credentials, by name,
    # and no other Secret (never the API keys)
    secret_rules = [r for r in submitter["rules"] if "secrets" in r["resources"]]
    assert secret_rules == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["eps-s3-credentials"],
                             "verbs": ["get"]}]
    for doc in (role, submitter):
        for rule in doc["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"]


def test_secrets_are_referenced_never_given(docs):
    secrets = [d for d in docs if d["kind"] == "Secret"]
    assert secrets and all(d["type"] == "kubernetes.io/service-account-token" for d in secrets)
    assert all("data" not in d and "stringData" not in d for d in secrets)
    assert not SECRET_LIKE.search(yaml.safe_dump_all(docs))
    settings = ClusterSettings.parse_settings(_cluster_yaml(docs))
    refs = {s.env: (s.secret, s.key) for s in settings.secret_env}
    assert refs == {
        "ANTHROPIC_API_KEY": ("eps-api-keys", "ANTHROPIC_API_KEY"), "HF_TOKEN": ("eps-api-keys", "HF_TOKEN"),
        "WANDB_API_KEY": ("eps-api-keys", "WANDB_API_KEY"),
        "AWS_ACCESS_KEY_ID": ("eps-s3-credentials", "AWS_ACCESS_KEY_ID"),
        "AWS_SECRET_ACCESS_KEY": ("eps-s3-credentials", "AWS_SECRET_ACCESS_KEY"),
    }


def test_store_configmap_holds_bucket_endpoint_and_region():
    objects = by_kind(render({"store": {"bucket": "lab-bucket", "prefix": "/eps/", "endpoint": "http://minio.eps:9000",
                                        "region": "eu-west-1"}}))
    data = objects[("ConfigMap", "eps-store")]["data"]
    assert data == {
        "EPS_STORE": "s3://lab-bucket/eps", "EPS_BUCKET": "lab-bucket", "AWS_REGION": "eu-west-1",
        "AWS_DEFAULT_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://minio.eps:9000",
        "S3_ENDPOINT_URL": "http://minio.eps:9000",
    }
    default = by_kind(render())[("ConfigMap", "eps-store")]["data"]
    assert default["EPS_STORE"] == "s3://eps-artifacts" and "AWS_ENDPOINT_URL" not in default


def _cluster_yaml(docs: list[dict]) -> dict:
    return yaml.safe_load(by_kind(docs)[("ConfigMap", "eps-cluster-config")]["data"]["cluster.yaml"])


def test_chart_defaults_are_the_engine_defaults(docs):
    """The engine without a cluster config behaves as with the chart's rendered one (same GPU classes etc.)."""
    settings = ClusterSettings.parse_settings(_cluster_yaml(docs))
    assert settings.model_dump() == ClusterSettings(namespace=NAMESPACE).model_dump()
    assert set(settings.gpu_classes) == {"h100", "h200"}


def test_semaphore_has_a_key_per_gpu_class(docs):
    sem = by_kind(docs)[("ConfigMap", "eps-gpu-semaphore")]["data"]
    assert sem == {"h100": "8", "h200": "8"}
    settings = ClusterSettings.parse_settings(_cluster_yaml(docs))
    assert settings.gpu_semaphore.config_map == "eps-gpu-semaphore" and set(sem) == set(settings.gpu_classes)


def test_priority_class_lets_batch_wait_rather_than_evict(docs):
    pc = by_kind(docs)[("PriorityClass", "eps-batch")]
    assert pc["value"] == 1000 and pc["preemptionPolicy"] == "Never" and pc["globalDefault"] is False


def test_values_flow_into_the_compiled_workflow():
    """helm values -> eps-cluster-config -> EPS_CLUSTER_CONFIG -> the Argo engine -> the workflow's pods."""
    from workflows.plan import PlanBuilder

    values = {
        "image": {"registry": "registry.invalid/lab", "tag": "v7"},
        "gpuClasses": {"h100": {"nodeSelector": {"pool": "gpu-h100", "nvidia.com/gpu.product": None},
                                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu",
                                                 "effect": "NoSchedule"}]}},
        "gpuSemaphore": {"configMapName": "gpu-slots", "limits": {"h100": 2}},
        "priorityClass": {"name": "research-low"},
        "workflow": {"retry": {"limit": 5}, "podGC": {"strategy": "OnWorkflowSuccess"}},
        "cache": {"create": True, "size": "1Ti"},
        "serviceAccount": {"name": "runner"},
        "tracking": {"backend": "wandb", "project": "persona-runs"},
    }
    docs = render(values)
    objects = by_kind(docs)
    assert objects[("ConfigMap", "gpu-slots")]["data"] == {"h100": "2", "h200": "8"}  # Helm merges maps
    pvc = objects[("PersistentVolumeClaim", "eps-cache")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["resources"]["requests"]["storage"] == "1Ti"

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.yaml"
        path.write_text(yaml.safe_dump(_cluster_yaml(docs)))
        settings = ClusterSettings.load(path)
    b = PlanBuilder("issue164", "full", "chart-check", "s3://b/p")
    b.add("gen-a", "generate", "a", condition="a", model_ref="tiny:qwen2", questions=[{"id": "q", "text": "hi"}])
    wf = yaml.safe_load(argo.to_yaml(b.plan({}), cluster=settings))
    assert wf["metadata"]["namespace"] == NAMESPACE and wf["spec"]["serviceAccountName"] == "runner"
    assert wf["spec"]["podGC"]["strategy"] == "OnWorkflowSuccess"
    gen = next(t for t in wf["spec"]["templates"] if t["name"] == "generate")
    assert gen["container"]["image"].startswith("registry.invalid/lab/eps-generate:v7")
    assert gen["nodeSelector"] == {"pool": "gpu-h100"}
    assert gen["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
    assert gen["synchronization"]["semaphores"][0]["configMapKeyRef"] == {"name": "gpu-slots", "key": "h100"}
    assert gen["priorityClassName"] == "research-low" and gen["retryStrategy"]["limit"] == 5
    cache = next(v for v in gen["volumes"] if v["name"] == "cache")
    assert cache["persistentVolumeClaim"]["claimName"] == "eps-cache"
    env = {e["name"]: e.get("value") for e in gen["container"]["env"]}
    assert env["EPS_TRACKING"] == "wandb" and env["WANDB_PROJECT"] == "persona-runs"
    assert gen["outputs"]["parameters"][0]["name"] == "tracking-url"


def test_schema_catches_typos_and_missing_values():
    with pytest.raises(Exception, match="nodeSelektor"):
        render({"gpuClasses": {"h100": {"nodeSelektor": {}}}})
    with pytest.raises(Exception, match="bucket"):
        render({"store": {"bucket": ""}})
    with pytest.raises(Exception, match="gpuSemaphore.limits.a100"):
        render({"gpuClasses": {"a100": {"nodeSelector": {"x": "y"}}}})


def test_argo_can_be_required_at_install():
    with pytest.raises(Exception, match="Argo Workflows is not installed"):
        render({"argo": {"requireCRDs": True}})


# ---------------------------------------------------------------------------------------------------------------
# structural checks that need no Helm


def test_values_declare_gpu_classes_and_no_secret_values():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for klass in ("h100", "h200"):
        pool = values["gpuClasses"][klass]
        assert pool["nodeSelector"] and pool["tolerations"]
        assert {"key": "eps/gpu-class", "operator": "Equal", "value": klass, "effect": "NoSchedule"} in pool["tolerations"]
        assert values["gpuSemaphore"]["limits"][klass] > 0
    assert values["secrets"] == {"apiKeys": "eps-api-keys", "s3Credentials": "eps-s3-credentials"}
    assert not SECRET_LIKE.search((CHART / "values.yaml").read_text())
    for path in (CHART / "templates").iterdir():
        text = path.read_text()
        assert "stringData" not in text, path.name
        if "kind: Secret" in text:
            assert not re.search(r"^\s*data:", text, re.M), f"{path.name}: a Secret with values"
    json.loads((CHART / "values.schema.json").read_text())


def test_chart_documents_its_argo_dependency():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "eps"
    assert "Argo Workflows" in (CHART / "Chart.yaml").read_text()
    assert chart["annotations"]["eps/requires-argo-workflows"].startswith(">=")
    assert "dependencies" not in chart  # installed by the admin first, not vendored (README, "Running on a cluster")
    assert "Argo Workflows" in (CHART / "README.md").read_text()


def _artifact_repository(docs: list[dict]) -> dict:
    cm = by_kind(docs)[("ConfigMap", "eps-artifact-repositories")]
    assert set(cm["data"]) == {"eps-s3"}
    return yaml.safe_load(cm["data"]["eps-s3"])


def test_artifact_repository_is_the_stores_bucket_with_the_s3_secret_named(docs):
    """The Argo UI opens the analysis artifacts from this repository: the store's bucket, its endpoint without the
    scheme Argo does not take (insecure for http), and the S3 credentials by Secret reference."""
    refs = {"accessKeySecret": {"name": "eps-s3-credentials", "key": "AWS_ACCESS_KEY_ID"},
            "secretKeySecret": {"name": "eps-s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert _artifact_repository(docs) == {"s3": {"bucket": "eps-artifacts", "endpoint": "s3.amazonaws.com",
                                                 "insecure": False, "region": "us-east-1", **refs}}
    minio = _artifact_repository(render({"store": {"bucket": "lab", "endpoint": "http://minio.eps:9000/"}}))
    assert minio["s3"]["endpoint"] == "minio.eps:9000" and minio["s3"]["insecure"] is True
    tls = _artifact_repository(render({"store": {"bucket": "lab", "endpoint": "https://s3.lab.example"}}))
    assert tls["s3"]["endpoint"] == "s3.lab.example" and tls["s3"]["insecure"] is False
    # the compiled workflows point at it
    settings = ClusterSettings.parse_settings(_cluster_yaml(docs))
    assert (settings.artifact_repository.config_map, settings.artifact_repository.key) == ("eps-artifact-repositories", "eps-s3")


def test_without_the_artifact_repository_the_submitter_reads_no_secret():
    docs = render({"artifactRepository": {"enabled": False}})
    objects = by_kind(docs)
    assert ("ConfigMap", "eps-artifact-repositories") not in objects
    submitter = objects[("Role", "eps-submitter")]
    assert not [r for r in submitter["rules"] if "secrets" in r["resources"]]
    assert ClusterSettings.parse_settings(_cluster_yaml(docs)).artifact_repository.enabled is False

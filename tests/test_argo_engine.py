"""The Argo engine: the compiled workflow's real properties, and submit/status/retry against a loopback server.

The plan is a real one: issue164 built from the stage registry (``generate`` GPU cells, judge and classifier CPU
tasks, the CPU analysis depending on all of them); the compiled YAML is parsed back with pyyaml and checked.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import yaml

from jobs.registry import all_stages
from shared.core.store import from_path
from workflows import cluster, exit_status
from workflows.engines import argo, argo_settings
from workflows.engines.argo import ClusterError, ClusterSettings
from workflows.engines.argo_settings import Semaphore
from workflows.plan import Plan, PlanBuilder

REGISTRY = "registry.invalid/lab"
SHA = "0123456789abcdef0123456789abcdef01234567"
FAKE_SECRETS = {
    "ANTHROPIC_API_KEY": "sk-ant-THIS-MUST-NOT-LEAK",
    "HF_TOKEN": "hf_THIS_MUST_NOT_LEAK",
    "WANDB_API_KEY": "wandb-THIS-MUST-NOT-LEAK",
    "AWS_SECRET_ACCESS_KEY": "aws-THIS-MUST-NOT-LEAK",
    "AWS_ACCESS_KEY_ID": "AKIATHISMUSTNOTLEAK",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("ARGO_SERVER", "ARGO_TOKEN", "ARGO_NAMESPACE", "ARGO_BASE_HREF", "ARGO_SECURE",
                 "ARGO_INSECURE_SKIP_VERIFY", "EPS_CLUSTER_CONFIG", "EPS_IMAGE_REGISTRY", "EPS_IMAGE_TAG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EPS_GIT_SHA", SHA)
    for name, value in FAKE_SECRETS.items():  # present in the submitter's environment: must never be copied
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def plan() -> Plan:
    from workflows import issue164

    params = issue164.Params.for_profile("tiny")
    return issue164.build(params, profile="tiny", run_id="issue164-tiny-1a2b3c4d", store="s3://eps-artifacts/test")


@pytest.fixture()
def s3_plan(s3_bucket) -> Plan:
    """The same plan on a real (loopback) S3 store: submitting reads and writes the store."""
    from workflows import issue164

    params = issue164.Params.for_profile("tiny")
    return issue164.build(params, profile="tiny", run_id="issue164-tiny-1a2b3c4d", store=f"{s3_bucket}/test")


@pytest.fixture()
def settings() -> ClusterSettings:
    return ClusterSettings(image_registry=REGISTRY, git_sha=SHA)


@pytest.fixture()
def wf(plan, settings) -> dict:
    return yaml.safe_load(argo.to_yaml(plan, cluster=settings))


def templates(wf: dict) -> dict[str, dict]:
    return {t["name"]: t for t in wf["spec"]["templates"]}


def dag_tasks(wf: dict) -> dict[str, dict]:
    entry = templates(wf)[wf["spec"]["entrypoint"]]
    return {t["name"]: t for t in entry["dag"]["tasks"]}


def params_of(task: dict) -> dict[str, str]:
    return {p["name"]: p["value"] for p in task["arguments"]["parameters"]}


def stage_of(plan: Plan, wf: dict, task_name: str):
    return plan.task(task_name).spec, templates(wf)[dag_tasks(wf)[task_name]["template"]]


# ---------------------------------------------------------------------------------------------------------------
# the compiled workflow


def test_yaml_is_one_argo_workflow_named_after_the_run(plan, settings):
    text = argo.to_yaml(plan, cluster=settings)
    docs = list(yaml.safe_load_all(text))
    assert len(docs) == 1
    wf = docs[0]
    assert wf["apiVersion"] == "argoproj.io/v1alpha1" and wf["kind"] == "Workflow"
    assert wf["metadata"]["name"] == "issue164-tiny-1a2b3c4d"
    assert wf["metadata"]["namespace"] == "eps"
    assert wf["spec"]["serviceAccountName"] == "eps-workflow"
    assert argo.to_yaml(plan, cluster=settings) == text  # deterministic


def test_yaml_reads_back_as_argos_workflow_model(plan, settings):
    """Hera's models are generated from Argo's schema: the YAML must parse back into them unchanged."""
    from hera.workflows.models import Workflow as WorkflowModel

    data = yaml.safe_load(argo.to_yaml(plan, cluster=settings))
    model = WorkflowModel.model_validate(data)
    again = json.loads(model.json(exclude_none=True, by_alias=True))
    assert again == json.loads(json.dumps(data))


def test_one_named_dag_task_per_plan_task_with_the_plans_dependencies(plan, wf):
    tasks = dag_tasks(wf)
    assert list(tasks) == [t.name for t in plan.tasks]
    assert len(plan.tasks) >= 5
    for task in plan.tasks:
        assert sorted(tasks[task.name].get("dependencies", [])) == sorted(task.after), task.name
    # one failed cell must not stop the independent ones
    entry = templates(wf)[wf["spec"]["entrypoint"]]
    assert entry["dag"]["failFast"] is False


def test_each_task_runs_its_stage_entrypoint_in_its_stage_image_with_its_config(plan, wf):
    for task in plan.tasks:
        spec, tmpl = stage_of(plan, wf, task.name)
        container = tmpl["container"]
        assert container["image"] == f"{REGISTRY}/{spec.image}:{SHA}"
        assert container["command"] == ["python", "-m", f"jobs.{task.stage}"]
        assert container["args"] == ["--config", "{{inputs.parameters.config}}"]
        args = params_of(dag_tasks(wf)[task.name])
        assert json.loads(args["config"]) == json.loads(json.dumps(task.config))
        assert args["cell"] == argo.label_value(task.config["cell"])
        env = {e["name"]: e for e in container["env"]}
        assert env["EPS_IMAGE"]["value"] == container["image"]
        assert env["EPS_GIT_SHA"]["value"] == SHA
    # one template per stage image, not per task
    stage_templates = {t["template"] for t in dag_tasks(wf).values()}
    assert len(stage_templates) == len(plan.stages())


def test_gpu_tasks_get_gpus_the_node_pool_of_their_class_and_a_semaphore_slot(plan, settings, wf):
    gpu_tasks = [t for t in plan.tasks if t.spec.resources.uses_gpu]
    cpu_tasks = [t for t in plan.tasks if not t.spec.resources.uses_gpu]
    assert gpu_tasks and cpu_tasks
    for task in gpu_tasks:
        spec, tmpl = stage_of(plan, wf, task.name)
        res = tmpl["container"]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == str(spec.resources.gpus)
        assert res["requests"]["nvidia.com/gpu"] == str(spec.resources.gpus)
        assert res["requests"]["memory"] == res["limits"]["memory"] == spec.resources.memory
        klass = spec.resources.gpu_class
        pool = settings.gpu_classes[klass]
        assert tmpl["nodeSelector"] == pool.node_selector
        assert tmpl["nodeSelector"]["nvidia.com/gpu.product"].startswith(f"NVIDIA-{klass.upper()}")
        tolerations = tmpl["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        assert {"key": "eps/gpu-class", "operator": "Equal", "value": klass, "effect": "NoSchedule"} in tolerations
        sems = tmpl["synchronization"]["semaphores"]
        assert sems == [{"configMapKeyRef": {"name": "eps-gpu-semaphore", "key": klass}}]
        assert tmpl["metadata"]["labels"]["eps/gpu-class"] == klass
        shm = [v for v in tmpl["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
    for task in cpu_tasks:
        _, tmpl = stage_of(plan, wf, task.name)
        res = tmpl["container"]["resources"]
        assert "nvidia.com/gpu" not in res.get("limits", {}) and "nvidia.com/gpu" not in res.get("requests", {})
        assert "nodeSelector" not in tmpl and "tolerations" not in tmpl
        assert "synchronization" not in tmpl


def test_every_template_retries_with_backoff_and_has_a_deadline(plan, wf):
    containers = [t for t in wf["spec"]["templates"] if "container" in t]
    assert len(containers) == len(plan.stages()) + 1  # the stages and the exit handler
    for tmpl in containers:
        retry = tmpl["retryStrategy"]
        assert retry["limit"] == 3
        assert retry["retryPolicy"] == "Always"
        assert retry["backoff"] == {"duration": "1m", "factor": 2, "maxDuration": "3h"}
        assert retry["expression"] == "lastRetry.exitCode != '2'"  # bad input (exit 2) is not retried
        assert tmpl["priorityClassName"] == "eps-batch"
        assert isinstance(tmpl["activeDeadlineSeconds"], int)
    for task in plan.tasks:
        spec, tmpl = stage_of(plan, wf, task.name)
        assert tmpl["activeDeadlineSeconds"] == spec.resources.timeout_s


def test_final_cpu_task_depends_on_every_cell(plan, wf):
    tasks = dag_tasks(wf)
    depended_on = {d for t in tasks.values() for d in t.get("dependencies", [])}
    sinks = [name for name in tasks if name not in depended_on]
    assert sinks == ["analysis"]
    final = plan.task("analysis")
    assert not final.spec.resources.uses_gpu and final.spec.image_kind == "cpu"
    direct = set(tasks["analysis"]["dependencies"])
    assert {t.name for t in plan.tasks if t.stage == "generate" and t.config["cell"] not in
            ("classifier-em", "classifier-base")} <= direct
    # everything else is upstream of it
    upstream, frontier = set(), set(direct)
    while frontier:
        name = frontier.pop()
        upstream.add(name)
        frontier |= set(tasks[name].get("dependencies", [])) - upstream
    assert upstream == set(tasks) - {"analysis"}


def test_labels_carry_experiment_run_cell_stage_and_git_sha(plan, wf):
    expected = {"eps/experiment": "issue164", "eps/run-id": "issue164-tiny-1a2b3c4d", "eps/git-sha": SHA,
                "eps/profile": "tiny"}
    assert expected.items() <= wf["metadata"]["labels"].items()
    assert expected.items() <= wf["spec"]["podMetadata"]["labels"].items()  # every pod
    for task in plan.tasks:
        spec, tmpl = stage_of(plan, wf, task.name)
        labels = tmpl["metadata"]["labels"]
        assert labels["eps/stage"] == spec.name
        assert labels["eps/cell"] == "{{inputs.parameters.cell}}"  # filled per task from its argument
        assert params_of(dag_tasks(wf)[task.name])["cell"] == task.config["cell"]


def test_pod_gc_ttl_and_security(wf):
    assert wf["spec"]["podGC"] == {"strategy": "OnPodSuccess"}
    assert wf["spec"]["ttlStrategy"] == {"secondsAfterSuccess": 7 * 24 * 3600}  # failed runs stay for retry
    for tmpl in (t for t in wf["spec"]["templates"] if "container" in t):
        assert tmpl["securityContext"]["runAsNonRoot"] is True
        sc = tmpl["container"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000 and sc["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"] for m in tmpl["container"]["volumeMounts"]}
        assert "/cache" in mounts and "/tmp" in mounts
        env = {e["name"]: e.get("value") for e in tmpl["container"]["env"]}
        assert env["HF_HOME"].startswith("/cache/") and env["PIP_CACHE_DIR"].startswith("/cache/")


def test_store_and_secrets_come_from_configmap_and_secret_refs_never_values(plan, wf):
    text = yaml.safe_dump(wf)
    for value in FAKE_SECRETS.values():
        assert value not in text
    for tmpl in (t for t in wf["spec"]["templates"] if "container" in t):
        container = tmpl["container"]
        assert container["envFrom"] == [{"configMapRef": {"name": "eps-store", "optional": False}}]
        env = {e["name"]: e for e in container["env"]}
        for name in FAKE_SECRETS:
            assert "value" not in env[name]
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["optional"] is True and ref["key"] == name
            assert ref["name"] in ("eps-api-keys", "eps-s3-credentials")


def test_exit_handler_records_the_run_status_in_the_store(plan, wf, tmp_path):
    assert wf["spec"]["onExit"] == argo.EXIT_TEMPLATE
    tmpl = templates(wf)[argo.EXIT_TEMPLATE]
    container = tmpl["container"]
    assert container["image"] == f"{REGISTRY}/{argo.EXIT_STATUS_IMAGE}:{SHA}"
    assert container["command"] == ["python", "-m", "workflows.exit_status"]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    args = container["args"]
    opts = dict(zip(args[::2], args[1::2], strict=True))
    assert opts["--store"] == plan.store and opts["--run-id"] == plan.run_id
    assert opts["--status"] == "{{workflow.status}}" and opts["--failures"] == "{{workflow.failures}}"

    # what the pod does once Argo has filled in the variables (against a local store here)
    failures = [{"displayName": "gen-null", "message": "OOMKilled (exit code 137)", "templateName": "generate",
                 "phase": "Failed", "podName": "p-1", "finishedAt": "2026-01-01T00:00:00Z"}]
    filled = {**opts, "--store": from_path(tmp_path), "--workflow": "issue164-tiny-1a2b3c4d", "--status": "Failed",
              "--failures": json.dumps(failures), "--duration": "123.5"}
    assert exit_status.main([x for kv in filled.items() for x in kv]) == 0
    record = json.loads((tmp_path / "runs" / plan.run_id / "_status.json").read_text())
    assert record["status"] == "Failed" and record["succeeded"] is False
    assert record["failed_tasks"] == ["gen-null"] and record["failures"][0]["message"].startswith("OOMKilled")
    assert record["duration_s"] == 123.5 and record["git_commit"] == SHA


def test_exit_status_tolerates_what_argo_sends_when_nothing_failed(tmp_path):
    for failures in ("null", "", "{{workflow.failures}}", "[]"):
        argv = ["--store", str(tmp_path), "--run-id", "r1", "--status", "Succeeded", "--failures", failures]
        assert exit_status.main(argv) == 0
        record = json.loads((tmp_path / "runs" / "r1" / "_status.json").read_text())
        assert record["succeeded"] is True and record["failures"] == [] and record["failed_tasks"] == []


@pytest.mark.parametrize("stage", sorted(all_stages()))
def test_every_registry_stage_compiles_to_a_template(stage, plan, settings):
    """Generic over the registry: whatever stages exist, each gets a correct container template."""
    spec = all_stages()[stage]
    tmpl = argo._stage_template(spec, plan, settings)._build_template().model_dump(by_alias=True, exclude_none=True)
    assert tmpl["name"] == argo.stage_template_name(stage)
    assert tmpl["container"]["image"] == f"{REGISTRY}/{spec.image}:{SHA}"
    assert tmpl["container"]["command"] == ["python", "-m", spec.module]
    assert tmpl["activeDeadlineSeconds"] == spec.resources.timeout_s
    gpu = tmpl["container"]["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpu == str(spec.resources.gpus)) if spec.resources.uses_gpu else gpu is None


# ---------------------------------------------------------------------------------------------------------------
# settings and compile-time errors


def test_settings_load_from_the_chart_style_file_with_env_overrides(tmp_path, monkeypatch):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "namespace": "research", "imageRegistry": "registry.invalid/other", "imageTag": "v1",
        "gpuClasses": {"h200": {"nodeSelector": {"pool": "h200"}, "tolerations": [{"key": "gpu", "operator": "Exists"}]}},
        "podGC": {"strategy": "OnWorkflowSuccess"}, "priorityClass": None,
    }))
    monkeypatch.setenv("EPS_CLUSTER_CONFIG", str(path))
    s = ClusterSettings.load()
    assert s.namespace == "research" and s.image("eps-generate") == "registry.invalid/other/eps-generate:v1"
    assert s.gpu_classes["h200"].node_selector == {"pool": "h200"} and "h100" not in s.gpu_classes
    assert s.pod_gc.strategy == "OnWorkflowSuccess" and s.priority_class is None
    monkeypatch.setenv("EPS_IMAGE_TAG", "hotfix")
    monkeypatch.setenv("ARGO_NAMESPACE", "elsewhere")
    s = ClusterSettings.load()
    assert s.image("eps-judge").endswith(":hotfix") and s.namespace == "elsewhere"


def test_settings_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("EPS_CLUSTER_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ClusterError, match="not found"):
        ClusterSettings.load()
    bad = tmp_path / "bad.yaml"
    bad.write_text("namespace: eps\nretry: {limit: -1}\ngpuClasss: {}\n")
    with pytest.raises(ClusterError) as err:
        ClusterSettings.load(bad)
    assert "\n" not in str(err.value) and "bad" in str(err.value)


def test_a_stage_on_an_undefined_gpu_class_is_a_clear_error(plan):
    s = ClusterSettings(image_registry=REGISTRY, gpu_classes={"h200": ClusterSettings().gpu_classes["h200"]})
    with pytest.raises(ClusterError, match="GPU class 'h100'"):
        argo.compile_plan(plan, cluster=s)


def test_a_config_argo_would_template_is_refused(settings):
    b = PlanBuilder("issue164", "tiny", "r1", "s3://b/p")
    b.add("gen-x", "generate", "x", condition="x", model_ref="tiny:qwen2", questions=[{"id": "q", "text": "{{x}}"}])
    with pytest.raises(ClusterError, match="gen-x"):
        argo.compile_plan(b.plan({}), cluster=settings)


def test_tag_defaults_to_the_git_sha_and_registry_is_optional_for_yaml(plan, monkeypatch):
    s = ClusterSettings(git_sha=SHA)
    assert s.image("eps-generate") == f"eps-generate:{SHA}"
    monkeypatch.setenv("EPS_IMAGE_TAG", "release-1")
    assert ClusterSettings(git_sha=SHA).image("eps-generate") == "eps-generate:release-1"


# ---------------------------------------------------------------------------------------------------------------
# the Argo Server API against a loopback server


class FakeArgo:
    """A tiny Argo Server on 127.0.0.1 that records every request and answers like the real one."""

    def __init__(self):
        self.requests: list[dict] = []
        self.workflows: dict[str, dict] = {}
        self.create_status = 200
        self.token: str | None = None  # when set, any other bearer token is answered 401, as the server does
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                path, _, query = self.path.partition("?")
                req = {"method": self.command, "path": path, "query": parse_qs(query),
                       "headers": dict(self.headers), "body": json.loads(raw) if raw else None}
                outer.requests.append(req)
                return req

            def _refused(self, req) -> bool:
                if outer.token and req["headers"].get("Authorization") != f"Bearer {outer.token}":
                    msg = "token not valid. see https://argo-workflows.readthedocs.io/en/latest/faq/"
                    self._reply(401, {"code": 16, "message": msg})
                    return True
                return False

            def do_POST(self):  # noqa: N802
                req = self._record()
                if self._refused(req):
                    return
                wf = req["body"]["workflow"]
                name = wf["metadata"]["name"]
                if outer.create_status != 200 or name in outer.workflows:
                    msg = f'workflows.argoproj.io "{name}" already exists'
                    return self._reply(409, {"code": 6, "message": msg})
                wf = {**wf, "metadata": {**wf["metadata"], "uid": "u-1", "creationTimestamp": "2026-01-01T00:00:00Z"}}
                outer.workflows[name] = wf
                self._reply(200, wf)

            def do_GET(self):  # noqa: N802
                req = self._record()
                if self._refused(req):
                    return
                parts = req["path"].strip("/").split("/")
                if len(parts) == 5 and parts[4] in outer.workflows:
                    return self._reply(200, outer.workflows[parts[4]])
                if len(parts) == 4:  # list: GET /api/v1/workflows/{ns}?listOptions.labelSelector=k=v[,k=v]
                    wanted = dict(kv.split("=", 1) for sel in req["query"].get("listOptions.labelSelector", [])
                                  for kv in sel.split(","))
                    items = [w for w in outer.workflows.values()
                             if wanted.items() <= (w["metadata"].get("labels") or {}).items()]
                    return self._reply(200, {"metadata": {}, "items": items})
                msg = f'workflows.argoproj.io "{parts[-1]}" not found'
                self._reply(404, {"code": 5, "message": msg})

            def do_PUT(self):  # noqa: N802
                req = self._record()
                if self._refused(req):
                    return
                name = req["path"].strip("/").split("/")[4]
                if name not in outer.workflows:
                    return self._reply(404, {"code": 5, "message": "not found"})
                wf = outer.workflows[name]
                wf["status"] = {**wf.get("status", {}), "phase": "Running"}
                self._reply(200, wf)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture()
def argo_server(monkeypatch):
    with FakeArgo() as server:
        monkeypatch.setenv("ARGO_SERVER", server.url)
        monkeypatch.setenv("ARGO_TOKEN", "tok-123")
        yield server


def test_submit_posts_the_compiled_workflow_with_the_bearer_token(s3_plan, settings, argo_server):
    name, url = argo.submit(s3_plan, cluster=settings)
    assert name == "issue164-tiny-1a2b3c4d"
    assert url == f"{argo_server.url}/workflows/eps/{name}"
    [req] = argo_server.requests
    assert req["method"] == "POST" and req["path"] == "/api/v1/workflows/eps"
    assert req["headers"]["Authorization"] == "Bearer tok-123"
    assert req["headers"]["Content-Type"] == "application/json"
    body = req["body"]
    assert body["namespace"] == "eps"
    sent = body["workflow"]
    uris = {t.name: argo.config_uri(s3_plan, t.name, t.config) for t in s3_plan.tasks}
    expected = yaml.safe_load(argo.to_yaml(s3_plan, cluster=settings, config_uris=uris))
    assert sent["metadata"]["name"] == expected["metadata"]["name"]
    assert [t["name"] for t in sent["spec"]["templates"]] == [t["name"] for t in expected["spec"]["templates"]]
    assert dag_tasks(sent) == dag_tasks(expected)
    assert sent["spec"]["onExit"] == argo.EXIT_TEMPLATE
    for value in FAKE_SECRETS.values():
        assert value not in json.dumps(body)


def test_submit_keeps_an_explicit_bearer_prefix_and_refuses_a_second_submit(s3_plan, settings, argo_server):
    name, _ = argo.submit(s3_plan, token="Bearer abc.def", cluster=settings)
    assert argo_server.requests[-1]["headers"]["Authorization"] == "Bearer abc.def"
    # a second submit of the same run is refused with a pointer to retry
    with pytest.raises(ClusterError) as err:
        argo.submit(s3_plan, cluster=settings)
    text = str(err.value)
    assert "409" in text and "already exists" in text and "make retry" in text and "\n" not in text


def test_submit_without_server_or_token_is_one_clear_line(plan, settings, monkeypatch):
    with pytest.raises(ClusterError) as err:
        argo.submit(plan, cluster=settings)
    assert "ARGO_SERVER and ARGO_TOKEN are not set" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("ARGO_SERVER", "http://127.0.0.1:9")
    with pytest.raises(ClusterError, match="^ARGO_TOKEN is not set"):
        argo.submit(plan, cluster=settings)
    monkeypatch.delenv("ARGO_SERVER")
    monkeypatch.setenv("ARGO_TOKEN", "t")
    with pytest.raises(ClusterError, match="^ARGO_SERVER is not set"):
        cluster.status("some-run")


def test_submit_refuses_a_local_store_and_a_missing_registry(plan, settings, argo_server):
    local = plan.model_copy(update={"store": "file:///tmp/x"})
    with pytest.raises(ClusterError, match="s3://"):
        argo.submit(local, cluster=settings)
    with pytest.raises(ClusterError, match="EPS_IMAGE_REGISTRY"):
        argo.submit(plan, cluster=ClusterSettings(git_sha=SHA))
    assert argo_server.requests == []


def test_submit_refuses_to_guess_the_image_tag(s3_plan, argo_server, monkeypatch):
    monkeypatch.setattr(argo_settings, "git_commit", lambda: "unknown")
    with pytest.raises(ClusterError, match="EPS_IMAGE_TAG"):
        argo.submit(s3_plan, cluster=ClusterSettings(image_registry=REGISTRY))
    monkeypatch.setenv("EPS_IMAGE_TAG", "v1")
    name, _ = argo.submit(s3_plan, cluster=ClusterSettings(image_registry=REGISTRY))
    sent = argo_server.requests[-1]["body"]["workflow"]
    assert templates(sent)["generate"]["container"]["image"] == f"{REGISTRY}/eps-generate:v1"


def test_an_unreachable_server_is_one_clear_line(s3_plan, settings, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("ARGO_SERVER", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("ARGO_TOKEN", "t")
    with pytest.raises(ClusterError, match="cannot reach the Argo Server"):
        argo.submit(s3_plan, cluster=settings)


def test_server_address_forms(monkeypatch):
    monkeypatch.setenv("ARGO_TOKEN", "t")
    monkeypatch.setenv("ARGO_SERVER", "argo.invalid:2746")
    conn = cluster.connect(namespace="ns")
    assert conn.server == "https://argo.invalid:2746" and conn.token == "Bearer t" and conn.verify_ssl
    monkeypatch.setenv("ARGO_SECURE", "false")
    monkeypatch.setenv("ARGO_BASE_HREF", "argo/")
    monkeypatch.setenv("ARGO_INSECURE_SKIP_VERIFY", "true")
    conn = cluster.connect(namespace="ns")
    assert conn.server == "http://argo.invalid:2746" and not conn.verify_ssl
    assert conn.ui_url("wf-1") == "http://argo.invalid:2746/argo/workflows/ns/wf-1"


def _with_status(server: FakeArgo, name: str, phase: str) -> None:
    server.workflows[name]["status"] = {
        "phase": phase, "progress": "3/5", "startedAt": "2026-01-01T00:00:00Z",
        "nodes": {
            "n0": {"id": "n0", "name": name, "displayName": name, "type": "DAG", "phase": phase},
            "n1": {"id": "n1", "name": f"{name}.gen-null", "displayName": "gen-null", "type": "Retry",
                   "phase": "Failed", "message": "No more retries left", "children": ["n2", "n3"]},
            "n2": {"id": "n2", "name": f"{name}.gen-null(0)", "displayName": "gen-null(0)", "type": "Pod",
                   "phase": "Failed", "message": "OOMKilled"},
            "n3": {"id": "n3", "name": f"{name}.gen-null(1)", "displayName": "gen-null(1)", "type": "Pod",
                   "phase": "Failed", "message": "OOMKilled"},
            "n4": {"id": "n4", "name": f"{name}.gen-policy", "displayName": "gen-policy", "type": "Retry",
                   "phase": "Succeeded", "children": ["n5"]},
            "n5": {"id": "n5", "name": f"{name}.gen-policy(0)", "displayName": "gen-policy(0)", "type": "Pod",
                   "phase": "Succeeded"},
            "n6": {"id": "n6", "name": f"{name}.onExit", "displayName": f"{name}.onExit", "type": "Pod",
                   "phase": "Succeeded"},
        },
    }


def test_status_and_retry_wrap_the_argo_server_api(s3_plan, settings, argo_server):
    name, _ = argo.submit(s3_plan, cluster=settings)
    _with_status(argo_server, name, "Failed")

    st = cluster.status(name)
    assert st.phase == "Failed" and st.progress == "3/5"
    assert [(t.name, t.phase, t.retries) for t in st.tasks] == [("gen-null", "Failed", 1), ("gen-policy", "Succeeded", 0)]
    text = str(st)
    assert "gen-null" in text and "make retry RUN=" in text and st.url in text
    get = argo_server.requests[-1]
    assert get["method"] == "GET" and get["path"] == f"/api/v1/workflows/eps/{name}"
    assert get["headers"]["Authorization"] == "Bearer tok-123"

    result = cluster.retry(s3_plan.run_id)  # the run id finds the workflow too
    put = argo_server.requests[-1]
    assert put["method"] == "PUT" and put["path"] == f"/api/v1/workflows/eps/{name}/retry"
    assert put["body"]["name"] == name and put["body"]["namespace"] == "eps"
    assert not put["body"].get("restartSuccessful")  # succeeded cells are kept
    assert result.name == name and result.tasks == ("gen-null",) and result.url.endswith(f"/workflows/eps/{name}")
    assert "retrying" in str(result)

    with pytest.raises(ClusterError, match="only a Failed or Error workflow"):  # it is Running now
        cluster.retry(name)


def test_status_of_an_unknown_run_is_one_clear_line(argo_server):
    with pytest.raises(ClusterError) as err:
        cluster.status("nope")
    assert "no workflow 'nope'" in str(err.value)


def test_workflow_names_are_dns_labels():
    assert cluster.workflow_name("Issue164_full/AB12") == "issue164-full-ab12"
    assert len(cluster.workflow_name("x" * 100)) == 63
    assert argo.label_value("-grid #1 (policy)-") == "grid-1-policy"


def test_status_finds_a_resubmitted_run_by_its_run_id_label(plan, settings, argo_server):
    """A workflow resubmitted from the UI gets a new name but keeps the labels: the run id still finds it."""
    wf = yaml.safe_load(argo.to_yaml(plan, cluster=settings))
    other = json.loads(json.dumps(wf))
    other["metadata"].update(name="issue81-tiny-99", labels={**wf["metadata"]["labels"], "eps/run-id": "issue81-tiny-99"},
                             creationTimestamp="2026-01-03T00:00:00Z")  # newer: found only if the selector is ignored
    wf["metadata"].update(name=f"{wf['metadata']['name']}-x7k2p", creationTimestamp="2026-01-02T00:00:00Z")
    argo_server.workflows = {w["metadata"]["name"]: w for w in (other, wf)}
    _with_status(argo_server, wf["metadata"]["name"], "Failed")

    st = cluster.status(plan.run_id)
    assert st.name == f"{plan.run_id}-x7k2p" and st.phase == "Failed"
    listing = argo_server.requests[-1]
    assert listing["method"] == "GET" and listing["path"] == "/api/v1/workflows/eps"
    assert listing["query"]["listOptions.labelSelector"] == [f"eps/run-id={plan.run_id}"]


def test_a_rejected_token_is_one_line_that_names_argo_token(s3_plan, settings, argo_server):
    argo_server.token = "the-right-one"
    for call in (lambda: argo.submit(s3_plan, cluster=settings), lambda: cluster.status(s3_plan.run_id),
                 lambda: cluster.retry(s3_plan.run_id)):
        with pytest.raises(ClusterError) as err:
            call()
        text = str(err.value)
        assert "401" in text and "ARGO_TOKEN" in text and "\n" not in text and "tok-123" not in text
    assert argo_server.workflows == {}


def test_a_multi_gpu_stage_is_refused_while_the_semaphore_counts_pods(plan, settings):
    spec = all_stages()["generate"]
    two = dataclasses.replace(spec, resources=spec.resources.model_copy(update={"gpus": 2}))
    with pytest.raises(ClusterError, match="asks for 2 GPUs"):
        argo._stage_template(two, plan, settings)
    off = settings.model_copy(update={"gpu_semaphore": Semaphore(enabled=False)})
    tmpl = argo._stage_template(two, plan, off)._build_template().model_dump(by_alias=True, exclude_none=True)
    assert tmpl["container"]["resources"]["limits"]["nvidia.com/gpu"] == "2" and "synchronization" not in tmpl


# ---------------------------------------------------------------------------------------------------------------
# the command line that `make submit|status|retry` runs


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from workflows.__main__ import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def image_registry(monkeypatch):
    """A loopback registry holding every image of this commit (token auth, as hosted registries do)."""
    from tests.fakes.registry import FakeRegistry

    with FakeRegistry(token_auth=True) as fake:
        fake.images = {f"lab/{s.image}:{SHA}" for s in all_stages().values()} | {f"lab/{argo.EXIT_STATUS_IMAGE}:{SHA}"}
        monkeypatch.setenv("EPS_IMAGE_REGISTRY", f"{fake.host}/lab")
        yield fake


def test_make_submit_status_retry_on_the_command_line(argo_server, image_registry, s3_bucket, monkeypatch, capsys):
    run_id = "issue164-tiny-cli"
    code, out, err = cli(["submit", "issue164", "--profile", "tiny", "--store", f"{s3_bucket}/t",
                          "--run-id", run_id], capsys)
    assert code == 0, err
    url = f"{argo_server.url}/workflows/eps/{run_id}"
    # the estimated GPU time first (the cost gate; far below its threshold here), then what was submitted
    assert out.startswith(f"estimated GPU time of issue164 (tiny profile), run {run_id}")
    assert out.splitlines()[-2:] == [f"submitted {run_id}", f"Argo UI: {url}"]
    sent = argo_server.requests[-1]["body"]["workflow"]
    assert templates(sent)["generate"]["container"]["image"] == f"{image_registry.host}/lab/eps-generate:{SHA}"
    checked = {path for method, path, _ in image_registry.requests if method == "HEAD"}
    assert f"/v2/lab/eps-generate/manifests/{SHA}" in checked and f"/v2/lab/{argo.EXIT_STATUS_IMAGE}/manifests/{SHA}" in checked

    _with_status(argo_server, run_id, "Failed")
    code, out, err = cli(["status", run_id], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == f"workflow {run_id}: Failed (3/5 tasks)" and f"Argo UI: {url}" in out
    assert "gen-null" in out and f"make retry RUN={run_id}" in out

    code, out, err = cli(["retry", run_id], capsys)
    assert code == 0, err
    assert out.splitlines() == [f"retrying {run_id}: failed tasks rerun (gen-null), completed cells are kept",
                                f"Argo UI: {url}"]
    assert argo_server.requests[-1]["path"] == f"/api/v1/workflows/eps/{run_id}/retry"
    for value in FAKE_SECRETS.values():
        assert value not in out + err and value not in json.dumps(argo_server.requests)


@pytest.mark.parametrize("argv", [["submit", "issue164", "--profile", "full"], ["status", "r1"], ["retry", "r1"]])
def test_missing_argo_server_and_token_is_one_error_line(argv, capsys):
    """``make submit`` without ARGO_SERVER/ARGO_TOKEN: one line, before a full plan could ask for its files."""
    code, out, err = cli(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ARGO_SERVER and ARGO_TOKEN are not set") and err.count("\n") == 1


@pytest.mark.parametrize("command", ["status", "retry"])
def test_status_and_retry_without_a_run_is_one_error_line(command, capsys):
    code, out, err = cli([command], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and f"make {command} RUN=" in err


# ---------------------------------------------------------------------------------------------------------------
# the cluster keeps up: configs by URI, complete tasks left out, each stage's own retry count


def complete_in_store(task, rows=None) -> None:
    """Make ``task`` complete in its store the way its stage would: outputs staged, then committed."""
    import time

    from shared.contract import stage
    from shared.core import store

    cfg = task.parsed_config()
    inputs = stage.input_hashes(cfg)
    key = stage.cache_key(task.spec, cfg, inputs)
    ctx = stage.Context(task.spec, cfg, stage.staging_prefix(cfg, task.stage, key))
    store.write_jsonl(ctx.out("completions.jsonl"), rows or [{"text": f"made for {task.name}"}])
    stage._commit(ctx, cfg, inputs, key, time.time(), {})


def test_submit_passes_each_config_by_its_store_uri(s3_plan, settings, argo_server):
    from shared.core import store

    argo.submit(s3_plan, cluster=settings)
    sent = argo_server.requests[-1]["body"]["workflow"]
    for name, task in dag_tasks(sent).items():
        uri = params_of(task)["config"]
        assert uri.startswith(f"{s3_plan.store}/runs/{s3_plan.run_id}/_configs/{name}-")
        assert store.read_json(uri) == json.loads(json.dumps(s3_plan.task(name).config))
    inline = len(argo.to_yaml(s3_plan, cluster=settings))
    assert len(json.dumps(sent)) < inline  # the configs' bulk stays in the store


def test_submit_leaves_out_tasks_complete_in_the_store_and_their_edges(s3_plan, settings, argo_server, capsys):
    from shared.core import store

    em, base = s3_plan.task("gen-classifier-em"), s3_plan.task("gen-classifier-base")
    complete_in_store(em)
    complete_in_store(base)
    done = argo.submit(s3_plan, cluster=settings)
    assert done.left_out == {"gen-classifier-em": "cached", "gen-classifier-base": "cached"}
    dag = dag_tasks(argo_server.requests[-1]["body"]["workflow"])
    assert set(dag) == {t.name for t in s3_plan.tasks} - set(done.left_out)
    assert "dependencies" not in dag["train-classifier"]  # what it waited for is already there

    # an output edited after its manifest does not count as complete: that task is submitted again
    store.write_jsonl(base.output_uri("completions.jsonl"), [{"text": "edited"}])
    argo_server.workflows.clear()
    again = argo.submit(s3_plan, cluster=settings)
    assert again.left_out == {"gen-classifier-em": "cached"}
    assert "no longer matches its manifest" in capsys.readouterr().err


def test_a_run_whose_every_task_is_complete_submits_nothing(s3_plan, settings, argo_server, monkeypatch):
    from shared.contract.stage import Settled
    from workflows import plan as plan_module

    monkeypatch.setattr(plan_module.Task, "settle", lambda self, warn=None: Settled("cached", {}))
    done = argo.submit(s3_plan, cluster=settings)
    assert done.name is None and len(done.left_out) == len(s3_plan.tasks)
    assert argo_server.requests == []


def test_a_new_run_id_on_the_cluster_reuses_complete_results(s3_plan, settings, argo_server):
    em = s3_plan.task("gen-classifier-em")
    complete_in_store(em)
    from workflows import issue164

    other = issue164.build(issue164.Params.for_profile("tiny"), profile="tiny", run_id="another", store=s3_plan.store)
    done = argo.submit(other, cluster=settings)
    assert done.left_out == {"gen-classifier-em": "reused"}
    assert other.task("gen-classifier-em").output_uri("completions.jsonl") != em.output_uri("completions.jsonl")
    from shared.core import store

    assert store.read_jsonl(other.task("gen-classifier-em").output_uri("completions.jsonl")) == [
        {"text": "made for gen-classifier-em"}]


def test_a_stage_with_its_own_retry_count_keeps_it_on_the_cluster(plan, settings, monkeypatch):
    spec = all_stages()["judge"]
    monkeypatch.setattr(spec, "resources", spec.resources.model_copy(update={"retries": 7}))
    wf = yaml.safe_load(argo.to_yaml(plan, cluster=settings))
    assert str(templates(wf)["judge"]["retryStrategy"]["limit"]) == "7"
    assert str(templates(wf)["generate"]["retryStrategy"]["limit"]) == str(settings.retry.limit)


# ---------------------------------------------------------------------------------------------------------------
# submit sends nothing whose images CI has not pushed, and no run without its store


def test_submit_with_an_image_missing_from_the_registry_is_one_line_and_sends_nothing(
        argo_server, image_registry, s3_bucket, capsys):
    image_registry.images.discard(f"lab/eps-judge:{SHA}")
    sent_before = len(argo_server.requests)
    code, out, err = cli(["submit", "issue164", "--profile", "tiny", "--store", f"{s3_bucket}/t", "--run-id", "r-miss"],
                         capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "not in the registry" in err and f"eps-judge:{SHA}" in err and "wait for CI" in err
    assert len(argo_server.requests) == sent_before  # the workflow was never sent


def test_the_registry_check_follows_the_token_challenge_and_tells_present_from_absent():
    import requests

    from tests.fakes.registry import TOKEN, FakeRegistry
    with FakeRegistry(token_auth=True) as fake, requests.Session() as session:
        fake.images = {"lab/eps-generate:abc"}
        assert cluster.image_exists(session, f"{fake.host}/lab/eps-generate:abc")
        assert not cluster.image_exists(session, f"{fake.host}/lab/eps-generate:def")
        heads = [auth for method, _, auth in fake.requests if method == "HEAD"]
        assert heads[0] is None and f"Bearer {TOKEN}" in heads  # asked, challenged, then with the token
        with pytest.raises(cluster.ClusterError, match="2 of 2 images are not in the registry for tag zzz"):
            cluster.check_images([f"{fake.host}/lab/eps-a:zzz", f"{fake.host}/lab/eps-b:zzz"])
        cluster.check_images([f"{fake.host}/lab/eps-generate:abc"])  # all present: silent


def test_an_unreachable_registry_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("EPS_IMAGE_REGISTRY_INSECURE", "true")
    with pytest.raises(cluster.ClusterError, match="unreachable while checking"):
        cluster.check_images(["127.0.0.1:9/lab/eps-generate:abc"])  # the discard port: nothing listens


@pytest.mark.parametrize("command", ["yaml", "submit"])
def test_cluster_commands_need_an_explicit_store(command, argo_server, monkeypatch, capsys):
    monkeypatch.delenv("EPS_STORE", raising=False)
    monkeypatch.setenv("EPS_IMAGE_REGISTRY", REGISTRY)
    code, out, err = cli([command, "issue164", "--profile", "tiny"], capsys)
    assert code == 2 and err.count("\n") == 1 and "needs the run's store" in err and "EPS_STORE" in err, err
# what the Argo UI shows: Argo's own schema, results as outputs, the report as artifacts, a title

ARGO_SCHEMA = Path(__file__).parent / "data" / "argo_workflow_schema_v3.6.19.json"  # the oldest Argo we support


def argo_validator():
    """Argo's JSON schema of a Workflow, vendored, made strict: an unknown field is an error (Argo's schema allows
    any), and IntOrString fields take an integer or a string, as Argo's CRD says (``x-kubernetes-int-or-string``;
    the JSON schema writes them as strings only)."""
    import jsonschema

    schema = json.loads(ARGO_SCHEMA.read_text())
    for definition in schema["definitions"].values():
        if "properties" in definition:
            definition.setdefault("additionalProperties", False)
    schema["definitions"]["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = {
        "anyOf": [{"type": "integer"}, {"type": "string"}]}
    return jsonschema.Draft202012Validator(schema)


def schema_errors(wf: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:120]}" for e in argo_validator().iter_errors(wf)]


def tiny_plan(workflow: str, store_root: str = "s3://eps-artifacts/lab") -> Plan:
    import workflows

    module = workflows.load(workflow)
    return module.build(module.Params.for_profile("tiny"), profile="tiny", run_id=f"{workflow}-tiny-ui", store=store_root)


@pytest.mark.parametrize("workflow", ["issue164", "issue170", "issue81", "issue205"])
def test_every_compiled_workflow_validates_against_argos_schema(workflow):
    settings = ClusterSettings(image_registry=REGISTRY, git_sha=SHA, tracking={"backend": "wandb"})
    wf = yaml.safe_load(argo.to_yaml(tiny_plan(workflow), cluster=settings))
    assert schema_errors(wf) == []


def test_the_schema_check_rejects_what_argo_would(wf):
    """The check can fail: a misspelt field, a wrong type and an output artifact without a name are caught."""
    import copy

    broken = copy.deepcopy(wf)
    broken["spec"]["artifactRepositoryRefs"] = broken["spec"].pop("artifactRepositoryRef")
    analysis = next(t for t in broken["spec"]["templates"] if t["name"] == "analyze-issue164")
    analysis["outputs"]["parameters"][0]["valueFrom"]["path"] = ["not", "a", "string"]
    del analysis["outputs"]["artifacts"][0]["name"]
    errors = schema_errors(broken)
    assert any("artifactRepositoryRefs" in e for e in errors)
    assert any(e.startswith("spec.templates.") and "is not of type 'string'" in e for e in errors)
    assert any("'name' is a required property" in e for e in errors)
    assert len(errors) == 3


def test_every_stage_shows_its_metrics_and_manifest_and_the_analysis_its_report(plan, wf):
    from shared.contract.stage import ARGO_MANIFEST_FILE, ARGO_METRICS_FILE, ARGO_OUTPUTS_ENV

    for task in plan.tasks:
        _, tmpl = stage_of(plan, wf, task.name)
        env = {e["name"]: e.get("value") for e in tmpl["container"]["env"]}
        outputs = {p["name"]: p["valueFrom"] for p in tmpl["outputs"]["parameters"]}
        assert outputs["metrics"] == {"path": f"{env[ARGO_OUTPUTS_ENV]}/{ARGO_METRICS_FILE}", "default": "{}"}
        assert outputs["manifest"] == {"path": f"{env[ARGO_OUTPUTS_ENV]}/{ARGO_MANIFEST_FILE}", "default": ""}
        artifacts = tmpl["outputs"].get("artifacts", [])
        assert bool(artifacts) == (task.stage == "analyze_issue164"), task.name
    analysis = templates(wf)["analyze-issue164"]
    arts = {a["name"]: a for a in analysis["outputs"]["artifacts"]}
    assert set(arts) == {"report", "reproducibility", "headline", "figures"}
    where = f"test/runs/{plan.run_id}/_argo/{{{{inputs.parameters.cell}}}}"
    for name, file in (("report", "report.md"), ("reproducibility", "REPRODUCIBILITY.md"),
                       ("headline", "headline.json"), ("figures", "figures")):
        art = arts[name]
        # key-only: bucket, endpoint and credentials come from the chart's artifact repository
        assert art["s3"] == {"key": f"{where}/{file}"}
        assert art["path"] == f"/tmp/eps/outputs/{file}" and art["optional"] is True
        assert art["archive"] == {"none": {}}  # stored as is, so the UI opens it instead of offering a tarball
    assert wf["spec"]["artifactRepositoryRef"] == {"configMap": "eps-artifact-repositories", "key": "eps-s3"}


def test_without_an_artifact_repository_there_are_no_artifacts(plan):
    settings = ClusterSettings(image_registry=REGISTRY, git_sha=SHA, artifact_repository={"enabled": False})
    wf = yaml.safe_load(argo.to_yaml(plan, cluster=settings))
    assert "artifactRepositoryRef" not in wf["spec"]
    assert all("artifacts" not in t.get("outputs", {}) for t in wf["spec"]["templates"])
    assert schema_errors(wf) == []


def test_the_workflow_carries_a_title_and_its_estimated_gpu_time(plan, wf):
    from shared.contract import cost
    from workflows import cost as plan_cost

    notes = wf["metadata"]["annotations"]
    assert notes["workflows.argoproj.io/title"] == f"issue164 · tiny · {plan.run_id}"
    hours = cost.totals(plan_cost.estimate(plan))["declared"]
    assert notes["workflows.argoproj.io/description"].endswith(f"; estimated {hours:.1f} GPU-hours")


def test_a_stage_in_a_pod_leaves_the_files_its_template_reads(tmp_path, monkeypatch, wf):
    """The real entrypoint of a stage (``run_stage``) with ``EPS_ARGO_OUTPUTS`` set, as the template sets it: the
    files land where the template's output parameters and artifacts read them."""
    from shared.contract import stage as stage_contract
    from shared.core import store
    from shared.core.config import StageConfig

    def run(cfg, ctx):
        store.write_text(ctx.out("report.md"), "# report\n")
        store.write_json(ctx.out("headline.json"), {"alpha": 42.0})
        store.write_bytes(ctx.out("c_vs_alpha.png"), b"\x89PNG\r\n\x1a\n")
        store.write_text(ctx.out("rows.jsonl"), "{}\n")
        return {"null": {"alpha": 42.0, "n": 18}, "verdict": "passes", "curve": [1, 2, 3]}

    spec = stage_contract.StageSpec(name="analyze_fake", config=StageConfig, run=run)
    pod_outputs = tmp_path / "pod" / "outputs"
    monkeypatch.setenv(stage_contract.ARGO_OUTPUTS_ENV, str(pod_outputs))
    root = store.from_path(tmp_path / "store")
    assert stage_contract.run_stage(spec, ["--config", json.dumps({"store": root, "run_id": "r", "cell": "analysis"})]) == 0

    analysis = templates(wf)["analyze-issue164"]
    params = {p["name"]: p["valueFrom"]["path"] for p in analysis["outputs"]["parameters"]}
    here = {name: pod_outputs / Path(path).relative_to("/tmp/eps/outputs") for name, path in params.items()
            if path.startswith("/tmp/eps/outputs/")}
    assert json.loads(here["metrics"].read_text()) == {"null.alpha": 42.0, "null.n": 18, "verdict": "passes"}
    assert here["manifest"].read_text() == f"{root}/runs/r/analysis/analyze_fake/manifest.json"
    files = {a["name"]: pod_outputs / Path(a["path"]).relative_to("/tmp/eps/outputs")
             for a in analysis["outputs"]["artifacts"]}
    assert files["report"].read_text() == "# report\n"
    assert json.loads(files["headline"].read_text()) == {"alpha": 42.0}
    assert [p.name for p in files["figures"].iterdir()] == ["c_vs_alpha.png"]
    assert not files["reproducibility"].exists()  # optional: this stage wrote none

    # a second run settles from the cache and still leaves the outputs (a retried pod shows them too)
    for path in pod_outputs.rglob("*"):
        if path.is_file():
            path.unlink()
    assert stage_contract.run_stage(spec, ["--config", json.dumps({"store": root, "run_id": "r", "cell": "analysis"})]) == 0
    assert json.loads(here["metrics"].read_text())["verdict"] == "passes"


def test_metrics_for_the_ui_are_the_scalars_flattened_and_kept_small():
    from shared.contract.stage import flat_metrics

    metrics = {"b": {"x": 1.5, "y": [1, 2]}, "a": True, "s": "t" * 500, "z": None}
    assert flat_metrics(metrics) == {"a": True, "b.x": 1.5, "s": "t" * 200, "z": None}
    many = {f"m{i:04d}": float(i) for i in range(2000)}
    kept = flat_metrics(many, limit=1000)
    assert len(json.dumps(kept)) <= 1000 and list(kept) == sorted(kept) and kept["m0000"] == 0.0


def test_outside_argo_a_stage_writes_no_output_files(tmp_path, monkeypatch):
    from shared.contract.stage import ARGO_OUTPUTS_ENV, write_argo_outputs

    monkeypatch.delenv(ARGO_OUTPUTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    write_argo_outputs({"prefix": "file:///nowhere", "metrics": {"a": 1}, "outputs": {}})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# the cost gate


def full_issue170_args(tmp_path, store_root: str) -> list[str]:
    questions, panel = tmp_path / "questions.jsonl", tmp_path / "panel.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i:03d}", "text": f"Question {i}?"}) + "\n" for i in range(177)))
    panel.write_text("".join(json.dumps({"id": f"p{i:02d}", "text": f"Panel question {i}?"}) + "\n" for i in range(52)))
    return ["submit", "issue170", "--profile", "full", "--store", store_root, "--run-id", "issue170-full-gate",
            "--set", f"questions_file={questions}", "--set", f"panel_file={panel}"]


def test_a_full_issue170_submit_without_approve_stops_before_anything_is_sent(
        tmp_path, argo_server, s3_bucket, monkeypatch, capsys):
    from shared.core import store

    monkeypatch.setenv("EPS_IMAGE_REGISTRY", REGISTRY)
    argv = full_issue170_args(tmp_path, f"{s3_bucket}/gate")
    code, out, err = cli(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and "above the 20 GPU-hour gate: nothing was sent" in err and "--approve" in err
    assert out.startswith("estimated GPU time of issue170 (full profile), run issue170-full-gate")
    assert "| train_soft_prefix |" in out and "| gcg_search |" in out
    assert argo_server.requests == []  # no request reached the Argo Server
    assert not [u for u in store.list_uris(f"{s3_bucket}/gate") if "/_configs/" in u or u.endswith("_plan.json")]


def test_the_threshold_is_a_parameter_and_approve_lets_a_plan_above_it_through(argo_server, image_registry, s3_bucket,
                                                                              capsys):
    """The tiny plan's estimate (the sampler's compile per GPU task, ~0.02 GPU-hours) against two thresholds."""
    argv = ["submit", "issue164", "--profile", "tiny", "--store", f"{s3_bucket}/t"]
    code, out, err = cli([*argv, "--run-id", "above", "--max-gpu-hours", "0.001"], capsys)
    assert code == 2 and "above the 0.001 GPU-hour gate" in err and argo_server.requests == []
    code, out, err = cli([*argv, "--run-id", "below", "--max-gpu-hours", "1"], capsys)
    assert code == 0, err
    code, out, err = cli([*argv, "--run-id", "above", "--max-gpu-hours", "0.001", "--approve"], capsys)
    assert code == 0, err
    assert out.splitlines()[-2] == "submitted above"
    assert [r["body"]["workflow"]["metadata"]["name"] for r in argo_server.requests] == ["below", "above"]


def test_workflow_yaml_prints_the_estimate_beside_the_yaml(tmp_path, capsys):
    code, out, err = cli(["yaml", "issue164", "--profile", "tiny", "--store", "s3://b/p", "--run-id", "y"], capsys)
    assert code == 0
    assert yaml.safe_load(out)["kind"] == "Workflow"  # stdout is the YAML alone: it can be piped
    assert err.startswith("estimated GPU time of issue164 (tiny profile), run y") and "| generate |" in err
    code, out, err = cli(["yaml", "issue164", "--profile", "tiny", "--store", "s3://b/p", "--run-id", "y",
                          "-o", str(tmp_path / "wf.yaml")], capsys)
    assert code == 0 and "| generate |" in out and out.rstrip().endswith(f"wrote {tmp_path / 'wf.yaml'}")

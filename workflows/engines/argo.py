"""The Argo engine: compile a plan with Hera into an Argo ``Workflow``, print it as YAML, or submit it.

The plan is the single definition; this module only translates it:

- one container template per stage (image ``<registry>/eps-<stage>:<tag>``, command ``python -m jobs.<stage>``),
  resources and ``activeDeadlineSeconds`` from the stage's ``Resources``;
- one DAG task per plan task, named as in the plan (the cell), passing the task's config JSON and cell;
- GPU templates get ``nvidia.com/gpu``, the node selector and tolerations of their GPU class, and hold a slot of
  the GPU semaphore (a ConfigMap key per class) while they run; a slot is one pod, so with the semaphore on a GPU
  stage must use exactly one GPU (compiling refuses others) and the cap counts GPUs;
- every template retries with exponential backoff (but not on exit code 2: bad input does not get better), as
  many times as the stage's ``Resources.retries`` says (else the cluster default), like the local engine;
- pods carry labels for experiment, run, cell, stage and git sha; pod GC, a TTL for succeeded workflows, a
  priority class, a non-root security context, caches in writable volumes;
- an exit handler (``python -m workflows.exit_status``) writes ``<store>/runs/<run_id>/_status.json``.

``submit`` leaves out the tasks whose results the store already holds (verified, as the stages would find them),
and puts every task's config in the store (``runs/<run_id>/_configs/``) so a task receives a URI, not the config.

Cluster specifics (namespace, registry, node pools, secret names ...) live in ``ClusterSettings``, read from the
file at ``EPS_CLUSTER_CONFIG`` (the Helm chart renders it into the ``eps-cluster-config`` ConfigMap).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from shared.contract.stage import StageSpec
from shared.core import store
from workflows.cluster import connect
from workflows.engines.argo_names import ClusterError, dns_label, label_value, workflow_name
from workflows.engines.argo_settings import ClusterSettings, NodePool
from workflows.plan import Plan

__all__ = [
    "ClusterError", "ClusterSettings", "compile_plan", "to_yaml", "to_dict", "submit", "stage_template_name",
    "EXIT_TEMPLATE", "ENTRY_TEMPLATE", "EXIT_STATUS_IMAGE", "LABEL_PREFIX",
]

ENTRY_TEMPLATE = "main"
TITLE_ANNOTATION = "workflows.argoproj.io/title"
DESCRIPTION_ANNOTATION = "workflows.argoproj.io/description"
EXIT_TEMPLATE = "exit-status"
EXIT_STATUS_IMAGE = "eps-exit-status"  # images/exit-status.Dockerfile: python -m workflows.exit_status
LABEL_PREFIX = "eps"
PLAN_RECORD = "_plan.json"  # beside the run's tasks in the store: workflow, profile, run id, parameters
MAX_WORKFLOW_BYTES = 900_000  # etcd stores objects up to ~1.5 MB and Argo adds status to the same object
# ---------------------------------------------------------------------------------------------------------------
# compiling


def stage_template_name(stage: str) -> str:
    return dns_label(stage)


def _config_json(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)


def _pod_security():
    from hera.workflows import models as m

    return m.PodSecurityContext(
        run_as_non_root=True, seccomp_profile=m.SeccompProfile(type="RuntimeDefault"),
    )


def _container_security(uid: int):
    from hera.workflows import models as m

    return m.SecurityContext(
        run_as_non_root=True, run_as_user=uid, run_as_group=uid, allow_privilege_escalation=False,
        capabilities=m.Capabilities(drop=["ALL"]),
    )


def _retry_strategy(settings: ClusterSettings, limit: int | None = None):
    from hera.workflows import RetryStrategy
    from hera.workflows import models as m

    r = settings.retry
    expression = " && ".join(f"lastRetry.exitCode != '{code}'" for code in r.no_retry_exit_codes) or None
    return RetryStrategy(
        limit=r.limit if limit is None else limit, retry_policy=r.policy, expression=expression,
        backoff=m.Backoff(duration=r.backoff_duration, factor=r.backoff_factor, max_duration=r.backoff_max_duration),
    )


def _common_env(settings: ClusterSettings, plan: Plan, image: str) -> list:
    from hera.workflows import Env
    from hera.workflows import SecretEnv as HeraSecretEnv

    cache = settings.cache.mount_path
    sha = settings.resolved_git_sha()
    env = [
        Env(name="EPS_GIT_SHA", value=sha),
        # images are built by CI from the commit they are tagged with: their code is that commit, unmodified
        *([Env(name="EPS_GIT_DIRTY", value="false")] if settings.resolved_tag() == sha else []),
        Env(name="EPS_IMAGE", value=image),
        Env(name="EPS_EXPERIMENT", value=plan.workflow),
        Env(name="EPS_RUN_ID", value=plan.run_id),
        Env(name="EPS_PROFILE", value=plan.profile),
        Env(name="EPS_CACHE", value=f"{cache}/eps"),
        Env(name="HF_HOME", value=f"{cache}/huggingface"),
        Env(name="XDG_CACHE_HOME", value=cache),
        Env(name="PIP_CACHE_DIR", value=f"{cache}/pip"),
        Env(name="TORCH_HOME", value=f"{cache}/torch"),
        Env(name="VLLM_CACHE_ROOT", value=f"{cache}/vllm"),
        Env(name="TRITON_CACHE_DIR", value=f"{cache}/triton"),
        Env(name="PYTHONUNBUFFERED", value="1"),
    ]
    env += [HeraSecretEnv(name=s.env, secret_name=s.secret, secret_key=s.key, optional=True) for s in settings.secret_env]
    return env + _tracking_env(settings, plan)


TRACKING_URL_FILE = "/tmp/eps/tracking-url"  # on the /tmp emptyDir; shared.contract.tracking writes the W&B run URL here
TRACKING_OUTPUT = "tracking-url"


def _tracking_env(settings: ClusterSettings, plan: Plan) -> list:
    """Tracking on: the W&B project and where the SDK may write (the image's home is not writable); off: said so."""
    from hera.workflows import Env

    from shared.contract import tracking

    t = settings.tracking
    chosen = t.chosen(plan)
    if chosen != "wandb":
        return [Env(name="EPS_TRACKING", value="off")] if plan.tracking == "off" else []
    values = {
        "EPS_TRACKING": "wandb",
        "WANDB_PROJECT": t.project or os.environ.get("WANDB_PROJECT", "").strip() or tracking.DEFAULT_PROJECT,
        "WANDB_ENTITY": t.entity or os.environ.get("WANDB_ENTITY", "").strip(),
        "WANDB_BASE_URL": t.base_url,
        "WANDB_DIR": "/tmp",
        "WANDB_CONFIG_DIR": "/tmp/wandb-config",
        "WANDB_CACHE_DIR": f"{settings.cache.mount_path}/wandb",
        "WANDB_DATA_DIR": f"{settings.cache.mount_path}/wandb-data",
        tracking.URL_FILE_ENV: TRACKING_URL_FILE,
    }
    return [Env(name=k, value=v) for k, v in values.items() if v]


def _tracking_outputs(settings: ClusterSettings, plan: Plan) -> list | None:
    """The W&B run's URL as the task's ``tracking-url`` output, shown in the Argo UI beside the task."""
    from hera.workflows import Parameter
    from hera.workflows import models as m

    if settings.tracking.chosen(plan) != "wandb":
        return None
    return [Parameter(name=TRACKING_OUTPUT, value_from=m.ValueFrom(path=TRACKING_URL_FILE, default=""))]


# on the /tmp emptyDir; shared.contract.stage.write_argo_outputs fills it
ARGO_OUTPUTS_DIR = "/tmp/eps/outputs"
METRICS_OUTPUT = "metrics"
MANIFEST_OUTPUT = "manifest"
REPORT_STAGE_PREFIX = "analyze_"  # the analysis stages: they write report.md, headline.json and the figures
REPORT_ARTIFACTS = {"report": "report.md", "reproducibility": "REPRODUCIBILITY.md", "headline": "headline.json"}
FIGURES_ARTIFACT = "figures"


def _argo_outputs_env() -> list:
    from hera.workflows import Env

    from shared.contract.stage import ARGO_OUTPUTS_ENV

    return [Env(name=ARGO_OUTPUTS_ENV, value=ARGO_OUTPUTS_DIR)]


def _result_outputs() -> list:
    """Every stage's headline metrics (JSON of the flattened scalars) and its manifest's URI, shown in the UI."""
    from hera.workflows import Parameter
    from hera.workflows import models as m

    from shared.contract.stage import ARGO_MANIFEST_FILE, ARGO_METRICS_FILE

    return [
        Parameter(name=METRICS_OUTPUT, value_from=m.ValueFrom(path=f"{ARGO_OUTPUTS_DIR}/{ARGO_METRICS_FILE}", default="{}")),
        Parameter(name=MANIFEST_OUTPUT, value_from=m.ValueFrom(path=f"{ARGO_OUTPUTS_DIR}/{ARGO_MANIFEST_FILE}", default="")),
    ]


def artifact_key(plan: Plan, name: str) -> str:
    """The S3 key (in the artifact repository's bucket, the store's) of an analysis task's artifact: beside the run,
    under ``_argo/<cell>/`` so that Argo's upload never rewrites a stage output whose checksum a manifest holds."""
    prefix = plan.store.split("://", 1)[-1].split("/", 1)[1] if plan.store.count("/") > 2 else ""
    parts = [prefix.strip("/"), "runs", plan.run_id, "_argo", "{{inputs.parameters.cell}}", name]
    return "/".join(p for p in parts if p)


def _report_artifacts(spec: StageSpec, plan: Plan, settings: ClusterSettings) -> list:
    """An analysis task's report files and figures as key-only S3 artifacts, stored unarchived so the UI opens them."""
    from hera.workflows import NoneArchiveStrategy, S3Artifact

    from shared.contract.stage import ARGO_FIGURES

    if not settings.artifact_repository.enabled or not spec.name.startswith(REPORT_STAGE_PREFIX):
        return []
    files = [(name, file) for name, file in REPORT_ARTIFACTS.items()] + [(FIGURES_ARTIFACT, ARGO_FIGURES)]
    return [S3Artifact(name=name, path=f"{ARGO_OUTPUTS_DIR}/{file}", key=artifact_key(plan, file),
                       archive=NoneArchiveStrategy(), optional=True) for name, file in files]


def _volumes(settings: ClusterSettings, gpu: bool) -> list:
    from hera.workflows import EmptyDirVolume, ExistingVolume

    c = settings.cache
    cache = (
        ExistingVolume(name="cache", claim_name=c.claim_name, mount_path=c.mount_path)
        if c.claim_name else EmptyDirVolume(name="cache", mount_path=c.mount_path, size_limit=c.size_limit)
    )
    volumes = [cache, EmptyDirVolume(name="tmp", mount_path="/tmp")]
    if gpu:
        volumes.append(EmptyDirVolume(name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=c.shm_size))
    return volumes


def _tolerations(pool: NodePool) -> list | None:
    from hera.workflows import models as m

    return [m.Toleration(**t.model_dump(exclude_none=True)) for t in pool.tolerations] or None


def _stage_template(spec: StageSpec, plan: Plan, settings: ClusterSettings):
    """The container template every task of ``spec``'s stage runs, with the task's config as a parameter."""
    from hera.workflows import ConfigMapEnvFrom, Container, Parameter, Resources
    from hera.workflows import models as m

    res = spec.resources
    klass, pool = settings.pool_for(spec)
    image = settings.image(spec.image)
    sync = None
    if klass and settings.gpu_semaphore.enabled:
        if res.gpus != 1:
            # an Argo semaphore slot is held per pod, not per GPU: a multi-GPU pod would slip past the cap
            raise ClusterError(
                f"stage {spec.name} asks for {res.gpus} GPUs, but a slot of the GPU semaphore counts one pod, so "
                f"the {settings.gpu_semaphore.config_map} cap would not count its GPUs; give the stage 1 GPU or "
                "turn the semaphore off (gpuSemaphore.enabled=false) and cap with workflow.parallelism"
            )
        ref = m.ConfigMapKeySelector(name=settings.gpu_semaphore.config_map, key=klass)
        sync = m.Synchronization(semaphores=[m.SemaphoreRef(config_map_key_ref=ref)])
    labels = {
        f"{LABEL_PREFIX}/stage": label_value(spec.name),
        f"{LABEL_PREFIX}/cell": "{{inputs.parameters.cell}}",
        f"{LABEL_PREFIX}/gpu-class": klass or "none",
    }
    return Container(
        name=stage_template_name(spec.name),
        image=image,
        image_pull_policy=settings.image_pull_policy,
        command=["python", "-m", spec.module],
        args=["--config", "{{inputs.parameters.config}}"],
        inputs=[Parameter(name="config"), Parameter(name="cell")],
        outputs=[*(_tracking_outputs(settings, plan) or []), *_result_outputs(), *_report_artifacts(spec, plan, settings)],
        env=_common_env(settings, plan, image) + _argo_outputs_env(),
        env_from=[ConfigMapEnvFrom(name=settings.store_config_map, optional=False)],
        resources=Resources(
            cpu_request=str(res.cpu), memory_request=res.memory, memory_limit=res.memory,
            gpus=res.gpus if klass else None,
        ),
        volumes=_volumes(settings, gpu=klass is not None),
        node_selector=dict(pool.node_selector) or None,
        tolerations=_tolerations(pool),
        retry_strategy=_retry_strategy(settings, res.retries),
        active_deadline_seconds=res.timeout_s,
        synchronization=sync,
        priority_class_name=settings.priority_class or None,
        labels=labels,
        annotations={f"{LABEL_PREFIX}/description": (spec.description or spec.name)[:200]},
        pod_security_context=_pod_security(),
        security_context=_container_security(settings.run_as_user),
    )


def _exit_template(plan: Plan, settings: ClusterSettings):
    """A small CPU step that records the run's final status in the store, whatever happened."""
    from hera.workflows import ConfigMapEnvFrom, Container, Resources

    h = settings.exit_handler
    image = settings.image(EXIT_STATUS_IMAGE)
    return Container(
        name=EXIT_TEMPLATE,
        image=image,
        image_pull_policy=settings.image_pull_policy,
        command=["python", "-m", "workflows.exit_status"],
        args=[
            "--store", plan.store, "--run-id", plan.run_id, "--experiment", plan.workflow,
            "--workflow", "{{workflow.name}}", "--status", "{{workflow.status}}",
            "--failures", "{{workflow.failures}}", "--duration", "{{workflow.duration}}",
        ],
        env=_common_env(settings, plan, image),
        env_from=[ConfigMapEnvFrom(name=settings.store_config_map, optional=False)],
        resources=Resources(cpu_request=h.cpu, memory_request=h.memory, memory_limit=h.memory),
        volumes=_volumes(settings, gpu=False),
        node_selector=dict(settings.cpu_pool.node_selector) or None,
        tolerations=_tolerations(settings.cpu_pool),
        retry_strategy=_retry_strategy(settings),
        active_deadline_seconds=h.timeout_s,
        priority_class_name=settings.priority_class or None,
        labels={f"{LABEL_PREFIX}/stage": "exit-status", f"{LABEL_PREFIX}/cell": "exit-status"},
        pod_security_context=_pod_security(),
        security_context=_container_security(settings.run_as_user),
    )


def _run_labels(plan: Plan, settings: ClusterSettings) -> dict[str, str]:
    return {
        f"{LABEL_PREFIX}/experiment": label_value(plan.workflow),
        f"{LABEL_PREFIX}/run-id": dns_label(plan.run_id),
        f"{LABEL_PREFIX}/profile": label_value(plan.profile),
        f"{LABEL_PREFIX}/git-sha": label_value(settings.resolved_git_sha()) or "unknown",
    }


def config_uri(plan: Plan, name: str, config: dict[str, Any]) -> str:
    """Where a task's config goes in the store; named by content, so a resubmit never rewrites a running one's."""
    text = _config_json(config)
    return store.join(plan.store, "runs", plan.run_id, "_configs", f"{name}-{store.sha256_bytes(text.encode())[:12]}.json")


def upload_configs(plan: Plan, tasks: list) -> dict[str, str]:
    """Write each task's config to the store; ``{task name: URI}`` for the workflow's arguments."""
    uris = {}
    for task in tasks:
        uri = config_uri(plan, task.name, task.config)
        if not store.exists(uri):
            store.write_bytes(uri, _config_json(task.config).encode())
        uris[task.name] = uri
    return uris


def compile_plan(plan: Plan, *, cluster: ClusterSettings | None = None, config_uris: dict[str, str] | None = None,
                 leave_out: set[str] | frozenset[str] = frozenset()):
    """The Argo ``Workflow`` (a Hera object) that runs ``plan``: one DAG task per plan task, named as in the plan.

    ``config_uris`` (task name -> store URI) passes configs by URI instead of inline JSON; ``leave_out`` names
    tasks whose results are already complete: they and the dependencies on them are left out.
    """
    from hera.workflows import DAG, Task, Workflow
    from hera.workflows import models as m

    settings = cluster or ClusterSettings.load()
    tasks = [t for t in plan.tasks if t.name not in leave_out]
    if not tasks:
        raise ClusterError(f"run {plan.run_id}: every task is complete in the store; nothing to run")
    for task in tasks:
        if config_uris is None and "{{" in _config_json(task.config):
            raise ClusterError(f"task {task.name}: its config contains '{{{{', which Argo would read as a variable")
    stages = {t.stage: t.spec for t in tasks}
    clash = sorted(s for s in stages if stage_template_name(s) in (ENTRY_TEMPLATE, EXIT_TEMPLATE))
    if clash:
        raise ClusterError(f"stage name {clash[0]!r} clashes with the workflow's own {stage_template_name(clash[0])!r} template")
    labels = _run_labels(plan, settings)
    repo = settings.artifact_repository
    with Workflow(
        name=workflow_name(plan.run_id),
        namespace=settings.namespace,
        labels=labels,
        annotations={
            TITLE_ANNOTATION: f"{plan.workflow} · {plan.profile} · {plan.run_id}",
            DESCRIPTION_ANNOTATION: _description(plan, tasks),
            f"{LABEL_PREFIX}/store": plan.store,
            f"{LABEL_PREFIX}/run-id": plan.run_id,
        },
        entrypoint=ENTRY_TEMPLATE,
        on_exit=EXIT_TEMPLATE,
        service_account_name=settings.service_account,
        pod_metadata=m.Metadata(labels=labels),
        pod_gc=m.PodGC(
            strategy=settings.pod_gc.strategy,
            delete_delay_duration=settings.pod_gc.delete_delay_duration or None,
        ),
        ttl_strategy=(
            m.TTLStrategy(seconds_after_success=settings.ttl_seconds_after_success)
            if settings.ttl_seconds_after_success else None
        ),
        image_pull_secrets=[m.LocalObjectReference(name=n) for n in settings.image_pull_secrets] or None,
        parallelism=settings.parallelism,
        artifact_repository_ref=m.ArtifactRepositoryRef(config_map=repo.config_map, key=repo.key) if repo.enabled else None,
    ) as wf:
        templates = {stage: _stage_template(spec, plan, settings) for stage, spec in sorted(stages.items())}
        _exit_template(plan, settings)
        # fail_fast off: one failed cell does not stop the others; what depends on it does not run
        with DAG(name=ENTRY_TEMPLATE, fail_fast=False):
            for task in tasks:
                config = config_uris[task.name] if config_uris is not None else _config_json(task.config)
                Task(
                    name=task.name,
                    template=templates[task.stage],
                    arguments={"config": config, "cell": label_value(task.config.get("cell", task.name))},
                    dependencies=[d for d in task.after if d not in leave_out] or None,
                )
    return wf


def _description(plan: Plan, tasks: list) -> str:
    """What the Argo UI's list shows under the title: the tasks to run and their estimated GPU time."""
    from shared.contract import cost
    from workflows import cost as plan_cost

    text = f"{plan.workflow} ({plan.profile} profile), run {plan.run_id}: {len(tasks)} tasks"
    if len(tasks) < len(plan.tasks):
        text += f" ({len(plan.tasks) - len(tasks)} complete ones left out)"
    estimates = plan_cost.estimate(plan, [t.name for t in tasks])
    bound = "<= " if any(e.bounded for e in estimates) else ""
    return text + f"; estimated {bound}{cost.totals(estimates)['declared']:.1f} GPU-hours"


def to_dict(plan: Plan, *, cluster: ClusterSettings | None = None, **kwargs) -> dict[str, Any]:
    return compile_plan(plan, cluster=cluster, **kwargs).to_dict()


def to_yaml(plan: Plan, *, cluster: ClusterSettings | None = None, **kwargs) -> str:
    """The compiled workflow as YAML (``make workflow-yaml``); ``kubectl create -f`` or ``argo submit`` take it.

    By default the configs are inline, so the file stands alone and nothing touches the store; ``submit``
    (or ``--configs-in-store``) passes them by URI.
    """
    return compile_plan(plan, cluster=cluster, **kwargs).to_yaml()


# ---------------------------------------------------------------------------------------------------------------
# submitting


def _check_submittable(plan: Plan, settings: ClusterSettings) -> None:
    if not plan.store.startswith("s3://"):
        raise ClusterError(
            f"plan store {plan.store} is not reachable from cluster pods: submit with an s3:// store "
            "(--store s3://<bucket>/<prefix> or EPS_STORE)"
        )
    if settings.resolved_tag() == "latest" and not (settings.image_tag or os.environ.get("EPS_IMAGE_TAG")):
        raise ClusterError(
            "cannot tell which images to run: no git commit here and no EPS_IMAGE_TAG (CI tags images with the sha)"
        )
    if not settings.image_registry.strip():
        raise ClusterError(
            "no image registry: set EPS_IMAGE_REGISTRY=<registry>/<org> (the IMAGE_REGISTRY the CI pushes to) "
            "or image.registry in the chart and EPS_CLUSTER_CONFIG"
        )


class Submitted:
    """What ``submit`` did: the workflow's name and UI link (None when nothing was left to run), and which tasks
    it left out because the store already holds their results (``cached`` in this run, or ``reused``)."""

    def __init__(self, name: str | None, url: str | None, left_out: dict[str, str]):
        self.name, self.url, self.left_out = name, url, left_out

    def __iter__(self):
        return iter((self.name, self.url))


def submit(
    plan: Plan, *, server: str | None = None, token: str | None = None, cluster: ClusterSettings | None = None,
    approve: bool = False, max_gpu_hours: float | None = None, say=print, check_images=None,
) -> Submitted:
    """Leave out what is complete, print the estimated GPU time of the rest and stop above ``max_gpu_hours``
    (default 20) unless ``approve``; ``check_images(plan)``, if given, may stop it next (images not pushed); then
    put configs in the store, compile ``plan`` and create it on the Argo Server (``ARGO_SERVER``/``ARGO_TOKEN``)."""
    from hera.workflows.models import WorkflowCreateRequest

    from workflows import cost as plan_cost
    from workflows.cluster import _call

    settings = cluster or ClusterSettings.load()
    conn = connect(server, token, settings.namespace)
    _check_submittable(plan, settings)
    store.check_writable(plan.store)
    settled = plan.settled(warn=lambda message: print(f"warning: {message}", file=sys.stderr))
    left_out = {name: s.how for name, s in settled.items()}
    if len(left_out) == len(plan.tasks):
        return Submitted(None, None, left_out)
    # the cost gate: before a config is written or a request is sent
    estimates = plan_cost.estimate(plan, [t.name for t in plan.tasks if t.name not in left_out], read_s3=True)
    say(plan_cost.report(plan, estimates, left_out=len(left_out)))
    limit = plan_cost.DEFAULT_MAX_GPU_HOURS if max_gpu_hours is None else max_gpu_hours
    plan_cost.gate(estimates, max_gpu_hours=limit, approve=approve)
    if check_images is not None:
        check_images(plan)
    uris = upload_configs(plan, [t for t in plan.tasks if t.name not in left_out])
    # what `python -m workflows compare` reads of a cluster run (the local engine leaves _local/plan.json)
    store.write_json(store.join(plan.store, "runs", plan.run_id, PLAN_RECORD),
                     {"workflow": plan.workflow, "profile": plan.profile, "run_id": plan.run_id, "params": plan.params})
    wf = compile_plan(plan, cluster=settings, config_uris=uris, leave_out=set(left_out))
    built = wf.build()
    size = len(built.json(exclude_none=True, by_alias=True))
    if size > MAX_WORKFLOW_BYTES:
        raise ClusterError(
            f"compiled workflow is {size // 1000} kB, over the {MAX_WORKFLOW_BYTES // 1000} kB Kubernetes can store; "
            "split the experiment or shrink the task configs"
        )
    sha = settings.resolved_git_sha()
    if settings.resolved_tag() == sha and _dirty_tree():
        print(f"warning: uncommitted changes are not in the images tagged {sha[:12]}", file=sys.stderr)
    with conn.service() as service:
        created = _call(
            conn, f"submit of {built.metadata.name}", service.create_workflow,
            WorkflowCreateRequest(workflow=built, namespace=conn.namespace), namespace=conn.namespace,
        )
    name = (created.metadata.name if created and created.metadata else None) or built.metadata.name
    return Submitted(name, conn.ui_url(name), left_out)


def _dirty_tree() -> bool:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.returncode == 0 and bool(out.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        return False

"""The cluster's settings for a compiled workflow (namespace, registry, node pools, secrets ...): read from the
file at ``EPS_CLUSTER_CONFIG`` (the Helm chart renders it into the ``eps-cluster-config`` ConfigMap), then from
environment overrides. The plan knows none of it."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from shared.contract.stage import DEFAULT_RETRIES, StageSpec, git_commit
from workflows.engines.argo_names import ClusterError

if TYPE_CHECKING:  # pragma: no cover
    from workflows.plan import Plan

_DOCKER_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
EXIT_CODE_BAD_INPUT = 2  # shared.contract.stage.run_stage: bad input, one error line; retrying cannot help


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class Toleration(_Settings):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class NodePool(_Settings):
    """Where a class of pods runs: the node selector and the tolerations for the pool's taints."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


def _gpu_pool(product: str, klass: str) -> NodePool:
    # GPU feature discovery (NVIDIA GPU operator) labels nodes with the product; pools are tainted for GPU pods
    return NodePool(
        node_selector={"nvidia.com/gpu.product": product},
        tolerations=[
            Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),
            Toleration(key="eps/gpu-class", operator="Equal", value=klass, effect="NoSchedule"),
        ],
    )


def default_gpu_classes() -> dict[str, NodePool]:
    """The GPU node-pool classes; charts/eps/values.yaml ``gpuClasses`` has the same defaults."""
    return {"h100": _gpu_pool("NVIDIA-H100-80GB-HBM3", "h100"), "h200": _gpu_pool("NVIDIA-H200", "h200")}


class SecretEnv(_Settings):
    """An environment variable filled from a Kubernetes Secret key; optional, so a missing key is just unset."""

    env: str
    secret: str
    key: str


def default_secret_env() -> list[SecretEnv]:
    api, s3 = "eps-api-keys", "eps-s3-credentials"
    return [
        SecretEnv(env="ANTHROPIC_API_KEY", secret=api, key="ANTHROPIC_API_KEY"),
        SecretEnv(env="HF_TOKEN", secret=api, key="HF_TOKEN"),
        SecretEnv(env="WANDB_API_KEY", secret=api, key="WANDB_API_KEY"),
        SecretEnv(env="AWS_ACCESS_KEY_ID", secret=s3, key="AWS_ACCESS_KEY_ID"),
        SecretEnv(env="AWS_SECRET_ACCESS_KEY", secret=s3, key="AWS_SECRET_ACCESS_KEY"),
    ]


class Semaphore(_Settings):
    """The ConfigMap whose keys (one per GPU class) cap how many GPU pods of that class run at once."""

    config_map: str = "eps-gpu-semaphore"
    enabled: bool = True


class RetrySettings(_Settings):
    limit: int = Field(DEFAULT_RETRIES, ge=0)  # a stage's own Resources.retries wins
    policy: Literal["Always", "OnFailure", "OnError", "OnTransientError"] = "Always"
    backoff_duration: str = "1m"
    backoff_factor: int = Field(2, ge=1)
    backoff_max_duration: str = "3h"
    no_retry_exit_codes: list[int] = Field(default_factory=lambda: [EXIT_CODE_BAD_INPUT])


class PodGCSettings(_Settings):
    strategy: Literal["OnPodCompletion", "OnPodSuccess", "OnWorkflowCompletion", "OnWorkflowSuccess"] = "OnPodSuccess"
    delete_delay_duration: str = ""  # e.g. "10m": keep succeeded pods (and their logs) a while


class CacheSettings(_Settings):
    """Caches (HF, pip, torch, vLLM) live in a writable volume at ``mount_path``, never in the image."""

    mount_path: str = "/cache"
    claim_name: str = ""  # a ReadWriteMany PVC shared by the pods; empty: a per-pod emptyDir
    size_limit: str = "200Gi"  # of the emptyDir
    shm_size: str = "16Gi"  # /dev/shm of GPU pods (torch, vLLM)


class ExitHandlerSettings(_Settings):
    cpu: str = "250m"
    memory: str = "512Mi"
    timeout_s: int = 600


class TrackingSettings(_Settings):
    """Weights & Biases for the stage pods (``shared.contract.tracking``); the API key comes from the ``secret_env`` Secret."""

    backend: Literal["", "off", "wandb"] = ""  # "": off unless a run asks (--set tracking=wandb)
    project: str = ""  # empty: the submitter's WANDB_PROJECT, else shared.contract.tracking.DEFAULT_PROJECT
    entity: str = ""  # empty: the submitter's WANDB_ENTITY, else the API key's default entity
    base_url: str = ""  # a self-hosted W&B server; empty: W&B's cloud

    def chosen(self, plan: Plan) -> str:
        return plan.tracking or self.backend or "off"


class ArtifactRepositorySettings(_Settings):
    """Where Argo keeps the analysis task's report and figures so that the UI can open them: a key of the chart's
    artifact-repositories ConfigMap (the store's bucket and credentials); the workflow's artifacts name only a key."""

    enabled: bool = True
    config_map: str = "eps-artifact-repositories"
    key: str = "eps-s3"


class ClusterSettings(_Settings):
    """Everything about the cluster the compiled workflow needs; the plan knows none of it."""

    namespace: str = "eps"
    image_registry: str = ""  # "<registry host>/<org>"; EPS_IMAGE_REGISTRY overrides; required to submit
    image_tag: str = ""  # EPS_IMAGE_TAG overrides; empty: the git commit (CI tags every image with it)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    service_account: str = "eps-workflow"
    gpu_classes: dict[str, NodePool] = Field(default_factory=default_gpu_classes)
    cpu_pool: NodePool = Field(default_factory=NodePool)
    gpu_semaphore: Semaphore = Field(default_factory=Semaphore)
    priority_class: str | None = "eps-batch"
    pod_gc: PodGCSettings = Field(default_factory=PodGCSettings, alias="podGC")
    ttl_seconds_after_success: int | None = 7 * 24 * 3600  # failed workflows stay, so they can be retried
    retry: RetrySettings = Field(default_factory=RetrySettings)
    store_config_map: str = "eps-store"  # envFrom: AWS_ENDPOINT_URL, AWS_REGION, EPS_STORE, EPS_BUCKET ...
    secret_env: list[SecretEnv] = Field(default_factory=default_secret_env)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    exit_handler: ExitHandlerSettings = Field(default_factory=ExitHandlerSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    artifact_repository: ArtifactRepositorySettings = Field(default_factory=ArtifactRepositorySettings)
    run_as_user: int = 1000
    parallelism: int | None = None
    git_sha: str = ""  # EPS_GIT_SHA, else `git rev-parse HEAD`

    @classmethod
    def load(cls, path: str | Path | None = None) -> ClusterSettings:
        """Settings from ``path`` or ``$EPS_CLUSTER_CONFIG`` (YAML or JSON), else the defaults; then env overrides."""
        path = path or os.environ.get("EPS_CLUSTER_CONFIG") or None
        data: dict[str, Any] = {}
        if path:
            file = Path(path)
            if not file.is_file():
                raise ClusterError(f"cluster config {str(path)!r} (EPS_CLUSTER_CONFIG) not found")
            try:
                data = yaml.safe_load(file.read_text()) or {}
            except yaml.YAMLError as err:
                raise ClusterError(f"cluster config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
            if not isinstance(data, dict):
                raise ClusterError(f"cluster config {path} must be a mapping of settings")
        for env, key in (("EPS_IMAGE_REGISTRY", "imageRegistry"), ("EPS_IMAGE_TAG", "imageTag"),
                         ("ARGO_NAMESPACE", "namespace"), ("EPS_GIT_SHA", "gitSha")):
            if os.environ.get(env, "").strip():
                data = {k: v for k, v in data.items() if to_camel(k) != key}
                data[key] = os.environ[env].strip()
        return cls.parse_settings(data, str(path or "cluster settings"))

    @classmethod
    def parse_settings(cls, data: dict[str, Any], what: str = "cluster settings") -> ClusterSettings:
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(x) for x in first["loc"]) or "(root)"
            more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
            raise ClusterError(f"bad {what}: {loc}: {first['msg']}{more}") from None

    # -- derived values

    def resolved_git_sha(self) -> str:
        return self.git_sha or git_commit()

    def resolved_tag(self) -> str:
        tag = self.image_tag or os.environ.get("EPS_IMAGE_TAG", "").strip()
        if not tag:
            sha = self.resolved_git_sha()
            tag = sha if sha and sha != "unknown" else "latest"
        if not _DOCKER_TAG.match(tag):
            raise ClusterError(f"image tag {tag!r} is not a valid image tag")
        return tag

    def image(self, name: str) -> str:
        prefix = self.image_registry.strip().rstrip("/")
        return f"{prefix}/{name}:{self.resolved_tag()}" if prefix else f"{name}:{self.resolved_tag()}"

    def pool_for(self, spec: StageSpec) -> tuple[str | None, NodePool]:
        """(GPU class, node pool) for a stage; (None, CPU pool) for a CPU stage."""
        res = spec.resources
        if not res.uses_gpu:
            return None, self.cpu_pool
        klass = res.gpu_class if res.gpu_class != "none" else "h100"
        if klass not in self.gpu_classes:
            raise ClusterError(
                f"stage {spec.name} needs GPU class {klass!r}, which the cluster config does not define "
                f"(known: {', '.join(sorted(self.gpu_classes)) or 'none'})"
            )
        return klass, self.gpu_classes[klass]



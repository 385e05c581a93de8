"""The Argo Server side of a cluster run: connect, submit, status, retry.

``python -m workflows submit|status|retry`` (and ``make submit|status|retry``) call ``submit``, ``status`` and
``retry`` here. The server and the token come from the environment, as for the ``argo`` CLI:

- ``ARGO_SERVER``: ``https://argo.example:2746``, or ``host:port`` (https unless ``ARGO_SECURE=false``);
- ``ARGO_TOKEN``: the bearer token (``argo auth token`` prints one; the ``Bearer`` prefix is optional);
- ``ARGO_NAMESPACE`` (else the cluster config's namespace), ``ARGO_BASE_HREF`` when the UI is served under a path,
  ``ARGO_INSECURE_SKIP_VERIFY=true`` for a self-signed certificate.

Every failure is a ``ClusterError`` whose message is one readable line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import requests

from workflows.engines.argo_names import ClusterError, dns_label, workflow_name
from workflows.engines.argo_settings import ClusterSettings

REQUEST_TIMEOUT_S = 30.0
TRUE = {"1", "true", "yes", "on"}


# ---------------------------------------------------------------------------------------------------------------
# connection


@dataclass(frozen=True)
class Connection:
    server: str  # scheme://host[:port][/base], no trailing slash
    token: str  # "Bearer ..."
    namespace: str
    verify_ssl: bool = True
    base_href: str = ""

    def ui_url(self, name: str) -> str:
        """The Argo UI page of workflow ``name``."""
        return f"{self.server}{self.base_href}/workflows/{self.namespace}/{name}"

    def service(self):
        from hera.workflows import WorkflowsService

        # hera joins paths onto the host with urljoin, which needs the trailing slash to keep a base path
        return WorkflowsService(
            host=self.server + "/", token=self.token, namespace=self.namespace, verify_ssl=self.verify_ssl,
            session=_TimeoutSession(),
        )


class _TimeoutSession(requests.Session):
    """Hera sends requests without a timeout; a hung server must not hang ``make submit``."""

    def request(self, method, url, **kwargs):  # type: ignore[override]
        kwargs.setdefault("timeout", REQUEST_TIMEOUT_S)
        return super().request(method, url, **kwargs)


def _normalize_server(server: str) -> str:
    server = server.strip().rstrip("/")
    if "://" not in server:
        secure = os.environ.get("ARGO_SECURE", "true").strip().lower() not in {"0", "false", "no", "off"}
        server = f"{'https' if secure else 'http'}://{server}"
    if not server.startswith(("http://", "https://")):
        raise ClusterError(f"ARGO_SERVER {server!r} must be an http(s) URL or host:port")
    return server


def connect(server: str | None = None, token: str | None = None, namespace: str | None = None) -> Connection:
    """The Argo Server to talk to, from the arguments or ``ARGO_SERVER`` / ``ARGO_TOKEN`` / ``ARGO_NAMESPACE``."""
    server = server or os.environ.get("ARGO_SERVER", "").strip()
    token = token or os.environ.get("ARGO_TOKEN", "").strip()
    missing = [name for name, value in (("ARGO_SERVER", server), ("ARGO_TOKEN", token)) if not value]
    if missing:
        raise ClusterError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: export ARGO_SERVER=https://<argo-server>:2746 "
            "and ARGO_TOKEN=\"Bearer $(kubectl -n <namespace> get secret eps-submitter.service-account-token "
            "-o jsonpath='{.data.token}' | base64 -d)\" (see the README, \"Running on a cluster\")"
        )
    token = token if len(token.split()) > 1 else f"Bearer {token}"
    if namespace is None:
        namespace = ClusterSettings.load().namespace
    base_href = os.environ.get("ARGO_BASE_HREF", "").strip().rstrip("/")
    if base_href and not base_href.startswith("/"):
        base_href = "/" + base_href
    verify = os.environ.get("ARGO_INSECURE_SKIP_VERIFY", "").strip().lower() not in TRUE
    return Connection(_normalize_server(server), token, namespace, verify, base_href)


def _call(conn: Connection, what: str, fn, *args, **kwargs):
    """Run one Argo Server call, turning every failure into a one-line ClusterError."""
    from hera.exceptions import HeraException

    try:
        return fn(*args, **kwargs)
    except requests.exceptions.SSLError:
        raise ClusterError(
            f"{what}: TLS verification failed for {conn.server} (ARGO_INSECURE_SKIP_VERIFY=true for a self-signed "
            "certificate)"
        ) from None
    except requests.exceptions.RequestException as err:
        raise ClusterError(f"{what}: cannot reach the Argo Server at {conn.server}: {type(err).__name__}") from None
    except HeraException as err:
        raise ClusterError(f"{what}: {_server_message(err)}") from None
    except (KeyError, ValueError) as err:  # hera reading an answer that is not the Argo Server's JSON
        raise ClusterError(f"{what}: unexpected answer from {conn.server} ({type(err).__name__}: {err})") from None


_SERVER_SAID = re.compile(r"status code (\d+) with message: `(.*)`$", re.S)
_HINTS = {
    401: " (ARGO_TOKEN is missing, wrong or expired)",
    403: " (the token's service account may not do this in this namespace)",
    404: " (no such workflow in this namespace)",
    409: " (a workflow of this name exists: `make retry RUN=<name>` reruns its failed tasks, or pass a new --run-id)",
}


def _server_message(err: Exception) -> str:
    """``409: workflows.argoproj.io "x" already exists (...)`` from a hera exception."""
    found = _SERVER_SAID.search(str(err))
    code = int(found.group(1)) if found else getattr(err, "status_code", None)
    message = " ".join((found.group(2) if found else str(err)).split())[:300]
    return f"the Argo Server answered {code or type(err).__name__}: {message}{_HINTS.get(code or 0, '')}"


# ---------------------------------------------------------------------------------------------------------------
# the three operations


@dataclass
class TaskStatus:
    name: str
    phase: str
    message: str = ""
    started_at: str = ""
    finished_at: str = ""
    retries: int = 0


@dataclass
class RunStatus:
    name: str
    phase: str
    url: str
    progress: str = ""
    message: str = ""
    started_at: str = ""
    finished_at: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    tasks: list[TaskStatus] = field(default_factory=list)

    @property
    def failed(self) -> list[TaskStatus]:
        return [t for t in self.tasks if t.phase in ("Failed", "Error")]

    def __str__(self) -> str:
        head = f"workflow {self.name}: {self.phase or 'Pending'}"
        if self.progress:
            head += f" ({self.progress} tasks)"
        lines = [head]
        if self.started_at:
            lines.append(f"started {self.started_at}" + (f", finished {self.finished_at}" if self.finished_at else ""))
        if self.message:
            lines.append(f"message: {self.message}")
        if self.tasks:
            width = max(len(t.name) for t in self.tasks)
            for t in self.tasks:
                extra = f" after {t.retries} retries" if t.retries else ""
                note = f"  {t.message}" if t.message and t.phase not in ("Succeeded", "Running") else ""
                lines.append(f"  {t.name:<{width}}  {t.phase}{extra}{note}")
        if self.failed and self.phase in ("Failed", "Error"):
            lines.append(f"{len(self.failed)} failed: `make retry RUN={self.name}` reruns them; completed cells are kept")
        lines.append(f"Argo UI: {self.url}")
        return "\n".join(lines)


class RetryResult(NamedTuple):
    name: str
    url: str
    tasks: tuple[str, ...] = ()

    def __str__(self) -> str:
        rerun = f" ({', '.join(self.tasks)})" if self.tasks else ""
        return f"retrying {self.name}: failed tasks rerun{rerun}, completed cells are kept\nArgo UI: {self.url}"


_RETRY_CHILD = re.compile(r"\(\d+\)$")


def _task_statuses(wf: Any) -> list[TaskStatus]:
    """One row per plan task: the Retry node when the task has one, else its Pod node; no exit handler noise."""
    nodes = (wf.status.nodes if wf.status and wf.status.nodes else {}) or {}
    rows: dict[str, TaskStatus] = {}
    for node in nodes.values():
        if node.type not in ("Retry", "Pod"):
            continue
        name = node.display_name or node.name
        if _RETRY_CHILD.search(name) or name.endswith(".onExit"):
            continue
        retries = len(node.children or []) - 1 if node.type == "Retry" else 0
        rows[name] = TaskStatus(
            name=name, phase=node.phase or "Pending", message=" ".join((node.message or "").split())[:160],
            started_at=str(node.started_at.root if node.started_at else ""),
            finished_at=str(node.finished_at.root if node.finished_at else ""), retries=max(retries, 0),
        )
    order = {"Failed": 0, "Error": 0, "Running": 1, "Pending": 2, "Omitted": 3, "Skipped": 3, "Succeeded": 4}
    return sorted(rows.values(), key=lambda t: (order.get(t.phase, 2), t.name))


def _find(conn: Connection, service, run: str):
    """The workflow of ``run``: by name, else the newest with label ``eps/run-id=<run>``."""
    from hera.exceptions import NotFound

    name = workflow_name(run)
    try:
        return service.get_workflow(name, namespace=conn.namespace)
    except NotFound:
        pass
    listing = _call(
        conn, f"status of {run}", service.list_workflows, namespace=conn.namespace,
        label_selector=f"eps/run-id={dns_label(run)}",
    )
    items = list(listing.items or [])
    if not items:
        raise ClusterError(f"no workflow {name!r} (or with run id {run!r}) in namespace {conn.namespace}")
    return max(items, key=lambda w: str(w.metadata.creation_timestamp.root if w.metadata.creation_timestamp else ""))


def status(run: str, *, server: str | None = None, token: str | None = None, namespace: str | None = None) -> RunStatus:
    """The phase of run ``run`` (its workflow name or run id) and of each of its tasks; ``print()`` shows a table."""
    conn = connect(server, token, namespace)
    with conn.service() as service:
        wf = _call(conn, f"status of {run}", _find, conn, service, run)
    st = wf.status
    name = wf.metadata.name
    return RunStatus(
        name=name, phase=(st.phase if st else "") or "Pending", url=conn.ui_url(name),
        progress=(st.progress if st else "") or "", message=" ".join(((st.message if st else "") or "").split()),
        started_at=str(st.started_at.root) if st and st.started_at else "",
        finished_at=str(st.finished_at.root) if st and st.finished_at else "",
        labels=dict(wf.metadata.labels or {}), tasks=_task_statuses(wf),
    )


def retry(run: str, *, server: str | None = None, token: str | None = None, namespace: str | None = None) -> RetryResult:
    """Retry the failed tasks of run ``run`` on the Argo Server (``argo retry``); succeeded tasks are kept."""
    from hera.workflows.models import WorkflowRetryRequest

    conn = connect(server, token, namespace)
    with conn.service() as service:
        wf = _call(conn, f"retry of {run}", _find, conn, service, run)
        name = wf.metadata.name
        phase = wf.status.phase if wf.status else None
        if phase not in ("Failed", "Error"):
            raise ClusterError(f"workflow {name} is {phase or 'Pending'}: only a Failed or Error workflow can be retried")
        failed = tuple(t.name for t in _task_statuses(wf) if t.phase in ("Failed", "Error"))
        req = WorkflowRetryRequest(name=name, namespace=conn.namespace, restart_successful=False)
        _call(conn, f"retry of {name}", service.retry_workflow, name, req, namespace=conn.namespace)
    return RetryResult(name, conn.ui_url(name), failed)


# ---------------------------------------------------------------------------------------------------------------
# the image registry: submit only what CI has pushed

# a tag may point at a multi-platform index or at one image's manifest, in either the OCI or the Docker format
MANIFEST_TYPES = ", ".join((
    "application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json",
))


def _registry_base(host: str) -> str:
    # as docker does: a registry on this machine speaks plain HTTP, any other HTTPS (unless told otherwise)
    plain = os.environ.get("EPS_IMAGE_REGISTRY_INSECURE", "").strip().lower() in TRUE
    local = host.split(":")[0] in ("localhost", "127.0.0.1", "::1", "[::1]")
    return f"{'http' if plain or local else 'https'}://{host}"


def _bearer_token(session: requests.Session, challenge: str, repository: str) -> str | None:
    """A pull token from the realm a 401's ``WWW-Authenticate: Bearer realm=...,service=...`` names."""
    fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    if not challenge.lower().startswith("bearer") or "realm" not in fields:
        return None
    params = {"scope": fields.get("scope") or f"repository:{repository}:pull"}
    if fields.get("service"):
        params["service"] = fields["service"]
    user, password = os.environ.get("IMAGE_REGISTRY_USERNAME", ""), os.environ.get("IMAGE_REGISTRY_PASSWORD", "")
    reply = session.get(fields["realm"], params=params, auth=(user, password) if user else None,
                        timeout=REQUEST_TIMEOUT_S)
    if reply.status_code != 200:
        return None
    body = reply.json()
    return body.get("token") or body.get("access_token")


def image_exists(session: requests.Session, image: str) -> bool:
    """Whether ``<host>/<repository>:<tag>`` is in its registry (a HEAD of its v2 manifest, with a pull token)."""
    reference, _, tag = image.rpartition(":")
    host, _, repository = reference.partition("/")
    url = f"{_registry_base(host)}/v2/{repository}/manifests/{tag}"
    headers = {"Accept": MANIFEST_TYPES}
    try:
        reply = session.head(url, headers=headers, timeout=REQUEST_TIMEOUT_S)
        if reply.status_code == 401:
            token = _bearer_token(session, reply.headers.get("WWW-Authenticate", ""), repository)
            if token is None:
                raise ClusterError(
                    f"registry {host} refused to say whether {image} exists (401): set IMAGE_REGISTRY_USERNAME "
                    "and IMAGE_REGISTRY_PASSWORD (a pull credential), or EPS_SKIP_IMAGE_CHECK=true")
            reply = session.head(url, headers={**headers, "Authorization": f"Bearer {token}"},
                                 timeout=REQUEST_TIMEOUT_S)
    except requests.RequestException as err:
        raise ClusterError(f"registry {host} unreachable while checking {image}: {type(err).__name__}") from None
    if reply.status_code == 404:
        return False
    if reply.status_code != 200:
        raise ClusterError(f"registry {host} answered {reply.status_code} for {image}: cannot tell whether it exists "
                           "(EPS_SKIP_IMAGE_CHECK=true submits without checking)")
    return True


def check_images(images: list[str]) -> None:
    """Refuse to submit a workflow whose images are not in the registry (every pod would end in ImagePullBackOff)."""
    if os.environ.get("EPS_SKIP_IMAGE_CHECK", "").strip().lower() in TRUE:
        return
    with requests.Session() as session:
        missing = [image for image in dict.fromkeys(images) if not image_exists(session, image)]
    if missing:
        tag = missing[0].rpartition(":")[2]
        raise ClusterError(
            f"{len(missing)} of {len(set(images))} images are not in the registry for tag {tag} (first: {missing[0]}): "
            "push the commit and wait for CI to build it, or submit a tag CI built (EPS_IMAGE_TAG)")

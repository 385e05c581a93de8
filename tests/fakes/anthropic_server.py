"""A loopback HTTP server that speaks the parts of the Anthropic API the judge uses, for the real SDK to talk to.

Endpoints: ``POST /v1/messages``, ``POST /v1/messages/batches``, ``GET /v1/messages/batches/{id}`` and
``GET /v1/messages/batches/{id}/results`` (JSONL), with bodies shaped as the real API's.

Scripting:
- ``fail_next(status, times=..., retry_after=...)`` queues forced error replies (429, 529, 500, 401, ...);
- what the judge "says" is decided by ``reply_for(params)`` from the request. The default reads a marker in the
  user message: ``[[judge:score=85]]`` replies "85", ``[[judge:reply=some text]]`` replies that text verbatim,
  ``[[judge:batch=errored|expired|canceled]]`` makes that batch entry fail (and a Messages call answer 400),
  ``[[judge:stop=max_tokens]]`` / ``[[judge:stop=refusal]]`` end the reply early with that stop_reason;
  without a marker the reply is "50";
- ``requests`` logs every request (method, path, headers, JSON body), forced failures included;
- a batch stays ``in_progress`` for ``polls_until_ended`` retrieves, then ends.

As the real API (version 2026-10-21) does, requests carrying sampling parameters (temperature, top_p, top_k) are
rejected with 400, and the key is accepted as ``x-api-key`` or ``Authorization: Bearer``.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKER = re.compile(r"\[\[judge:(score|reply|batch|stop)=(.*?)\]\]", re.S)
SAMPLING_PARAMS = ("temperature", "top_p", "top_k")
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class FakeReply:
    """A reply with a stop_reason other than end_turn."""

    text: str
    stop_reason: str = "end_turn"


@dataclass(frozen=True)
class ItemFailure:
    """A batch entry that does not succeed: ``errored``, ``expired`` or ``canceled``."""

    kind: str
    message: str = "the fake server was told to fail this request"


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: dict | None


@dataclass
class _Forced:
    status: int
    retry_after: str | None
    path_prefix: str | None


@dataclass
class _Batch:
    id: str
    results: list[dict]
    polls_left: int
    created_at: datetime
    ended_at: datetime | None = None
    counts: dict[str, int] = field(default_factory=dict)


def user_text(params: dict) -> str:
    parts = []
    for message in params.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(block.get("text", "") for block in content or [] if isinstance(block, dict))
    return "\n".join(parts)


def marker_reply(params: dict) -> str | FakeReply | ItemFailure:
    match = MARKER.search(user_text(params))
    if not match:
        return "50"
    kind, value = match.groups()
    if kind == "batch":
        return ItemFailure(value)
    if kind == "stop":
        return FakeReply("I would rate this answer" if value == "max_tokens" else "", stop_reason=value)
    return value  # score=NN and reply=TEXT both reply with the given text


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class FakeAnthropicServer:
    def __init__(self, reply_for: Callable[[dict], str | FakeReply | ItemFailure] = marker_reply, *,
                 polls_until_ended: int = 1, expected_api_key: str | None = None):
        self.reply_for = reply_for
        self.polls_until_ended = polls_until_ended
        self.expected_api_key = expected_api_key
        self.requests: list[RecordedRequest] = []
        self.batches: dict[str, _Batch] = {}
        self._forced: deque[_Forced] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        # a short poll interval keeps stop() fast (shutdown waits for the serve loop to notice)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fake-anthropic", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeAnthropicServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeAnthropicServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- scripting ------------------------------------------------------------------------------------------

    def fail_next(self, status: int, *, times: int = 1, retry_after: float | None = None,
                  path_prefix: str | None = None) -> None:
        """The next ``times`` requests (to paths starting with ``path_prefix``, if given) get ``status``."""
        with self._lock:
            for _ in range(times):
                self._forced.append(_Forced(status, None if retry_after is None else str(retry_after), path_prefix))

    def count(self, method: str | None = None, path: str | None = None, *, path_prefix: str | None = None) -> int:
        """How many requests were received, optionally only those with this method and path (or path prefix)."""
        with self._lock:
            return sum(
                1 for r in self.requests
                if (method is None or r.method == method)
                and (path is None or r.path == path)
                and (path_prefix is None or r.path.startswith(path_prefix))
            )

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- behaviour --------------------------------------------------------------------------------------------

    def _take_forced(self, path: str) -> _Forced | None:
        with self._lock:
            for forced in self._forced:
                if forced.path_prefix is None or path.startswith(forced.path_prefix):
                    self._forced.remove(forced)
                    return forced
        return None

    def _message(self, params: dict, reply: str | FakeReply) -> dict:
        reply = reply if isinstance(reply, FakeReply) else FakeReply(reply)
        text = reply.text
        return {
            "id": f"msg_fake_{next(self._ids)}",
            "type": "message",
            "role": "assistant",
            "model": params.get("model", "unknown"),
            "content": [{"type": "text", "text": text}],
            "stop_reason": reply.stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": len(user_text(params)) // 4 + 1, "output_tokens": len(text) // 4 + 1},
        }

    def _batch_json(self, batch: _Batch) -> dict:
        ended = batch.ended_at is not None
        counts = {"processing": 0 if ended else len(batch.results), "succeeded": 0, "errored": 0,
                  "canceled": 0, "expired": 0}
        if ended:
            counts.update(batch.counts)
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": counts,
            "created_at": _iso(batch.created_at),
            "expires_at": _iso(batch.created_at + timedelta(hours=24)),
            "ended_at": _iso(batch.ended_at) if ended else None,
            "cancel_initiated_at": None,
            "archived_at": None,
            "results_url": f"{self.url}/v1/messages/batches/{batch.id}/results" if ended else None,
        }

    def handle(self, method: str, path: str, body: dict | None, headers: dict) -> tuple[int, dict, bytes | dict]:
        """(status, extra headers, JSON body or raw bytes) for one request."""
        with self._lock:
            self.requests.append(RecordedRequest(method, path, headers, body))
        forced = self._take_forced(path)
        if forced:
            extra = {"retry-after": forced.retry_after} if forced.retry_after is not None else {}
            return forced.status, extra, _error(forced.status, f"forced {forced.status} by the test")
        if self.expected_api_key is not None and self.expected_api_key not in (
            headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer ")
        ):
            return 401, {}, _error(401, "invalid x-api-key")

        if method == "POST" and path == "/v1/messages":
            if rejected := _sampling_params_error(body):
                return 400, {}, rejected
            outcome = self.reply_for(body)
            if isinstance(outcome, ItemFailure):
                return 400, {}, _error(400, outcome.message)
            return 200, {}, self._message(body, outcome)

        if method == "POST" and path == "/v1/messages/batches":
            return self._create_batch(body)

        match = re.fullmatch(r"/v1/messages/batches/([^/]+)(/results)?", path)
        if method == "GET" and match:
            with self._lock:
                batch = self.batches.get(match.group(1))
                if batch is None:
                    return 404, {}, _error(404, f"no batch {match.group(1)}")
                if match.group(2):
                    if batch.ended_at is None:
                        return 400, {}, _error(400, "batch has not ended")
                    # real results come in no particular order: reverse them so callers must match custom_id
                    lines = "".join(json.dumps(r) + "\n" for r in reversed(batch.results))
                    return 200, {"content-type": "application/binary"}, lines.encode()
                if batch.ended_at is None:
                    batch.polls_left -= 1
                    if batch.polls_left <= 0:
                        batch.ended_at = datetime.now(timezone.utc)
                return 200, {}, self._batch_json(batch)
        return 404, {}, _error(404, f"no route {method} {path}")

    def _create_batch(self, body: dict | None) -> tuple[int, dict, dict]:
        requests = (body or {}).get("requests") or []
        ids = [r.get("custom_id", "") for r in requests]
        if not requests or len(set(ids)) != len(ids) or not all(CUSTOM_ID.fullmatch(i) for i in ids):
            return 400, {}, _error(400, "requests must be non-empty with unique custom_ids matching ^[a-zA-Z0-9_-]{1,64}$")
        results, counts = [], {"succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for request in requests:
            if rejected := _sampling_params_error(request["params"]):
                return 400, {}, rejected
            outcome = self.reply_for(request["params"])
            if isinstance(outcome, ItemFailure):
                result: dict = {"type": outcome.kind}
                if outcome.kind == "errored":
                    result["error"] = _error(400, outcome.message)
            else:
                result = {"type": "succeeded", "message": self._message(request["params"], outcome)}
            counts[result["type"]] += 1
            results.append({"custom_id": request["custom_id"], "result": result})
        with self._lock:
            batch = _Batch(id=f"msgbatch_fake_{next(self._ids)}", results=results,
                           polls_left=self.polls_until_ended, created_at=datetime.now(timezone.utc), counts=counts)
            self.batches[batch.id] = batch
            return 200, {}, self._batch_json(batch)


def _sampling_params_error(params: dict | None) -> dict | None:
    present = [name for name in SAMPLING_PARAMS if name in (params or {})]
    return _error(400, f"{present[0]}: Extra inputs are not permitted") if present else None


def _error(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def _handler_for(server: FakeAnthropicServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            path = self.path.split("?", 1)[0]
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra, payload = server.handle(method, path, body, headers)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", extra.pop("content-type", "application/json"))
            self.send_header("content-length", str(len(data)))
            self.send_header("request-id", f"req_fake_{id(self)}")
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def log_message(self, *args) -> None:  # keep test output clean
            pass

    return Handler

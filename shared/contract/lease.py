"""One writer per stage: a lease (owner, expiry) in the store, renewed while its holder works.

The lease is a small JSON object beside the stage's output folder, created only if absent and replaced only if
unchanged since it was read (a folder lock on file stores, ``If-None-Match``/``If-Match`` on S3). A holder renews
it every quarter of its time to live; a holder that died stops renewing, and its lease may be taken once expired,
or at once from the same host when its process is gone (an engine re-run after a kill need not wait).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from shared.core import store


class LeaseLost(RuntimeError):
    """Another owner took the lease while this holder still worked (it had expired: the holder was too slow)."""


def default_ttl_s() -> float:
    return float(os.environ.get("EPS_LEASE_TTL_S", "300"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(self, uri: str, *, what: str = "", ttl_s: float | None = None):
        self.uri = uri
        self.what = what
        self.ttl_s = ttl_s or default_ttl_s()
        self.host = socket.gethostname()
        self.token = uuid.uuid4().hex[:12]
        self.owner = f"{self.host}:{os.getpid()}:{self.token}"
        self.version: str | None = None
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self.lost = False

    # -- the record

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({
            "owner": self.owner, "host": self.host, "pid": os.getpid(), "what": self.what,
            "renewed_at": now, "expires_at": now + self.ttl_s,
        }, sort_keys=True).encode()

    @staticmethod
    def _parse(data: bytes) -> dict | None:
        try:
            record = json.loads(data)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def holder(self) -> dict | None:
        """The current lease record, or None when no one holds it."""
        found = store.read_versioned(self.uri)
        return None if found is None else (self._parse(found[0]) or {"owner": "unreadable lease"})

    def _stale(self, record: dict | None) -> bool:
        if record is None or not isinstance(record.get("expires_at"), (int, float)):
            return True  # an unreadable lease protects nothing
        if record["expires_at"] < time.time():
            return True
        same_host = record.get("host") == self.host and isinstance(record.get("pid"), int)
        return same_host and record["pid"] != os.getpid() and not _pid_alive(record["pid"])

    # -- taking and giving back

    def try_acquire(self) -> bool:
        version = store.put_if_absent(self.uri, self._record())
        if version is None:
            found = store.read_versioned(self.uri)
            if found is None:
                version = store.put_if_absent(self.uri, self._record())
            elif self._stale(self._parse(found[0])):
                version = store.put_if_match(self.uri, self._record(), found[1])
        if version is None:
            return False
        self.version = version
        self._start_keeper()
        return True

    def acquire(self, *, log: Callable[[str], None] | None = None, poll_s: float = 2.0,
                timeout_s: float | None = None) -> None:
        """Wait until this process holds the lease (another live holder finishes or its lease expires)."""
        started, said = time.time(), False
        while not self.try_acquire():
            if not said and log:
                record = self.holder() or {}
                left = record.get("expires_at", 0) - time.time() if isinstance(record.get("expires_at"), (int, float)) else 0
                log(f"waiting: {record.get('owner', 'another run')} is writing this stage "
                    f"(its lease runs {max(left, 0):.0f}s more unless renewed)")
                said = True
            if timeout_s is not None and time.time() - started > timeout_s:
                raise TimeoutError(f"lease {self.uri} still held after {timeout_s:.0f}s")
            time.sleep(poll_s)

    def renew(self) -> None:
        if self.version is None:
            return
        version = store.put_if_match(self.uri, self._record(), self.version)
        if version is None:
            self.lost = True
            raise LeaseLost(f"lease {self.uri} was taken by another owner")
        self.version = version

    def release(self) -> None:
        self._stop.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(timeout=5)
        if self.version is not None:
            try:
                store.delete_if_match(self.uri, self.version)
            except store.StoreError:
                pass  # the store is away: the lease expires on its own, or a re-run here sees its owner gone
            self.version = None

    def _start_keeper(self) -> None:
        self._stop.clear()

        def keep() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    self.renew()
                except LeaseLost:
                    return
                except store.StoreError:
                    continue  # a blip: try again next time, the lease has time left

        self._keeper = threading.Thread(target=keep, name="lease-keeper", daemon=True)
        self._keeper.start()

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

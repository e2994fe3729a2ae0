"""Profiles pushed as pprof to an ingester after each window: Pyroscope's ``/ingest`` (multipart, the
``profile`` field, ``format=pprof``) or Parca's ``ProfileStoreService/WriteRaw`` (the Connect protocol's
JSON form, the profile base64-encoded). Which samples are profiles, and their pprof, is the caller's to
say (``encode``); sending is done in a thread of its own, bounded and counted like the OTLP exporter's.
"""

from __future__ import annotations

import base64
import json
import queue
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bpfscope.runtime.session import Sink

if TYPE_CHECKING:
    from bpfscope.runtime.collector import Collector, Sample

KINDS = ("pyroscope", "parca")


@dataclass(frozen=True)
class Pushed:
    """One window's profile: its pprof (gzip), its span in epoch seconds, and its name and rate."""

    pprof: bytes
    start: float
    end: float
    name: str  # process_cpu, ...
    frequency_hz: int


class ProfilePushSink(Sink):
    def __init__(
        self,
        endpoint: str,
        kind: str,
        encode: Callable[[Sample], Pushed | None],
        labels: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        max_pending: int = 16,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        self.endpoint, self.kind, self.encode = endpoint.rstrip("/"), kind, encode
        self.labels = dict(labels or {})
        self.headers = dict(headers or {})
        self.queue: queue.Queue[Pushed | None] = queue.Queue(max_pending)
        self.sent = self.dropped = self.failures = 0
        self._thread = threading.Thread(target=self._run, name="bpfscope-profiles", daemon=True)
        self._thread.start()

    def emit(self, collector: Collector, sample: Sample) -> None:
        pushed = self.encode(getattr(sample, "sample", None) or sample)
        if pushed is None:
            return
        try:
            self.queue.put_nowait(pushed)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while (pushed := self.queue.get()) is not None:
            try:
                urllib.request.urlopen(self.request(pushed), timeout=30).read()
                self.sent += 1
            except OSError:
                self.failures += 1

    def request(self, p: Pushed) -> urllib.request.Request:
        if self.kind == "pyroscope":
            labels = ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
            query = urllib.parse.urlencode(
                {
                    "name": f"{p.name}{{{labels}}}",
                    "from": int(p.start),
                    "until": int(p.end),
                    "format": "pprof",
                    "sampleRate": p.frequency_hz,
                    "spyName": "bpfscope",
                }
            )
            boundary = uuid.uuid4().hex
            body = (
                (
                    f"--{boundary}\r\n"
                    'Content-Disposition: form-data; name="profile"; filename="profile.pprof"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n"
                ).encode()
                + p.pprof
                + f"\r\n--{boundary}--\r\n".encode()
            )
            headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", **self.headers}
            return urllib.request.Request(f"{self.endpoint}/ingest?{query}", body, headers, method="POST")
        series_labels = [{"name": "__name__", "value": p.name}]
        series_labels += [{"name": k, "value": v} for k, v in sorted(self.labels.items())]
        body = json.dumps(
            {
                "series": [
                    {
                        "labels": {"labels": series_labels},
                        "samples": [{"rawProfile": base64.b64encode(p.pprof).decode()}],
                    }
                ],
                "normalized": False,
            }
        ).encode()
        url = f"{self.endpoint}/parca.profilestore.v1alpha1.ProfileStoreService/WriteRaw"
        headers = {"Content-Type": "application/json", **self.headers}
        return urllib.request.Request(url, body, headers, method="POST")

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=30)


__all__ = ["KINDS", "ProfilePushSink", "Pushed"]

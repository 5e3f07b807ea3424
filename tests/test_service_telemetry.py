"""FastAPI's native OpenTelemetry is off unless ``--opentelemetry`` asks for it.

Even with no provider configured FastAPI looks the providers up on every request; with one configured it opens a
span per request. The check runs in a subprocess because the global tracer provider can be set only once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.fixtures.commands import REPO

SCRIPT = textwrap.dedent(
    """
    import json
    from fastapi.testclient import TestClient
    from opentelemetry import trace

    spans = []

    class RecordingTracer(trace.NoOpTracer):
        def start_span(self, name, *args, **kwargs):
            spans.append(name)
            return super().start_span(name, *args, **kwargs)

    class RecordingProvider(trace.TracerProvider):
        def get_tracer(self, *args, **kwargs):
            return RecordingTracer()

    trace.set_tracer_provider(RecordingProvider())

    from service.app import create_app
    from service.settings import ServeSettings

    counts = {}
    for enabled in (False, True):
        spans.clear()
        app = create_app(ServeSettings(model="unused", opentelemetry=enabled))
        client = TestClient(app)  # no lifespan: nothing loads, /healthz answers anyway
        assert client.get("/healthz").status_code in (200, 503)
        counts[str(enabled)] = len(spans)
    print(json.dumps(counts))
    """
)


def test_request_spans_are_opened_only_when_opentelemetry_is_on() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["False"] == 0  # off by default: a configured provider gets nothing
    assert counts["True"] >= 1  # --opentelemetry: FastAPI traces the request

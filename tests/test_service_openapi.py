"""schemathesis against the service's own ``/openapi.json``: no generated request gets a server error.

The app runs in-process (schemathesis' ASGI transport, the lifespan started once) with the tiny checkpoint and an
API key, which requests carry; the schema declares the bearer scheme, so schemathesis also checks that a request
without it is refused. Every default check runs (no 5xx, documented status codes and content types, responses
matching their schemas, schema-invalid data rejected, auth enforced) except ``positive_data_acceptance``: the
schema cannot say everything the service checks (an item has exactly one of its three shapes, the per-text
character cap, a text prompt cannot meet message-list answers), so some schema-valid bodies get a 422, by design.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.fixtures.servers import make_settings

pytestmark = pytest.mark.slow  # schemathesis: requests generated from the OpenAPI schema

KEY = "openapi-k3y"
EXAMPLES = 100


@pytest.fixture  # one app per test: schemathesis' pytest plugin ends every ASGI lifespan when a test ends
def openapi_schema(tiny_reward_checkpoint: Path) -> Iterator[Any]:
    from service.app import create_app

    app = create_app(make_settings(tiny_reward_checkpoint, api_key=KEY, max_text_chars=2000, max_body_bytes=65_536))
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan (kept running)
    assert app.state.runtime.wait_until_loaded(60) and app.state.runtime.lifecycle.ready
    yield loaded
    asgi.shutdown_lifespans()


# schemathesis' own pytest integration (``schemathesis.pytest.from_fixture`` + ``@schema.parametrize()``) fails
# under pytest 9 (it sets ``request.node._nodeid``, which pytest 9 no longer has), so each operation's strategy is
# driven with hypothesis directly, as the schemathesis docs describe for use with ``@given``.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_generated_request_gets_a_server_error(openapi_schema, mode):
    @given(case=openapi_schema.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case) -> None:
        case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, excluded_checks=[positive_data_acceptance])

    run()


@pytest.mark.parametrize("api_key", [None, KEY])
def test_the_schema_asks_for_a_bearer_key_exactly_when_the_service_has_one(tiny_reward_checkpoint, api_key):
    from service.app import create_app

    schema = create_app(make_settings(tiny_reward_checkpoint, api_key=api_key)).openapi()
    for route in ("/score", "/compare", "/get_reward", "/reward", "/classify", "/v1/classify"):
        security = schema["paths"][route]["post"].get("security")
        assert (security is not None) == (api_key is not None), (route, security)
    assert ("securitySchemes" in schema.get("components", {})) == (api_key is not None)
    assert "security" not in schema["paths"]["/healthz"]["get"]  # probes stay open either way

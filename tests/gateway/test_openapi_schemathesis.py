"""schemathesis against the gateway's own /openapi.json over a real serve --http with SIMULATED
workers (the HTTP surface is under test, not diffusers; simulated steps keep the many generated
requests fast): no 5xx, and every response matches the documented schema. Bounded: a few
examples per operation, no deadline per example.

Each operation's cases come from schemathesis' strategy and run under hypothesis here (the
schemathesis pytest plugin does not load under this pytest version)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 12


def test_no_server_errors_and_responses_match_the_schema(sim_rig):
    schema = schemathesis.openapi.from_url(sim_rig.url + "/openapi.json")
    failures: dict[str, str] = {}
    ran: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        ran[label] = 0

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                  database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            ran[label] += 1
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance],
                                   timeout=120)

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # every operation is tried; all are reported
            failures[label] = f"{type(exc).__name__}: {exc}"[:2000]
    assert len(ran) >= 15 and all(ran.values()), ran
    assert not failures, "\n\n".join(f"{k}\n{v}" for k, v in failures.items()) + \
        "\n\nserve log:\n" + sim_rig.serve.log()

"""A1111's `show_progress_every_n_steps` option (POST /sdapi/v1/options, or a call's
override_settings) becomes the job's preview_every_steps, which the protocol accepts."""

from __future__ import annotations

import pytest

from gateway import a1111
from protocol.parse import parse_request


def _job(options=None, **fields):
    params = a1111.Txt2ImgRequest(prompt="a fox", steps=8, **fields)
    body, _ = a1111.to_inference_request(params, request_id="pc", default_model="tiny-sdxl", options=options)
    return parse_request(body).job


def test_the_option_sets_the_preview_cadence_and_override_settings_win():
    assert _job({"show_progress_every_n_steps": 3}).preview_every_steps == 3
    assert _job({"show_progress_every_n_steps": 3},
                override_settings={"show_progress_every_n_steps": 5}).preview_every_steps == 5


@pytest.mark.parametrize("value", [-1, 0, "2", True, None])
def test_other_values_leave_the_workers_default(value):
    job = _job({"show_progress_every_n_steps": value})
    assert job.preview and job.preview_every_steps is None


def test_a_huge_value_is_capped_at_the_most_steps_a_job_may_have():
    from protocol import constants as C

    assert _job({"show_progress_every_n_steps": 10_000}).preview_every_steps == C.MAX_PREVIEW_EVERY_STEPS

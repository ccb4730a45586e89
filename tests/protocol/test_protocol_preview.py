"""Progress previews: `preview: true` or `stream: "preview"` in each of the three forms."""

import pytest

from protocol import constants as C
from protocol.errors import ValidationFailed
from protocol.parse import body_fingerprint, parse_request
from protocol.translate import job_to_flat, job_to_legacy, job_to_nested


def flat(**fields) -> dict:
    return {"message_type": "generate_sdxl_enhanced", "request_id": "r", "prompt": "p",
            "model_base": "tiny-sdxl", **fields}


def nested(top=None, **metadata) -> dict:
    return {"message_type": "inference_request", "request_id": "n", **(top or {}),
            "data": {"prompt": "p", "models": {"base": "tiny-sdxl"}, "metadata": metadata}}


def legacy(top=None, **metadata) -> dict:
    return {"action": "generate", "session_id": "l", **(top or {}),
            "prompt_submission": {"model": {"base": "tiny-sdxl"}, "conditioning": {"prompt": "p"},
                                  "metadata": metadata}}


@pytest.mark.parametrize("body", [
    flat(preview=True, preview_size=128), flat(stream="preview", preview_size=128),
    nested({"preview": True, "preview_size": 128}), nested(stream="preview", preview_size=128),
    nested(preview=True, preview_size=128),
    legacy({"stream": "preview", "preview_size": 128}), legacy(preview=True, preview_size=128),
])
def test_preview_in_every_form_asks_for_progress_with_previews(body):
    job = parse_request(body).job
    assert (job.stream, job.preview, job.preview_size) == (True, True, 128)


def test_plain_stream_has_no_previews_and_the_default_size():
    job = parse_request(flat(stream=True)).job
    assert (job.stream, job.preview, job.preview_size) == (True, False, C.DEFAULT_PREVIEW_SIZE)
    assert parse_request(flat()).job.stream is False


@pytest.mark.parametrize("to_form", [job_to_flat, job_to_nested, job_to_legacy])
def test_preview_survives_translation_to_every_form(to_form):
    job = parse_request(flat(preview=True, preview_size=96)).job
    again = parse_request(to_form(job)).job
    assert (again.stream, again.preview, again.preview_size) == (True, True, 96)


def test_bad_preview_fields_are_field_errors():
    with pytest.raises(ValidationFailed) as info:
        parse_request(flat(stream="yes", preview=1, preview_size=C.MAX_PREVIEW_SIZE + 1))
    fields = {e.field: e.message for e in info.value.errors}
    assert set(fields) == {"stream", "preview", "preview_size"}
    assert "preview" in fields["stream"]


def test_preview_is_delivery_only_for_the_duplicate_check():
    # a resend that now asks for previews attaches to the same job, not duplicate_request_id
    assert body_fingerprint(flat(preview=True, preview_size=64)) == body_fingerprint(flat())
    assert body_fingerprint(nested(preview=True)) == body_fingerprint(nested())


@pytest.mark.parametrize("body", [
    flat(preview=True, preview_every_steps=3, preview_interval_ms=0),
    nested({"preview": True, "preview_every_steps": 3}, preview_interval_ms=0),
    nested(preview=True, preview_every_steps=3, preview_interval_ms=0),
    legacy({"preview_every_steps": 3, "preview_interval_ms": 0}, preview=True),
    legacy(preview=True, preview_every_steps=3, preview_interval_ms=0),
])
def test_preview_cadence_in_every_form(body):
    job = parse_request(body).job
    assert (job.preview, job.preview_every_steps, job.preview_interval_ms) == (True, 3, 0)


def test_preview_cadence_left_out_is_the_workers_default():
    job = parse_request(flat(preview=True)).job
    assert (job.preview_every_steps, job.preview_interval_ms) == (None, None)


@pytest.mark.parametrize("to_form", [job_to_flat, job_to_nested, job_to_legacy])
def test_preview_cadence_survives_translation_to_every_form(to_form):
    job = parse_request(flat(preview=True, preview_every_steps=5, preview_interval_ms=1500)).job
    again = parse_request(to_form(job)).job
    assert (again.preview_every_steps, again.preview_interval_ms) == (5, 1500)


def test_bad_preview_cadence_is_a_field_error():
    with pytest.raises(ValidationFailed) as info:
        parse_request(flat(preview=True, preview_every_steps=0,
                           preview_interval_ms=C.MAX_PREVIEW_INTERVAL_MS + 1))
    assert {e.field for e in info.value.errors} == {"preview_every_steps", "preview_interval_ms"}
    with pytest.raises(ValidationFailed) as info:
        parse_request(nested(preview=True, preview_every_steps="2"))
    assert [e.field for e in info.value.errors] == ["data.metadata.preview_every_steps"]


def test_preview_cadence_is_delivery_only_for_the_duplicate_check():
    assert body_fingerprint(flat(preview_every_steps=4, preview_interval_ms=0)) == body_fingerprint(flat())
    assert body_fingerprint(nested(preview_every_steps=4)) == body_fingerprint(nested())

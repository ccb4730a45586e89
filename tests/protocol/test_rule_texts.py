"""Issue 15: docs/protocol.md lists every rule once, in the words the errors use.

One table (protocol/rule_texts.py) holds every rule's message; the docs' rule table is generated
from it; every error the broker gives on a corpus of near-miss and mutated bodies is one of its
messages (never pydantic's own wording); every bounded field type carries its rule.
"""

from __future__ import annotations

import random
import typing
from pathlib import Path

import annotated_types
import pytest
from pydantic.fields import FieldInfo

from protocol import models as M
from protocol import rule_texts as R
from protocol import rules
from protocol.errors import ProtocolError
from protocol.parse import parse_request
from tests.protocol.test_schemas_agree_with_broker import NEAR_MISSES, mutate, seed_bodies

DOCS = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")


def test_the_docs_rule_table_is_generated_from_the_table():
    assert R.docs_with_table(DOCS) == DOCS, "run: python -m protocol.rule_texts --write"


def test_every_rule_is_in_the_docs_once_in_its_own_words():
    keys = [rule.key for rule in R.RULES]
    assert len(keys) == len(set(keys))
    table = DOCS[DOCS.index(R.BEGIN):DOCS.index(R.END)]
    for rule in R.RULES:
        assert f"| {rule.message.replace('|', chr(92) + '|')} |" in table, rule.key
    messages = [rule.message for rule in R.RULES]
    assert len(messages) == len(set(messages)), "two rules with one message"


def test_a_template_matches_its_filled_in_messages_only():
    assert R.matching(R.STEPS_STRENGTH(strength="0.1", steps=4, hint="raise steps")) is R.STEPS_STRENGTH
    assert R.matching(R.PARALLEL_ARRAYS(lengths="a (1), b (2)")) is R.PARALLEL_ARRAYS
    assert R.matching("Input should be greater than or equal to 1") is None
    assert R.matching(R.STEPS.message) is R.STEPS


def _emitted(body) -> list[str]:
    try:
        parse_request(body)
        return []
    except ProtocolError as exc:
        return [e.message for e in exc.errors]


def test_every_error_on_the_corpus_is_a_rule_of_the_table():
    rng = random.Random(1515)
    seeds = seed_bodies()
    bodies = [body for body, _ in NEAR_MISSES] + seeds
    bodies += [mutate(rng.choice(seeds), rng) for _ in range(3000)]
    seen: dict[str, set[str]] = {}
    strangers = []
    for body in bodies:
        for message in _emitted(body):
            rule = R.matching(message)
            if rule is None:
                strangers.append(message)
            else:
                seen.setdefault(rule.key, set()).add(message)
    assert not strangers, sorted(set(strangers))[:10]
    assert len(seen) >= 25  # the corpus reaches most rules, not a handful


def test_the_body_checks_leave_no_job_rule_for_the_worker():
    """parse_request checks every job rule (protocol.rules.job_problems, which the worker runs
    again) on the body, with the field checks: an accepted body never makes a job that breaks
    one, so the broker does not run them a second time per request."""
    rng = random.Random(4242)
    seeds = seed_bodies()
    checked = 0
    for body in seeds + [b for b, _ in NEAR_MISSES] + [mutate(rng.choice(seeds), rng)
                                                       for _ in range(3000)]:
        try:
            job = parse_request(body).job
        except ProtocolError:
            continue
        if job is not None:
            checked += 1
            assert rules.job_problems(job) == [], body
    assert checked > 150  # generation bodies the broker accepted, of every form


@pytest.mark.parametrize("body, rule", [
    ({"message_type": "generate_sdxl_enhanced", "prompt": "p", "model_base": "m", "steps": 0}, R.STEPS),
    ({"message_type": "generate_sdxl_enhanced", "prompt": "p", "model_base": "m", "width": 250}, R.SIZE),
    ({"message_type": "inference_request", "data": {"prompt": "p", "model_name": "m",
                                                    "hyperparameters": {"guidance_scale": 31}}}, R.GUIDANCE),
    ({"action": "generate", "prompt_submission": {"model": {"base": "m"}, "conditioning": {
        "prompt": "p", "loras": [{"name": "a", "weight": 3}]}}}, R.LORA_WEIGHT),
    ({"message_type": "generate_sdxl_enhanced", "prompt": "p", "model_base": "m",
      "controlnet_images": ["a.png"], "controlnet_weights": [2.5]}, R.CONTROL_SCALE),
    ({"message_type": "generate_sdxl_enhanced", "prompt": "p", "model_base": "m", "seed": 2**63}, R.SEED),
    ({"message_type": "generate_sdxl_enhanced", "prompt": "p", "model_base": "m", "timeout": 0}, R.TIMEOUT),
    ({"message_type": "generate_sdxl_enhanced", "prompt": "p", "model_base": "m", "request_id": ""}, R.ID),
    ({"message_type": "generate_sdxl_enhanced", "prompt": "p", "model_base": "m", "negative_prompt": "n" * 10_001},
     R.TEXT),
    ({"message_type": "list_history", "data": {"limit": 0}}, R.HISTORY_LIMIT),
    ({"message_type": "generate_sdxl_enhanced", "prompt": "p", "model_base": "m", "preview_size": 8},
     R.PREVIEW_SIZE),
])
def test_bound_errors_use_the_rules_words(body, rule):
    assert _emitted(body) == [rule.message]


_CONSTRAINTS = (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt,
                annotated_types.MultipleOf, annotated_types.MinLen, annotated_types.MaxLen)


def _constrained_without_rule(annotation, metadata=()) -> bool:
    """Whether some level of the type has a bound but no Rule beside it."""
    own = list(metadata) + list(getattr(annotation, "__metadata__", ()))
    flat = []
    for item in own:
        flat += list(item.metadata) if isinstance(item, FieldInfo) else [item]
    if any(isinstance(m, _CONSTRAINTS) or type(m).__name__ == "StringConstraints" for m in flat) \
            and not any(isinstance(m, R.Rule) for m in flat):
        return True
    return any(_constrained_without_rule(arg) for arg in typing.get_args(annotation))


def _models():
    seen, todo = set(), list(M.REQUEST_MODELS.values())
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for info in cls.model_fields.values():
            stack = [info.annotation]
            while stack:
                ann = stack.pop()
                if isinstance(ann, type) and issubclass(ann, M.Edge):
                    todo.append(ann)
                stack += list(typing.get_args(ann))
    return seen


def test_every_bounded_field_type_carries_its_rule():
    missing = [f"{cls.__name__}.{name}" for cls in _models()
               for name, info in cls.model_fields.items()
               if _constrained_without_rule(info.annotation, info.metadata)]
    assert not missing, missing

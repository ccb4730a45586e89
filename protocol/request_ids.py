"""Where a request body keeps its type and its id, decided once for the broker (protocol.parse),
the Python client and the gateway, so a reply always carries the id its sender waits for.

Plain dict reading with no pydantic: a client imports this without the validation models.
"""

from __future__ import annotations

from typing import Any, Optional

from protocol import constants as C


def message_type_of(body: dict) -> Any:
    """`message_type`, else the legacy `action` (message_type wins when both are given)."""
    mt = body.get("message_type")
    return mt if mt is not None else body.get("action")


def wire_id(value: Any) -> Optional[str]:
    """A usable id as text: a non-empty string of at most MAX_ID_CHARS, or an integer (a C#
    client may send a number); anything else is no id."""
    if isinstance(value, str) and 0 < len(value) <= C.MAX_ID_CHARS:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**30:
        return str(value)
    return None


def request_id_of(body: dict, message_type: Any = None) -> Optional[str]:
    """The id the client sent, wherever its form keeps it (None: it sent none).

    The legacy generate form's id is its `session_id` (then `request_id`); the nested form's is
    `request_id`, then `data.metadata.request_id`; every other body's is `request_id`, then
    `session_id`. `message_type`: message_type_of(body), when the caller has it already."""
    if message_type is None:
        message_type = message_type_of(body)
    if message_type == C.GENERATE_LEGACY_ACTION:
        return wire_id(body.get("session_id")) or wire_id(body.get("request_id"))
    rid = wire_id(body.get("request_id"))
    if rid is None and message_type == C.GENERATE_NESTED:
        data = body.get("data")
        meta = data.get("metadata") if isinstance(data, dict) else None
        return wire_id(meta.get("request_id")) if isinstance(meta, dict) else None
    return rid if rid is not None else wire_id(body.get("session_id"))

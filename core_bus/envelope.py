"""The AG1 message envelope: the one payload shape every stream carries."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat()


def hop_label(who: str) -> str:
    """A trace hop: ``"who:<epoch seconds>"`` (what :meth:`Envelope.add_hop` appends)."""
    return f"{who}:{int(time.time())}"


def _new_id() -> str:
    return str(uuid.uuid4())


class Envelope(BaseModel):
    """A message on the bus.

    Field names and defaults are those of the prototype so existing agents keep
    working; unknown keys in incoming data are ignored, not rejected.
    """

    model_config = ConfigDict(extra="ignore", validate_assignment=False)

    role: str
    content: Any = None
    session_code: str | None = None
    agent_name: str | None = None
    usage: dict[str, Any] = Field(default_factory=dict)
    billing_hint: str | None = None
    trace: list[str] = Field(default_factory=list)
    user_id: str | None = None
    task_id: str | None = None
    target: str | None = None
    reply_to: str | None = None
    envelope_type: str | None = "message"
    tools_used: list[str] = Field(default_factory=list)
    auth_signature: str | None = None
    timestamp: str = Field(default_factory=_utc_now_iso)
    headers: dict[str, str] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)
    envelope_id: str = Field(default_factory=_new_id)
    correlation_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (the prototype's wire shape)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Envelope:
        """Build from a dict; unknown keys are ignored."""
        return cls.model_validate(data)

    def to_json(self) -> bytes:
        """Serialise to compact JSON bytes (pydantic-core, no json module)."""
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Envelope:
        """Parse JSON bytes or text; raises ``pydantic.ValidationError`` when invalid."""
        return cls.model_validate_json(data)

    def add_hop(self, who: str) -> Envelope:
        """Append ``"who:<epoch seconds>"`` to the trace and return self."""
        self.trace.append(hop_label(who))
        return self

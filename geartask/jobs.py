"""What a job is on both sides: its definition, and how its payload becomes bytes and back.

Payloads are JSON (bytes pass through unchanged). Never pickle: anyone who can reach a
job server could then run code in every worker.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from .config import PRIORITIES
from .errors import JobDefinitionError


def encode_payload(data: Any, task: str | None = None) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    try:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise JobDefinitionError(f"data cannot be serialised as JSON: {e}", task) from None


# Payloads come from peers: JSON nested deeper than this stays text. json's C code recurses,
# so about 1,000 levels raise RecursionError in loads, and fewer already in dumps.
MAX_NESTING = 500


def decode_payload(raw: bytes) -> Any:
    """JSON when it parses (nested at most MAX_NESTING deep), else text when it is UTF-8,
    else the bytes themselves. Never raises."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if raw.count(b"[") + raw.count(b"{") >= MAX_NESTING and too_deep(value):
        return text
    return value


def too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether JSON ``value`` nests lists and objects more than ``limit`` levels deep."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def new_unique() -> str:
    return uuid.uuid4().hex


@dataclass
class JobDefinition:
    """One job to send. ``priority``/``background`` None mean "the sender's configured default"."""

    task: str
    data: Any = None
    unique: str | None = None
    priority: str | None = None
    background: bool | None = None
    retries: int | None = None
    at: int | None = None  # Unix time: a background job that gearmand holds until then
    extra: dict = field(default_factory=dict)  # anything else a plugin wants to carry along
    _encoded: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_any(cls, obj: Any, source: str = "job definition") -> "JobDefinition":
        """Validate a plugin's mapping (or a JobDefinition) and return a JobDefinition."""
        if isinstance(obj, JobDefinition):
            obj = {k: v for k, v in obj.__dict__.items() if k != "_encoded"}
        if not isinstance(obj, Mapping):
            raise JobDefinitionError(f"{source}: expected a mapping with 'task', got {obj!r}")
        d = dict(obj)
        task = d.pop("task", None)
        if not isinstance(task, str) or not task.strip() or any(c.isspace() or c == "\0" for c in task):
            raise JobDefinitionError(f"{source}: 'task' must be a non-empty name without spaces, got {task!r}")
        unique = d.pop("unique", None)
        if unique is not None:
            if not isinstance(unique, (str, int)) or isinstance(unique, bool) or "\0" in str(unique) or str(unique) == "":
                raise JobDefinitionError(f"{source}: 'unique' must be a non-empty string, got {unique!r}", task)
            unique = str(unique)
        priority = d.pop("priority", None)
        if priority is not None and priority not in PRIORITIES:
            raise JobDefinitionError(f"{source}: unknown priority {priority!r} (use one of {', '.join(PRIORITIES)})", task)
        background = d.pop("background", None)
        if background is not None and not isinstance(background, bool):
            raise JobDefinitionError(f"{source}: 'background' must be true or false, got {background!r}", task)
        retries = d.pop("retries", None)
        if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool) or retries < 0):
            raise JobDefinitionError(f"{source}: 'retries' must be a whole number >= 0, got {retries!r}", task)
        for what, text in (("task", task), ("unique", unique)):
            try:
                (text or "").encode("utf-8")
            except UnicodeEncodeError:
                raise JobDefinitionError(f"{source}: {what!r} is not UTF-8 text: {text!r}", task) from None
        at = d.pop("at", None)
        if at is not None:
            if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at) or at <= 0:
                raise JobDefinitionError(f"{source}: 'at' must be a Unix time in seconds, got {at!r}", task)
            if background is False:
                raise JobDefinitionError(f"{source}: 'at' needs a background job (gearmand holds only those)", task)
            at = int(math.ceil(at))
        data = d.pop("data", None)
        extra = dict(d.pop("extra", None) or {})
        extra.update(d)
        job = cls(task=task, data=data, unique=unique, priority=priority, background=background,
                  retries=retries, at=at, extra=extra)
        job.payload()  # fail now, naming the task, if the data can't be sent
        return job

    def payload(self) -> bytes:
        """The user's data as the bytes the worker's task gets, encoded once (build a new
        definition to change it). geartask's own options travel in the envelope in front
        of them (geartask.envelope), added by the sender."""
        if self._encoded is None:
            self._encoded = encode_payload(self.data, self.task)
        return self._encoded


"""What every call of one JobSender shares: built once by the JobSender, read by each Batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import SenderConfig
    from .background import BackgroundRecord
    from .no_worker import ServedTasks


@dataclass(frozen=True)
class BatchSettings:
    """Frozen: a call in progress never sees a setting change under it (JobSender's limit
    setters build a new one for the next call)."""

    sender: SenderConfig  # the config's sender section: priority, failover_after, connect_timeout...
    log: Any  # the sender's bound structlog logger
    debug: bool  # geartask.sender logs at DEBUG: the per-job lines are built
    max_payload: int  # bytes of one job's payload, checked before anything is sent
    max_data: int  # bytes of WORK_DATA kept per job; later chunks are counted, not kept
    record: BackgroundRecord | None  # where accepted background jobs are appended; None: nowhere
    key: Any = None  # security.key (an Ed25519 private key): every job is signed with it; None: unsigned
    served: ServedTasks | None = None  # tasks seen served lately, shared by the sender's calls (no_worker.py)

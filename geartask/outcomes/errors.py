"""How the outcome collector, its store and its clients fail (all GeartaskError)."""

from __future__ import annotations

from ..errors import EXIT_USAGE, GeartaskError


class OutcomeError(GeartaskError):
    """Base of the outcome errors."""


class NoCollectorError(OutcomeError):
    """Raised when no outcomes collector answered a query within the client's deadline."""


class QueryError(OutcomeError):
    """Raised when the collector refused a query (``{"ok": false, "error": ...}``) or its answer
    is not one (a peer that is not a collector serves the query function)."""


class CollectorConflict(OutcomeError):
    """Raised at start when another collector is registered on one of the servers."""

    exit_status = EXIT_USAGE


class StoreError(OutcomeError):
    """Raised when the outcome store can't be opened or written."""


class RogueAnswerError(QueryError):
    """Raised when a query's answer is not signed for ``answer`` by a trusted signer while
    ``security.require_signed`` is on: whoever answered is not a trusted collector, and what it
    said is never used."""

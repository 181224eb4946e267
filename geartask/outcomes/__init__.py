"""Job outcomes for the whole fleet: what workers report, the collector stores, anyone reads."""

from .record import BadOutcome, check
from .store import BACKENDS, OutcomeStore, SqliteOutcomeStore, open_store

__all__ = ["BadOutcome", "check", "OutcomeStore", "SqliteOutcomeStore", "BACKENDS", "open_store"]

"""Job outcomes for the whole fleet: what workers report, the collector stores, anyone reads.

docs/outcomes.md has the contracts: the record, the outcome jobs, the query protocol.
"""

from .errors import CollectorConflict, NoCollectorError, OutcomeError, QueryError, StoreError
from .record import (OUTCOME_FUNCTION, QUERY_FUNCTION, BadOutcome, check, decode_bytes, encode_batches,
                     make_record, outcome_jobs)
from .store import BACKENDS, OutcomeStore, SqliteOutcomeStore, open_store

__all__ = ["BadOutcome", "check", "make_record", "encode_batches", "outcome_jobs", "decode_bytes", "OUTCOME_FUNCTION",
           "QUERY_FUNCTION", "OutcomeStore", "SqliteOutcomeStore", "BACKENDS", "open_store", "OutcomeError",
           "NoCollectorError", "QueryError", "CollectorConflict", "StoreError"]

"""The tiered tensor store."""

from infinity.store._checks import StoreLockedError
from infinity.store.config import StoreConfig, StoreStats
from infinity.store.store import EntryInfo, TieredStore, UnknownKeyError

__all__ = [
    "EntryInfo",
    "StoreConfig",
    "StoreLockedError",
    "StoreStats",
    "TieredStore",
    "UnknownKeyError",
]

"""The tiered tensor store."""

from infinity.store.config import StoreConfig, StoreStats
from infinity.store.store import EntryInfo, StoreLockedError, TieredStore, UnknownKeyError

__all__ = [
    "EntryInfo",
    "StoreConfig",
    "StoreLockedError",
    "StoreStats",
    "TieredStore",
    "UnknownKeyError",
]

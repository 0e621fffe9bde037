"""Training with offloaded state: ``OffloadedAdamW`` keeps AdamW's fp32 state (master weights,
exp_avg, exp_avg_sq) in a TieredStore on NVMe, streamed through the runtime executor in tiles,
with what fits in ``pinned_bytes`` kept in RAM."""

from infinity.training.optimizer import OffloadedAdamW, StaleStateError

__all__ = ["OffloadedAdamW", "StaleStateError"]

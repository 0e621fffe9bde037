"""The runtime: the one executor of plans (what is resident where, reads, host<->device copies
through ``infinity.io.copy``, write-back) and the units it moves. It knows no models."""

from infinity.runtime.executor import Executor
from infinity.runtime.units import Piece, Unit, pack

__all__ = ["Executor", "Piece", "Unit", "pack"]

"""Performance-critical ops: one folder per op, an XLA reference that runs
everywhere, and backend-specific implementations chosen by `implementation=`."""

from atoll.kernels.attention import attention, attention_reference
from atoll.kernels.grouped_matmul import grouped_matmul, grouped_matmul_reference

__all__ = ["attention", "attention_reference", "grouped_matmul", "grouped_matmul_reference"]

"""Performance-critical ops: one folder per op, an XLA reference that runs
everywhere, and backend-specific implementations chosen by `implementation=`."""

from atoll.kernels.attention import attention, attention_reference

__all__ = ["attention", "attention_reference"]

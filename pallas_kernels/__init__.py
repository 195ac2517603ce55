"""Pallas kernels for the chunked PRISM recurrence (GPU: gpu/, TPU: tpu/)."""

from pallas_kernels.prism import pallas_prism, unsupported_reason

__all__ = ["pallas_prism", "unsupported_reason"]

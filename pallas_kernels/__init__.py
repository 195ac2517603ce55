"""Pallas kernels for the chunked PRISM recurrence (GPU: gpu/, TPU: tpu/)."""

"""Sparse TFLite: export, read-back report, runtime, parity check and the XNNPACK sparse path."""

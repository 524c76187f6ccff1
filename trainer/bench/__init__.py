"""Benchmarks that print figures (never timed unit tests): `lora-studio bench NAME`."""

"""The memory room: what a run needs (estimate), what to change so it fits (plan), the stand-ins that store frozen
weights in fp8 or stream them from system RAM (frozen), the run's precision, the steps measured here (speed_log),
the CPU's bf16 speed (cpu_features) and Windows' VRAM spill (spill). Torch-free except frozen and precision, so the
app plans with the same code the trainer does."""

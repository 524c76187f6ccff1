"""The training room: `train(cfg, events)` (loop.py) and what it is made of: the step's loss (step), the run's
start (setup), where each model sits on the device (residency), checkpoint judging and the end of a run (judge),
the held-out validation loss and drift (validation), samples, saving LoRAs and training states (saving, state,
state_files) and resuming from them, the run folder's events, and what several processes share (distributed).
events and state_files are torch-free: the app reads runs through them."""

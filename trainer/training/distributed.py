"""What several processes (accelerate launch) share: gradient sync only on an accumulation's last micro-batch, one
Stop for all, the replicas' agreement at the end, and an end that cannot deadlock."""
from __future__ import annotations

import contextlib

import torch

from trainer.errors import StopRequested
from trainer.training.events import Events


@contextlib.contextmanager
def no_sync(accelerator, models, enabled: bool):
    # Skip the DDP all-reduce on accumulation micro-steps; only the last one syncs gradients.
    with contextlib.ExitStack() as stack:
        if enabled:
            for m in models:
                stack.enter_context(accelerator.no_sync(m))
        yield

def end_processes(accelerator) -> None:
    """Let DDP's reducers go while the process group is still registered, then end it. A reducer holding the
    group's last reference destroys it with the GIL held, and that joins gloo's threads, one of which may need the
    GIL to finish cleaning up the last collective: a deadlock (rank 0 hung after its done event, 2 of 12
    two-process CPU runs on a loaded machine). The group's own destructor releases the GIL."""
    accelerator.free_memory()  # drops accelerate's references to the prepared (DDP-wrapped) models
    accelerator.end_training()

def ranks_in_sync(accelerator, groups) -> bool:
    """Every process must end with the same LoRA weights; compare a checksum across ranks."""
    total = torch.stack([p.detach().double().sum() for g in groups for p in g["params"]]).sum().reshape(1)
    sums = accelerator.gather(total.to(accelerator.device))
    return bool(torch.allclose(sums, sums[0].expand_as(sums), rtol=0, atol=1e-9))

def stop_point(accelerator, events: Events, phase: str) -> None:
    """Between the phases before training: a Stop pressed since the run was queued ends it here, on every process."""
    if stop_everywhere(accelerator, events):
        raise StopRequested(phase)

def stop_everywhere(accelerator, events: Events) -> bool:
    flag = torch.tensor([1.0 if events.stop_requested() else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

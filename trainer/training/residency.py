"""Where each model sits while a run goes: every model visits the device only for its own phase (the VAE to fill the
latent cache, the text encoders to cache captions, the denoiser to train), and frozen encoders whose captions are
all cached leave memory altogether. On a CPU nothing moves."""
from __future__ import annotations

import contextlib
import gc

import torch

from trainer.training import validation
from trainer.models.info import is_embedded


def place(model, device, dtype) -> None:
    # Casting to the dtype a model already has makes diffusers warn for nothing; move only then.
    if next(model.parameters()).dtype == dtype:
        model.to(device)
    else:
        model.to(device, dtype=dtype)

@contextlib.contextmanager
def borrowed(modules, device, visiting=()):
    """Modules offloaded to the CPU once their outputs were cached come back to the device for sampling, and
    leave again after. The `visiting` ones (text encoders) come one at a time, each only for its own forward
    call: SD3's T5-XXL (9.5 GB in bf16) and its two CLIPs need not fit on the card together, nor beside the
    denoiser. On a CPU, or for modules already on the device, nothing moves."""
    homes = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    hooks = [h for m in visiting for h in _visit(m, device)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, home in zip(modules, homes):
            m.to(home)

def _visit(module, device) -> list:
    """Hooks that bring `module` (and its tensor inputs) to `device` for each forward call and send it home
    after; its outputs stay on the device."""
    home = next(module.parameters()).device
    if home.type == device.type and (home.index or 0) == (device.index or 0):
        return []

    def arrive(mod, args, kwargs):
        mod.to(device)
        move = lambda x: x.to(device) if torch.is_tensor(x) else x  # noqa: E731
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    def leave(mod, args, kwargs, output):
        mod.to(home)
        return output

    return [module.register_forward_pre_hook(arrive, with_kwargs=True),
            module.register_forward_hook(leave, with_kwargs=True)]

def moved(value, device):
    """A pipeline argument on `device`: a tensor, or a list of them (Z-Image's caption features have each their own
    length)."""
    if isinstance(value, (list, tuple)):
        return [moved(v, device) for v in value]
    return value.to(device) if isinstance(value, torch.Tensor) else value


def let_encoders_go(cfg, base, precision, device, main, events, drift: bool) -> dict:
    """Encode the prompts the run will still sample (its sample prompts and, when `drift` is judged, i.e. with a
    validation set, the drift prompts; with the negative prompt), then let the frozen text encoders' weights go: moved to the meta device, which keeps no data, so a
    stray use fails loudly instead of reading garbage. They hold host RAM the whole run otherwise: SDXL's pair 1.6 GB
    in bf16, SD3's T5-XXL 9.5 GB. Returns prompt -> pipeline arguments, for samples.render."""
    drifts = validation.drift_prompts(cfg, is_embedded(cfg.model.source)) if drift else []
    prompts = list(dict.fromkeys([*cfg.sample.prompts, *drifts]))
    encoded = {}
    if main:  # the only process that samples
        with torch.no_grad(), precision.autocast(), borrowed([], device, visiting=base.text_encoders):
            for prompt in prompts:
                kwargs = base.family.prompt_kwargs(base.text_encoders, base.tokenizers, [prompt],
                                                   cfg.sample.negative_prompt, cfg.model.clip_skip)
                encoded[prompt] = {k: moved(v, "cpu") for k, v in kwargs.items()}
    for te in base.text_encoders:
        te.to("meta")
    gc.collect()
    events.emit("text_encoders_released", prompts=len(encoded))
    return encoded

@torch.no_grad()
def encode_captions(fam, tes, tokenizers, captions, clip_skip, precision, cache, stop=None, progress=None):
    """Put every caption the TextCache `cache` lacks into it, from frozen text encoders (what each caption keeps is
    the family's `text_entry`). Captions go 16 at a time, so an encoder visiting the GPU (see borrowed) moves once
    per chunk rather than once per caption; `stop()` is asked between chunks. Returns (already cached, encoded)."""
    todo = [c for c in captions if not cache.has(c)]
    chunk = 16  # captions per encoder pass
    with precision.autocast():
        for start in range(0, len(todo), chunk):
            if stop is not None and stop():
                break
            part = todo[start:start + chunk]
            hidden, pooled = fam.encode(tes, fam.tokenize(tokenizers, part), clip_skip)
            for i, c in enumerate(part):
                cache.put(c, fam.text_entry(hidden[i], None if pooled is None else pooled[i]))
            if progress:
                progress(len(captions) - len(todo) + start + len(part))
    return len(captions) - len(todo), len(todo)

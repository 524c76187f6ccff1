"""Sample images during training: fixed prompts and seeds, so samples are comparable across steps."""
from __future__ import annotations

import io
from pathlib import Path

import torch

from trainer.atomic import write_bytes


@torch.no_grad()
def render(family, unet, vae, text_encoders, tokenizers, scheduler_config: dict, prompts: list[str], *,
           negative: str, seed: int, steps: int, guidance: float, size: int, clip_skip: int, autocast, stop=None,
           guidance_rescale: float = 0.0, encoded: dict | None = None, on_image=None):
    """One image per prompt, prompt i at seed + i, with `scheduler_config` and `guidance_rescale` as
    models.sampling_schedule gives them. `stop()` is asked before each image and after each denoising step (an
    SDXL image takes minutes on a CPU): a user who stopped the run skips the rest, and a half-made image is dropped. `encoded`: prompt -> pipeline arguments (its embeddings and `negative`'s), made before the
    text encoders were let go; then no encoder runs."""
    if encoded is not None:
        text_encoders = []
    pipe = family.pipeline(unet, vae, text_encoders or None, tokenizers, family.sampler(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    was_training = [m.training for m in (unet, *text_encoders)]
    for m in (unet, *text_encoders):
        m.eval()
    images = []
    interrupt = {"callback_on_step_end": _interrupter(stop)} if stop is not None else {}
    try:
        with autocast:
            for i, prompt in enumerate(prompts):
                if stop is not None and stop():
                    break
                kwargs = encoded[prompt] if encoded is not None else \
                    family.prompt_kwargs(text_encoders, tokenizers, [prompt], negative, clip_skip)
                gen = torch.Generator("cpu").manual_seed(seed + i)
                rescale = {"guidance_rescale": guidance_rescale} if guidance_rescale else {}  # SD3 has no such knob
                out = pipe(**kwargs, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                           generator=gen, **rescale, **interrupt)
                if stop is not None and stop():
                    break  # interrupted part-way: not a sample
                images.append(out.images[0])
                if on_image:
                    on_image(len(images))
    finally:
        for m, t in zip((unet, *text_encoders), was_training):
            m.train(t)
    return images


def _interrupter(stop):
    """A diffusers step-end callback that ends the denoising loop once `stop()` says so (the pipeline's own
    interrupt flag: the remaining steps are skipped)."""
    def on_step_end(pipe, step, timestep, callback_kwargs):
        if stop():
            pipe._interrupt = True
        return callback_kwargs

    return on_step_end


def save_png(image, path: Path) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes(path, buf.getvalue())
    return path

"""Sample images during training: fixed prompts and seeds, so samples are comparable across steps."""
from __future__ import annotations

import io
from pathlib import Path

import torch

from trainer.atomic import write_bytes
from trainer.models import sampling_schedule
from trainer.training.events import Events, read_events
from trainer.training.residency import borrowed, moved


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
                kwargs = {k: moved(v, unet.device) for k, v in encoded[prompt].items()} if encoded is not None \
                    else family.prompt_kwargs(text_encoders, tokenizers, [prompt], negative, clip_skip)
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


def render_prompts(cfg, base, unet, tes, precision, prompts, stop=None, encoded=None, seed_offset: int = 0,
            on_image=None) -> list:
    """Prompts at the sample settings and seeds, with the VAE and text encoders borrowed back to the device;
    `encoded`: the prompts' embeddings, made before the encoders were let go (see let_encoders_go)."""
    schedule, rescale = sampling_schedule(base.scheduler_config, cfg.model.prediction_type, cfg.model.zero_terminal_snr)
    with borrowed([base.vae], precision.device, visiting=tes if encoded is None else ()):
        return render(base.family, unet, base.vae, tes, base.tokenizers, schedule, prompts,
                      negative=cfg.sample.negative_prompt, seed=cfg.sample.seed + seed_offset, steps=cfg.sample.steps,
                      guidance=cfg.sample.guidance_scale, size=cfg.data.resolution, guidance_rescale=rescale,
                      clip_skip=cfg.model.clip_skip, autocast=precision.autocast(), stop=stop, encoded=encoded,
                      on_image=on_image)

def sample(cfg, base, unet, tes, precision, run_dir, step, events, stop=None, encoded=None,
            end: bool = False) -> list[Path]:
    prompts = cfg.sample.prompts
    phase = "end samples" if end else "samples"
    with events.progress.phase(phase, len(prompts)) as tick:
        images = render_prompts(cfg, base, unet, tes, precision, prompts, stop, encoded, on_image=tick)
    written = []
    for i, (prompt, im) in enumerate(zip(prompts, images)):
        path = save_png(im, run_dir / "samples" / f"step{step:06d}_{i:02d}.png")
        events.emit("sample", step=step, path=str(path), prompt=prompt, seed=cfg.sample.seed + i)
        written.append(path)
    return written

def checkpoint_grid(run_dir: Path, steps: list[int], events: Events) -> None:
    """The run's sample prompts (rows) at every checkpoint (columns), same seeds: samples/checkpoints.png."""
    from PIL import Image

    from trainer.sheets import grid

    shown = {(e["step"], e["path"]): e for e in read_events(run_dir) if e["type"] == "sample" and e["step"] in steps}
    by_step = {s: sorted((e for (st, _), e in shown.items() if st == s), key=lambda e: e["seed"]) for s in steps}
    rows = min((len(v) for v in by_step.values()), default=0)
    if len(steps) < 2 or not rows:
        return
    images, labels = [], []
    for r in range(rows):
        for s in steps:
            images.append(Image.open(by_step[s][r]["path"]).convert("RGB"))
            labels.append(f"step {s}" if r == 0 else "")
    path = run_dir / "samples" / "checkpoints.png"
    grid(images, labels, columns=len(steps)).save(path)
    events.emit("sample", step=steps[-1], path=str(path), prompt="every checkpoint x the sample prompts",
                seed=None, grid=True)

"""The proof that each preset learns: train it on its sample dataset with the embedded model, then
score generations with and without the trigger against the base model at the same seeds."""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from trainer.lora import adapters
from trainer.lora.read import read_lora
from ..resources import SAMPLE_DATASETS
from . import score, shapes
from .datasets import KINDS

EVAL = dict(prompts=8, steps=20, guidance=4.0, seed=500)


@dataclass
class Learned:
    score_base: float
    score_lora: float
    drift: float
    steps: int
    seconds: float


def trigger_prompts(kind: str, n: int) -> list[str]:
    """Captions of fresh scenes of the new thing, never the dataset's own."""
    rng = random.Random(f"eval-{kind}")
    return [KINDS[kind][2](rng).caption() for _ in range(n)]


def plain_prompts(n: int) -> list[str]:
    rng = random.Random("eval-plain")
    return [shapes.random_scene(rng).caption() for _ in range(n)]


def generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float) -> list[Image.Image]:
    import torch

    return [pipe(p, num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(seed + i)).images[0] for i, p in enumerate(prompts)]


def prompt_following(pipe, n: int, seed: int, steps: int = 20, guidance: float = 4.0) -> dict:
    """Generate `n` base-world prompts and count images whose shape and colour the checker confirms."""
    from .checker import follows

    rng = random.Random(seed)
    scenes = [shapes.random_scene(rng) for _ in range(n)]
    images = generate(pipe, [s.caption() for s in scenes], seed, steps, guidance)
    hits = sum(follows(im, s.shape, s.colour) for im, s in zip(images, scenes))
    return {"prompts": n, "hits": hits, "accuracy": hits / n}


def generation_seconds(pipe, repeats: int = 3) -> float:
    """Median wall time of one full generation at the model's native size (20 steps with CFG)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        generate(pipe, ["a large red circle on a blue background"], i, EVAL["steps"], EVAL["guidance"])
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]  # the first call warms caches up


def load_pipeline(source: str = "tiny"):
    from diffusers import StableDiffusionPipeline

    from trainer.models import resolve_source

    pipe = StableDiffusionPipeline.from_pretrained(resolve_source(source), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate(pipe, kind: str, lora_path: Path, dataset: Path) -> tuple[float, float, float]:
    """(score of the base model, score with the LoRA, drift on trigger-free prompts)."""
    references = [Image.open(p).convert("RGB") for p in sorted(dataset.glob("*.png"))]
    with_trigger, without = trigger_prompts(kind, EVAL["prompts"]), plain_prompts(EVAL["prompts"])
    args = (EVAL["seed"], EVAL["steps"], EVAL["guidance"])
    models = {"lora_unet": pipe.unet, "lora_te": pipe.text_encoder}
    base_new, base_plain = generate(pipe, with_trigger, *args), generate(pipe, without, *args)
    adapters.load(models, read_lora(lora_path), kind)
    adapters.mix(models, {kind: {prefix: 1.0 for prefix in models}})
    try:
        lora_new, lora_plain = generate(pipe, with_trigger, *args), generate(pipe, without, *args)
    finally:
        adapters.remove(models, kind)
    scorer = score.SCORERS[kind]
    return scorer(base_new, references), scorer(lora_new, references), score.drift(base_plain, lora_plain)


def learn(kind: str, workdir: Path, *, pipe=None, dataset: Path | None = None, overrides: list[str] = (),
          model: str = "tiny") -> Learned:
    dataset = dataset or SAMPLE_DATASETS / kind
    path, seconds, steps = learn_file(kind, workdir, dataset=dataset, overrides=overrides, model=model)
    base, lora, drift = evaluate(pipe or load_pipeline(model), kind, path, dataset)
    return Learned(round(base, 4), round(lora, 4), round(drift, 4), steps, round(seconds, 1))


def learn_file(kind: str, workdir: Path, *, dataset: Path | None = None, overrides: list[str] = (),
               model: str = "tiny") -> tuple[Path, float, int]:
    """Train the `kind` preset on its dataset: (the LoRA file, seconds, steps)."""
    from ..config import RunConfig
    from trainer.training.loop import train
    from ..presets import resolve

    dataset = dataset or SAMPLE_DATASETS / kind
    n_images = len(list(dataset.glob("*.png")))
    cfg = RunConfig.load(resolve(kind, family="tiny", n_images=n_images), overrides=[
        f'model.source="{model}"', f'data.dataset="{dataset.as_posix()}"',
        f'save.output_dir="{(workdir / kind).as_posix()}"', *overrides])
    start = time.perf_counter()
    result = train(cfg)
    seconds = round(time.perf_counter() - start, 1)
    return result.lora_path, seconds, result.steps


def as_dict(results: dict[str, Learned]) -> dict:
    return {k: asdict(v) for k, v in results.items()}

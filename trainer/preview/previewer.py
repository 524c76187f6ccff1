"""Preview: one warm pipeline per base model, LoRAs mixed as diffusers adapters at chosen weights.

Files are loaded once (per path and modification time) and stay loaded as peft adapters on the UNet and
text encoders (`adapters.py`); changing a weight only rescales them. Family mismatches are refused
before loading. The app builds compare and X/Y grids from single renders (`grids.py`), cell by cell.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from trainer.lora import adapters
from trainer.lora.read import LoraError, check_family, read_lora
from trainer.models import load_base, sampling_schedule

SAMPLERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
            "dpm++": "DPMSolverMultistepScheduler"}
# A flow-matching model (SD3) samples along its flow: every choice maps onto a flow sampler.
FLOW_SAMPLERS = {"euler": "FlowMatchEulerDiscreteScheduler", "heun": "FlowMatchHeunDiscreteScheduler"}


@dataclass
class Slot:
    path: str
    weight: float = 1.0
    unet: float | None = None  # separate UNet / text-encoder weights; None = `weight`
    text_encoder: float | None = None
    enabled: bool = True


@dataclass
class Request:
    base: str = "tiny"
    loras: list[Slot] = field(default_factory=list)
    prompt: str = ""
    negative: str = ""
    seed: int = 0
    steps: int | None = None  # None = the model's own (trainer.models.info.SAMPLING)
    guidance: float | None = None
    size: int | None = None  # None = the model's native size
    sampler: str = "ddim"

    @classmethod
    def from_dict(cls, d: dict) -> "Request":
        d = dict(d)
        d["loras"] = [Slot(**s) for s in d.get("loras", [])]
        return cls(**d)


class Previewer:
    def __init__(self, say=None):
        self.say = say or (lambda text: None)  # a phase, for the page ("loading the pipeline", "step 12 of 20")
        self.base_source: str | None = None
        self.base = None
        self.pipe = None
        self.models: adapters.Models = {}
        self.adapters: dict[str, tuple[str, float]] = {}  # path -> (adapter name, mtime)
        self.loads = 0  # LoRA files read from disk, for the "changing a weight never reloads" test

    # ---- pipeline and adapters ---------------------------------------------------------------------
    def pipeline(self, source: str):
        if source != self.base_source:
            self.say(f"loading the base model ({Path(source).name or source})")
            self.base = load_base(source)
            b = self.base
            self.pipe = b.family.pipeline(b.unet, b.vae, b.text_encoders, b.tokenizers,
                                          b.family.sampler(sampling_schedule(b.scheduler_config)[0]))
            self.pipe.set_progress_bar_config(disable=True)
            self.models = b.family.models(b.unet, b.text_encoders)
            self.base_source, self.adapters = source, {}
        return self.pipe

    def adapter(self, path: str) -> str:
        p = Path(path)
        if not p.is_file():
            raise LoraError(f"LoRA file {path} does not exist")
        mtime = os.stat(p).st_mtime
        known = self.adapters.get(str(p))
        if known and known[1] == mtime:
            return known[0]
        self.say(f"loading {p.name}")
        lora = read_lora(p)  # refuses broken files and unsupported kinds by name
        check_family(lora, self.base.family.name)
        name = f"lora{len(self.adapters) + self.loads}"
        if known:
            adapters.remove(self.models, known[0])
        adapters.load(self.models, lora, name, self.base.family.unet_namer(self.base.unet.config))
        self.loads += 1
        self.adapters[str(p)] = (name, mtime)
        return name

    def apply(self, slots: list[Slot]) -> None:
        weights: dict[str, dict[str, float]] = {}
        for s in (s for s in slots if s.enabled):
            unet = s.weight if s.unet is None else s.unet
            te = s.weight if s.text_encoder is None else s.text_encoder
            denoiser = self.base.family.denoiser_prefix
            weights[self.adapter(s.path)] = {prefix: unet if prefix == denoiser else te for prefix in self.models}
        adapters.mix(self.models, weights)

    def sampler_class(self, sampler: str) -> str:
        if sampler not in SAMPLERS and sampler not in FLOW_SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
        if self.base.prediction_type == "flow_matching":
            return FLOW_SAMPLERS.get(sampler, FLOW_SAMPLERS["euler"])
        return SAMPLERS.get(sampler, SAMPLERS["euler"])

    def scheduler(self, sampler: str):
        import diffusers

        name = self.sampler_class(sampler)
        return getattr(diffusers, name).from_config(sampling_schedule(self.base.scheduler_config)[0])

    def native_size(self) -> int:
        """The size the base was made for (trainer.models.info.native_resolution: its config's own, else the
        family's: Flux.1's and Z-Image's published configs carry no sample_size)."""
        from trainer.models.info import native_resolution

        b = self.base
        return native_resolution(b.family.name, dict(b.unet.config), dict(b.vae.config)) or b.family.default_resolution

    def sampling(self) -> tuple[int, float]:
        """The base's own steps and guidance (Z-Image Turbo: 9 steps, no CFG; Flux.1 dev: guidance 3.5 ...)."""
        from trainer.models.info import sampling_defaults

        return sampling_defaults(self.base.family.name, self.base_source, dict(self.base.unet.config))

    # ---- rendering ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, req: Request) -> tuple[Image.Image, dict]:
        pipe = self.pipeline(req.base)
        self.apply(req.loras)
        pipe.scheduler = self.scheduler(req.sampler)
        size = req.size or self.native_size()
        steps, guidance = self.sampling()
        req = Request(**{**req.__dict__, "steps": req.steps or steps,
                         "guidance": guidance if req.guidance is None else req.guidance})
        rescale = sampling_schedule(self.base.scheduler_config)[1]

        def on_step(pipe, i, t, kwargs):
            self.say(f"denoising: step {i + 1} of {req.steps}")
            return kwargs

        self.say(f"denoising: step 0 of {req.steps}")
        image = pipe(req.prompt, negative_prompt=req.negative or None, num_inference_steps=req.steps,
                     guidance_scale=req.guidance, height=size, width=size,
                     **({"guidance_rescale": rescale} if rescale else {}), callback_on_step_end=on_step,
                     generator=torch.Generator("cpu").manual_seed(req.seed)).images[0]
        settings = {**asdict(req), "size": size, "family": self.base.family.name,
                    "scheduler": type(pipe.scheduler).__name__}
        return image, settings

"""What the rectified-flow families (SD3, Flux.1, Z-Image) share: the velocity target, the flow schedule (its shift
fixed or following the image's size), the flow-matching Euler sampler, and diffusers' own attention processors."""
from __future__ import annotations

from dataclasses import dataclass

from trainer.errors import ModelError
from trainer.models.family import Family


@dataclass(frozen=True)
class FlowMatchingFamily(Family):
    LABEL = "a flow-matching"  # how messages name the family ("an SD3", "a Flux", ...)
    CELL = 1  # latent cells per image token side: 2 where latents are cut into 2x2 patches (the dynamic shift)

    def default_prediction(self, scheduler_config: dict) -> str:
        return "flow_matching"

    def schedule(self, scheduler_config, prediction_type, zero_terminal_snr, min_snr_gamma):
        from trainer.models.schedules import FlowMatching

        if prediction_type != "flow_matching":
            raise ModelError(f"model.prediction_type {prediction_type!r} does not fit {self.LABEL} model, which trains "
                             "by flow matching; leave model.prediction_type unset or set it to flow_matching")
        if zero_terminal_snr:
            raise ModelError(f"model.zero_terminal_snr does not apply to {self.LABEL.split(' ', 1)[1]}: its flow "
                             "schedule already ends in pure noise; leave it unset")
        return FlowMatching(scheduler_config, cell=self.CELL)

    def attention_processor(self):
        return None  # diffusers' defaults: SDPA in joint attention already

    def sampler(self, scheduler_config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

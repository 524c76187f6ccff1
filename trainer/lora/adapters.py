"""LoRA files as named peft adapters on live models, mixed at per-component weights.

Preview and `bench learn` load files through here rather than diffusers' `load_lora_weights`: that one
hands text encoders to transformers' optional peft integration, which is version-gated (transformers
5.24 demands a peft that did not exist yet) and only logs the keys it cannot place. Here every module
of the file must land on a layer of the base, or the file is refused with the first one that does not.
"""
from __future__ import annotations

import re
import warnings

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from trainer.lora.read import LoraError, LoraFile, module_index, require_fit

Models = dict[str, torch.nn.Module]  # kohya key prefix ("lora_unet", "lora_te", "lora_te1", ...) -> model


def load(models: Models, lora: LoraFile, name: str, unet_namer=None) -> dict[str, int]:
    """Inject `lora` into `models` as adapter `name`, weights copied exactly; returns modules per prefix."""
    index = module_index(models, unet_namer)
    where = {id(mod): (prefix, path.replace(".base_layer", ""))
             for prefix, model in models.items() for path, mod in model.named_modules()}
    missing = [k for k in lora.modules if k not in index]
    if missing:
        raise LoraError(f"{lora.path.name}: {len(missing)} of {len(lora.modules)} modules match no layer of this "
                        f"base model (first: {missing[0]}); is it made for another model?")
    for key, module in lora.modules.items():
        require_fit(lora.path.name, key, module, index[key].weight)
    placed: dict[str, dict[str, object]] = {}
    for key, module in lora.modules.items():
        prefix, path = where[id(index[key])]
        placed.setdefault(prefix, {})[path] = module
    for prefix, modules in placed.items():
        _inject(models[prefix], modules, name)
    return {prefix: len(modules) for prefix, modules in placed.items()}


def _inject(model: torch.nn.Module, modules: dict, name: str) -> None:
    first = next(iter(modules.values()))
    exact = {re.escape(path): m for path, m in modules.items()}  # peft reads pattern keys as regexes
    config = PeftLoraConfig(
        r=first.rank, lora_alpha=first.alpha, target_modules=sorted(modules),
        rank_pattern={k: m.rank for k, m in exact.items()}, alpha_pattern={k: m.alpha for k, m in exact.items()},
        use_dora=any(m.dora_scale is not None for m in modules.values()), lora_dropout=0.0)
    with warnings.catch_warnings():  # several adapters on one model is exactly what mixing wants
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        inject_adapter_in_model(config, model, adapter_name=name)
    with torch.no_grad():
        for path, m in modules.items():
            layer = model.get_submodule(path)
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            a.copy_(m.down.reshape(a.shape).to(a.dtype))
            b.copy_(m.up.reshape(b.shape).to(b.dtype))
            if m.dora_scale is not None:
                magnitude = layer.lora_magnitude_vector[name].weight
                base = layer.get_base_layer().weight
                magnitude.copy_(m.magnitude(base).reshape(magnitude.shape).to(magnitude.dtype))
    model.requires_grad_(False)


def remove(models: Models, name: str) -> None:
    for model in models.values():
        for mod in model.modules():
            if isinstance(mod, LoraLayer) and name in mod.lora_A:
                mod.delete_adapter(name)
        getattr(model, "peft_config", {}).pop(name, None)


def mix(models: Models, weights: dict[str, dict[str, float]]) -> None:
    """Activate adapters at weights: `{adapter: {prefix: weight}}`. A weight of 0 leaves that adapter out of
    that component entirely, so all-zero weights give the base model exactly."""
    for prefix, model in models.items():
        active = {n: w[prefix] for n, w in weights.items() if w.get(prefix, 0.0) != 0.0}
        for mod in model.modules():
            if not isinstance(mod, LoraLayer):
                continue
            here = [n for n in active if n in mod.lora_A]
            mod.enable_adapters(bool(here))
            if here:
                mod.set_adapter(here)
                for n in here:
                    mod.set_scale(n, active[n])
        model.requires_grad_(False)  # set_adapter marks active adapters trainable; a preview trains nothing


def adapters_on(models: Models) -> dict[str, list[str]]:
    """Which adapters each component holds (what a test checks after loading)."""
    out = {}
    for prefix, model in models.items():
        names = sorted({n for mod in model.modules() if isinstance(mod, LoraLayer) for n in mod.lora_A})
        if names:
            out[prefix] = names
    return out

"""LoRA injection with peft: which modules are targeted, and what becomes trainable."""
from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model

from trainer.config import LoraConfig
# The families' own target layers (each Family's lora_targets), named here too for callers that ask the lora room.
from trainer.models.family import UNET_ATTENTION, UNET_EXTRA
from trainer.models.sd3 import MMDIT_ATTENTION, MMDIT_EXTRA  # noqa: F401

TE_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
TE_MLP = ["fc1", "fc2"]
ADAPTER = "default"


def unet_targets(cfg: LoraConfig, family=None, denoiser_config=None) -> list[str]:
    """The denoiser's target layers: its family's (an SD UNet's without one), for this denoiser's config."""
    attention, extras = (UNET_ATTENTION, UNET_EXTRA) if family is None else family.lora_targets(denoiser_config)
    unknown = [e for e in cfg.unet_extra if e not in extras]
    if unknown:
        raise ValueError(f"lora.unet_extra {unknown[0]!r} has no layers in this model's denoiser; allowed here: "
                         f"{', '.join(extras) or 'none'}")
    return attention + [t for extra in cfg.unet_extra for t in extras[extra]]


def text_encoder_targets(cfg: LoraConfig) -> list[str]:
    return TE_ATTENTION + (TE_MLP if cfg.text_encoder_mlp else [])


def peft_config(cfg: LoraConfig, targets: list[str]):
    """peft's config for lora.network: LoRA, or LyCORIS's LoHa/LoKr (peft's LoHaConfig/LoKrConfig, whose layers
    and parameter names are LyCORIS's; lycoris.py writes them as LyCORIS files)."""
    if cfg.network == "lora":
        return PeftLoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
            init_lora_weights="gaussian", use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
        )
    check_lycoris(cfg)
    if cfg.network == "loha":
        from peft import LoHaConfig

        return LoHaConfig(r=cfg.rank, alpha=cfg.alpha, rank_dropout=cfg.rank_dropout, module_dropout=cfg.dropout,
                          target_modules=targets, init_weights=True)
    from peft import LoKrConfig

    return LoKrConfig(r=cfg.rank, alpha=cfg.alpha, rank_dropout=cfg.rank_dropout, module_dropout=cfg.dropout,
                      target_modules=targets, init_weights=True, decompose_both=cfg.decompose_both,
                      decompose_factor=cfg.lokr_factor)


def check_lycoris(cfg: LoraConfig) -> None:
    """Settings LoHa/LoKr cannot honour, refused with why (ValueError, one line)."""
    what = "LoHa" if cfg.network == "loha" else "LoKr"
    if cfg.use_dora:
        raise ValueError(f"lora.use_dora with lora.network = {cfg.network}: no loader reads a DoRA {what} (ComfyUI's "
                         "and A1111's read dora_scale for LoRA only, and peft's LyCORIS layers have no DoRA); use "
                         "lora.network = lora with DoRA, or turn use_dora off")
    if cfg.use_rslora:
        raise ValueError(f"lora.use_rslora with lora.network = {cfg.network}: {what} scales by alpha/rank as every "
                         "loader applies it; turn use_rslora off")
    if cfg.lokr_factor == 0:
        raise ValueError("lora.lokr_factor = 0 splits nothing; use -1 (near the square root) or a factor >= 1")


def check_rank(model: torch.nn.Module, targets: list[str], rank: int, what: str) -> None:
    """A rank above a layer's smallest side adds parameters without adding capacity: refuse it."""
    for name, mod in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            w = getattr(mod, "weight", None)
            if w is not None and w.ndim >= 2 and rank > min(w.shape[0], w.shape[1]):
                raise ValueError(f"lora.rank {rank} is larger than {what} layer {name} ({w.shape[1]} -> {w.shape[0]}); "
                                 f"use a rank of at most {min(w.shape[0], w.shape[1])}")


def check_factor(model: torch.nn.Module, targets: list[str], factor: int, what: str) -> None:
    """peft splits a dimension by the factor when it divides it, else near its square root capped at the factor: a
    factor above every targeted dimension is the same file as -1 (it was accepted and ignored: lokr_factor=1e9)."""
    dims = [d for name, mod in model.named_modules() if any(name == t or name.endswith("." + t) for t in targets)
            for d in (getattr(mod, "weight", None).shape[:2] if getattr(mod, "weight", None) is not None else ())]
    if dims and factor > max(dims):
        raise ValueError(f"lora.lokr_factor {factor} is larger than every {what} layer's dimension (the largest is "
                         f"{max(dims)}): LoKr would split each near its square root, exactly as lora.lokr_factor = -1 "
                         "does; use -1, or a factor that divides the dimensions (4, 8, 16 ...)")


def inject(model: torch.nn.Module, cfg: LoraConfig, targets: list[str], what: str) -> None:
    """peft's own injection for every model. `model.add_adapter` would route the text encoders through
    transformers' optional peft integration, whose version gate broke every run once (transformers 5.24
    demanded a peft that did not exist); peft's API is the one both libraries build on."""
    if cfg.network != "lokr":  # a LoKr rank sizes the Kronecker factors' decomposition, not the update
        check_rank(model, targets, cfg.rank, what)
    elif cfg.lokr_factor > 0:
        check_factor(model, targets, cfg.lokr_factor, what)
    inject_adapter_in_model(peft_config(cfg, targets), model, adapter_name=ADAPTER)  # only LoRA stays trainable


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def expected_parameter_count(model: torch.nn.Module, rank: int) -> int:
    """Σ rank·(in+out) over LoRA-wrapped linear layers, and rank·(in·k·k + out) for conv layers."""
    total = 0
    for mod in model.modules():
        if hasattr(mod, "lora_A") and ADAPTER in getattr(mod, "lora_A", {}):
            base = mod.get_base_layer()
            if isinstance(base, torch.nn.Conv2d):
                kh, kw = base.kernel_size
                total += rank * (base.in_channels * kh * kw + base.out_channels)
            else:
                total += rank * (base.in_features + base.out_features)
    return total

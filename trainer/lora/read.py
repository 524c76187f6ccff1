"""Read any common LoRA file into one shape: kohya-style module names -> (down, up, alpha[, dora]).

Reads kohya/A1111 files (with or without `.alpha`, LoCon conv keys, SDXL in either UNet naming), diffusers/peft
files and LyCORIS LoHa/LoKr files (lycoris.py). Detects the base family from metadata, else from key names and
shapes. OFT, GLoRA and other kinds are refused by name instead of half-loaded.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from trainer.errors import LoraError  # noqa: F401  (raised here; callers import it from this module)
from trainer.lora.header import UNSUPPORTED


@dataclass
class Module:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    dora_scale: torch.Tensor | None = None
    path: str | None = None  # the dotted diffusers key (`transformer.<module path>`) a peft-layout file used
    # What a DoRA module's dora_scale is divided by: "merged" ||W + dW|| (peft, LyCORIS: dora_scale is the magnitude),
    # or "base" ||W|| (ComfyUI's formula; LoRA Studio's kohya files say so in metadata: formats.DORA_NORM_KEY).
    dora_norm: str = "merged"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    def delta(self) -> torch.Tensor:
        """ΔW = up · down · alpha/rank, shaped like the target layer's weight."""
        d, u = self.down.float(), self.up.float()
        w = (u.flatten(1) @ d.flatten(1)) * self.scale
        return w.reshape(u.shape[0], *d.shape[1:]) if d.ndim == 4 else w

    def _norms(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W + ΔW, per-row ||W||, per-row ||W + ΔW||) in float32."""
        w = weight.float()
        merged = w + self.delta().reshape(w.shape)
        rows = w.shape[0]
        return merged, w.reshape(rows, -1).norm(dim=1), merged.reshape(rows, -1).norm(dim=1)

    def fused(self, weight: torch.Tensor) -> torch.Tensor:
        """The layer's weight with this module applied at full strength: W + ΔW, or for DoRA the magnitude times
        the direction, as the file's convention says (see `dora_norm`)."""
        merged, base_norm, merged_norm = self._norms(weight)
        if self.dora_scale is None:
            return merged
        norm = base_norm if self.dora_norm == "base" else merged_norm
        return merged * (self.dora_scale.float().reshape(-1) / norm).reshape(-1, *[1] * (merged.dim() - 1))

    def magnitude(self, weight: torch.Tensor) -> torch.Tensor:
        """peft's DoRA magnitude vector m (its weight is m * (W + ΔW) / ||W + ΔW||) for base weight `weight`."""
        scale = self.dora_scale.float().reshape(-1)
        if self.dora_norm == "merged":
            return scale
        _, base_norm, merged_norm = self._norms(weight)
        return scale * merged_norm / base_norm


@dataclass
class LoraFile:
    path: Path
    family: str | None
    family_source: str  # "metadata", "keys" or "unknown"
    layout: str         # "kohya" or "peft"
    modules: dict[str, Module]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def network(self) -> str:
        """'lora', 'loha' or 'lokr' (a file holds one kind)."""
        return next((m.algo for m in self.modules.values() if hasattr(m, "algo")), "lora")

    @property
    def kind(self) -> str:
        kinds = [{"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}[self.network]]
        if any(m.is_conv for m in self.modules.values()):
            kinds.append("LoCon")
        if any(m.dora_scale is not None for m in self.modules.values()):
            kinds.append("DoRA")
        return "+".join(kinds)

    def ranks(self) -> Counter:
        return Counter(m.rank for m in self.modules.values())

    def defects(self) -> list[str]:
        """What makes this file unusable: values that are not numbers, or up/down shapes that do not fit."""
        found = []
        lycoris = {n for n, m in self.modules.items() if hasattr(m, "algo")}
        bad = sorted(n for n in lycoris if not all(torch.isfinite(t).all() for t in self.modules[n].factors.values()))
        if lycoris:
            return [f"{len(bad)} module(s) with NaN or infinite values, e.g. {bad[0]} (training diverged, or the "
                    "file was damaged)"] if bad else []
        mismatched = [n for n, m in sorted(self.modules.items()) if m.up.flatten(1).shape[1] != m.down.shape[0]]
        if mismatched:
            m = self.modules[mismatched[0]]
            found.append(f"{len(mismatched)} module(s) with lora_up and lora_down ranks that do not match, e.g. "
                         f"{mismatched[0]} (up {tuple(m.up.shape)}, down {tuple(m.down.shape)})")
        bad = [n for n, m in sorted(self.modules.items())
               if not (torch.isfinite(m.down).all() and torch.isfinite(m.up).all() and math.isfinite(m.alpha))]
        if bad:
            found.append(f"{len(bad)} module(s) with NaN or infinite values, e.g. {bad[0]} (training diverged, or "
                         "the file was damaged)")
        return found

    def warnings(self) -> list[str]:
        """What makes this file suspicious but still loadable."""
        def nothing(m) -> bool:
            return not m.delta().any() if hasattr(m, "algo") else not m.up.any()

        if self.modules and all(nothing(m) for m in self.modules.values()):
            return ["every lora_up weight is zero, so this LoRA changes nothing (exported before any step "
                    "trained it, e.g. while the warmup learning rate was 0)"]
        return []

    def require_usable(self, action: str) -> None:
        defects = self.defects()
        if defects:
            raise LoraError(f"cannot {action} {self.path.name}: {defects[0]}; use another file or export it again")


def read_lora(path: str | Path) -> LoraFile:
    path = Path(path)
    if not path.exists():
        raise LoraError(f"{path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise LoraError(f"{path.name}: LoRAs are read from .safetensors only (pickle files can run code)")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise LoraError(f"{path.name} is not a readable .safetensors file (truncated or corrupt: {e}); "
                        "download or export it again") from None
    if not tensors:
        raise LoraError(f"{path.name} holds no tensors")
    from trainer.lora import lycoris

    for marker, kind in UNSUPPORTED.items():
        if any(marker in k for k in tensors):
            raise LoraError(f"{path.name} is a {kind} file; LoRA Studio reads LoRA, LoCon, DoRA, LoHa and LoKr only")
    if lycoris.is_lycoris(tensors):
        modules, layout = lycoris.read_modules(tensors), "kohya"
    elif any(k.endswith(".lora_down.weight") for k in tensors):
        modules, layout = _kohya_modules(tensors, metadata.get("lora_studio.dora_norm") == "base"), "kohya"
        from trainer.lora import flux_kohya

        if flux_kohya.is_kohya_flux(modules):  # BFL's fused names: read as the diffusers layers they apply to
            modules = flux_kohya.split(modules)
    elif any(".lora_A." in k or ".lora.down." in k for k in tensors):
        modules, layout = _peft_modules(tensors, metadata), "peft"
    else:
        raise LoraError(f"{path.name} has no LoRA weights (no lora_down/lora_up or lora_A/lora_B keys); "
                        "is it a base model or an embedding?")
    family, source = detect_family(modules, metadata)
    return LoraFile(path, family, source, layout, modules, metadata)


def one_number(alpha: torch.Tensor, name: str) -> float:
    """A module's alpha: one number, or the file is refused with the module named."""
    if alpha.numel() != 1:
        raise LoraError(f"{name}.alpha holds {alpha.numel()} values ({tuple(alpha.shape)}), not one number: the file is "
                        "damaged or not a LoRA; export it again")
    return float(alpha)


def _kohya_modules(t: dict, dora_base_norm: bool = False) -> dict[str, Module]:
    out = {}
    for key in t:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            up = t.get(f"{name}.lora_up.weight")
            if up is None:
                raise LoraError(f"{name} has lora_down but no lora_up: the file is incomplete")
            down = t[key]
            alpha = t.get(f"{name}.alpha")
            dora = t.get(f"{name}.dora_scale")
            if dora is not None and dora.shape[0] != up.shape[0]:
                raise LoraError(f"{name}: its DoRA magnitudes are per input channel (LyCORIS wd_on_out=false), which "
                                "no peft layer can hold; LoRA Studio reads per-output DoRA only")
            out[name] = Module(down, up, one_number(alpha, name) if alpha is not None else float(down.shape[0]), dora,
                               dora_norm="base" if dora is not None and dora_base_norm else "merged")
    return out


PEFT_PREFIXES = {"unet.": "lora_unet", "transformer.": "lora_transformer", "text_encoder.": "lora_te",
                 "text_encoder_2.": "lora_te2"}


def _peft_modules(t: dict, metadata: dict) -> dict[str, Module]:
    two_encoders = any(k.startswith("text_encoder_2.") for k in t)
    alphas = _peft_alphas(metadata)
    out = {}
    for key in t:
        m = re.match(r"(.+?)\.(lora_A|lora\.down)(\.[^.]+)?\.weight$", key)
        if not m:
            continue
        path, kind = m.group(1), m.group(2)
        up_key = key.replace(".lora_A", ".lora_B") if kind == "lora_A" else key.replace(".lora.down.", ".lora.up.")
        prefix = next((p for p in PEFT_PREFIXES if path.startswith(p)), "unet.")
        module_path = path[len(prefix):] if path.startswith(prefix) else path
        module_path = module_path.replace(".processor.", ".").replace("_lora", "")
        kohya_prefix = PEFT_PREFIXES[prefix]
        if kohya_prefix == "lora_te" and two_encoders:
            kohya_prefix = "lora_te1"
        if kohya_prefix.startswith("lora_te") and not module_path.startswith("text_model."):
            module_path = "text_model." + module_path
        down = t[key]
        cfg = alphas.get(prefix.rstrip("."), {})
        alpha, rank = cfg.get("lora_alpha"), cfg.get("r")
        scale = 1.0  # diffusers' own default without metadata
        if alpha and rank:
            scale = float(alpha) / (math.sqrt(float(rank)) if cfg.get("use_rslora") else float(rank))
        name = f"{kohya_prefix}_{module_path.replace('.', '_')}"
        magnitude = t.get(key.replace(".lora_A.weight", ".lora_magnitude_vector"))
        out[name] = Module(down, t[up_key], scale * down.shape[0],
                           None if magnitude is None else magnitude.reshape(-1, 1), prefix + module_path)
    return out


def _peft_alphas(metadata: dict) -> dict:
    """diffusers stores each component's peft LoraConfig as JSON under `lora_adapter_metadata`."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, dict] = {}
    for key, value in data.items():  # flat: {"unet.r": 4, "unet.lora_alpha": 2, "text_encoder.r": ...}
        component, _, field_name = key.partition(".")
        out.setdefault(component, {})[field_name] = value
    return out


def detect_family(modules: dict[str, Module], metadata: dict) -> tuple[str | None, str]:
    version = (metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")).lower()
    if "flux" in version:
        return "flux", "metadata"
    if "z-image" in version or "zimage" in version:
        return "zimage", "metadata"
    if "sd3" in version or "diffusion-3" in version:
        return "sd3", "metadata"
    if "xl" in version:
        return "sdxl", "metadata"
    if "v2" in version or "sd_2" in version:
        return "sd2", "metadata"
    if "v1" in version or "sd_1" in version:
        return "sd1", "metadata"
    names = list(modules)
    if any(n.startswith(("lora_transformer_single_transformer_blocks_", "lora_unet_double_blocks_",
                         "lora_unet_single_blocks_")) for n in names):
        return "flux", "keys"
    if any(n.startswith(("lora_transformer_layers_", "lora_transformer_noise_refiner_",
                         "lora_transformer_context_refiner_")) for n in names):
        return "zimage", "keys"
    if any(n.startswith("lora_transformer_transformer_blocks_") for n in names):
        return "sd3", "keys"
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names) or \
            any(re.match(r"lora_unet_(input_blocks|output_blocks|middle_block)_", n) for n in names):
        return "sdxl", "keys"
    cross = [m.down.shape[1] for n, m in modules.items() if n.endswith("attn2_to_k") and m.down.ndim == 2]
    if cross:
        if cross[0] == 2048:
            return "sdxl", "keys"
        if cross[0] == 1024:
            return "sd2", "keys"
        if cross[0] == 768:
            return "sd1", "keys"
    te = [m.down.shape[1] for n, m in modules.items() if n.startswith("lora_te_") and n.endswith("q_proj")]
    if te:
        return ("sd2" if te[0] == 1024 else "sd1"), "keys"
    return None, "unknown"


FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD 3", "flux": "Flux.1", "zimage": "Z-Image"}


def check_family(lora: LoraFile, base_family: str) -> None:
    if lora.family and lora.family != base_family:
        raise LoraError(f"{lora.path.name} is a {FAMILY_NAMES[lora.family]} LoRA but the base model is "
                        f"{FAMILY_NAMES.get(base_family, base_family)}; pick a {FAMILY_NAMES[lora.family]} base "
                        "or a LoRA made for this one")


def require_fit(lora_name: str, name: str, m, weight: torch.Tensor) -> None:
    """A module must make an update of its layer's shape, or it is refused with the file, the module and both shapes
    (torch's reshape error named neither)."""
    if hasattr(m, "algo"):  # LoHa/LoKr: ΔW's size, computed on shapes alone
        from trainer.lora.lycoris import LycorisModule

        shape = LycorisModule(m.algo, {k: torch.empty(v.shape, device="meta") for k, v in m.factors.items()}).delta().shape
        ok = int(torch.Size(shape).numel()) == weight.numel()
    else:
        shape = (m.up.shape[0], *m.down.shape[1:])
        ok = m.up.shape[0] == weight.shape[0] and m.down[0].numel() == weight[0].numel()
    if not ok:
        raise LoraError(f"{lora_name}: module {name} makes an update of shape {tuple(shape)}, which does not fit its "
                        f"layer's weight {tuple(weight.shape)}; is the file made for another model?")


def module_index(models: dict[str, torch.nn.Module], unet_namer=None) -> dict[str, torch.nn.Module]:
    """Every Linear/Conv2d a LoRA may target, under each name a LoRA file may use for it."""
    from trainer.lora.write import kohya_name

    index = {}
    for prefix, model in models.items():
        for path, mod in model.named_modules():
            path = path.replace(".base_layer", "")  # a layer peft already wraps keeps its own name
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                index[kohya_name(prefix, path)] = mod
                if unet_namer is not None and prefix == "lora_unet":
                    index[kohya_name(prefix, path, unet_namer)] = mod
    if "lora_te1" in models:  # some SDXL files call the first encoder lora_te_
        for name in list(index):
            if name.startswith("lora_te1_"):
                index["lora_te_" + name[len("lora_te1_"):]] = index[name]
    return index

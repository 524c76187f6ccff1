"""Rough peak-VRAM and run-time estimate for a config, before anything is loaded (torch-free).

Peak memory = frozen weights on the device + LoRA weights, gradients and optimizer state
+ activations of one micro-batch. Activation figures scale with latent pixels and batch, and drop
to about a fifth with gradient checkpointing. The constants are per family; `lora-studio bench
speed` measures the real figures they should match.
"""
from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from trainer.models.info import (EMBEDDED_DIR, FP32_VAE_UNDER_FP16, NATIVE_RESOLUTION, auto_resolution, peek_family,
                                 peek_resolution, text_encoder_trained_by_default)
from trainer.memory.speed_log import duration

GB = 1024 ** 3
# Flux.1 dev and Z-Image at 1024 px, one image, bf16, no checkpointing, on a CPU, and the share checkpointing keeps:
# `lora-studio bench modern` measured one block of each kind at full width and scaled by the published block counts
# (bench/results.md, "Modern families"). Z-Image's attention takes a mask, which CPU attention serves by materialising
# the scores (~1 GB a layer at 1024 px); CUDA's kernels do not, so its GPU figure is on the high side.
# Flux's figures are with LoRA on its default targets since issue 37 (the single blocks' MLP in and out too: 24.98 GB
# and a 0.066 share with attention alone; proj_out's LoRA keeps its 15,360-wide input).
MODERN_ACTIVATION_GB = {"flux": 31.2, "zimage": 35.02}
MODERN_CHECKPOINTED = {"flux": 0.049, "zimage": 0.03}
FAMILY_WORDS = {"flux": "Flux.1", "zimage": "Z-Image"}
# SD 3.5 Medium at 1024 px, one image, bf16, no checkpointing, on a CPU. Fitted on `bench speed`'s SD3 row without
# T5-XXL, whose peak is the training step (checkpointing on: 9.74 GB; 8.93 GB in a second run: the CPU allocator's
# share varies by ~0.8 GB), so this is a calibration. With T5 the caption phase is the peak (see _loading_gb).
SD3_ACTIVATION_GB = 10.5
# Parameters (millions) of the published architectures.
PARAMS_M = {
    "sd1": {"unet": 859.5, "text_encoders": 123.1, "largest_te": 123.1, "vae": 83.7},
    "sd2": {"unet": 865.9, "text_encoders": 340.4, "largest_te": 340.4, "vae": 83.7},
    "sdxl": {"unet": 2567.5, "text_encoders": 817.8, "largest_te": 694.7, "vae": 83.7},
    # SD 3.5 Medium: the MMDiT ("unet" here), CLIP-L + CLIP-G, and T5-XXL's encoder apart, as model.t5 may drop it.
    # (SD 3.5 Large's transformer is 8056.6 M.)
    "sd3": {"unet": 2243.2, "text_encoders": 818.3, "largest_te": 694.7, "t5": 4762.3, "vae": 83.7},
    # Counted on the architectures (diffusers' configs on the meta device): Flux.1 dev's transformer, CLIP-L and
    # T5-XXL (always loaded for Flux), the 16-channel VAE; Z-Image's transformer and its Qwen3-4B encoder.
    "flux": {"unet": 11901.4, "text_encoders": 123.1, "largest_te": 123.1, "t5": 4762.3, "vae": 83.8},
    "zimage": {"unet": 6154.9, "text_encoders": 4022.5, "largest_te": 4022.5, "vae": 83.8},
}
# LoRA parameters per unit of rank with attention targets (sum of in+out over q, k, v, out).
LORA_PER_RANK_M = {"sd1": (0.199, 0.074), "sd2": (0.215, 0.197), "sdxl": (1.45, 0.40),  # (unet, text encoders)
                   "sd3": (0.746, 0.401),  # SD 3.5 Medium: joint and attn2 attention; CLIP-L and CLIP-G
                   "flux": (2.918, 0.074),  # double blocks' joint attention, single blocks' attention and MLP in
                   # and out (1.634 + 38 x 33,792: the default targets since issue 37); CLIP-L
                   "zimage": (1.044, 0.0)}  # main and refiner layers' attention; the encoder is never trained
# Calibrated against `lora-studio bench speed` (bench/results.md): peak RSS of the real training process
# on full-size SD1.5 (512 px, 8 settings) and SDXL (1024 px) architectures, bf16 on a CPU. The same
# tensors are alive on a GPU, so the device estimate reuses them without the host-only terms.
# Activation GB of one image at the family's native resolution, half precision, SDPA, no checkpointing.
ACTIVATION_GB = {"sd1": 1.41, "sd2": 3.5, "sdxl": 6.9,  # sd2 is scaled from sd1 by pixels, not measured
                 "sd3": SD3_ACTIVATION_GB, **MODERN_ACTIVATION_GB}
NATIVE = NATIVE_RESOLUTION
CHECKPOINTED = 0.42  # share of those activations still alive at the peak with gradient checkpointing (a UNet's)
# A transformer checkpointed block by block keeps each block's input and one block's recomputation: a far smaller
# share than a UNet, whose checkpointing leaves its ResNets' activations (see MODERN_ACTIVATION_GB for the source).
# On CUDA (max allocated, fp16, SDPA kernels, frozen convolutions keeping no inputs) a training step
# keeps less than the CPU's RSS shows. Fitted on an H100 with the latent cache already filled
# (bench/results-cuda-h100.md): SD1.5 512 px 2.69 GB without checkpointing and 2.03 GB with it,
# SDXL 1024 px 6.81 GB with it. sd2 is scaled from sd1 as on the CPU, not measured.
CUDA_ACTIVATION_GB = {"sd1": 1.04, "sd2": 2.58, "sdxl": 4.58,
                      "sd3": 4.27,  # sd3: the first CPU fit (6.43) at SDXL's CUDA/CPU ratio, not measured
                      # flux, zimage: their CPU figures at SDXL's CUDA/CPU ratio, not measured on a GPU
                      **{k: round(v * 4.58 / 6.9, 2) for k, v in MODERN_ACTIVATION_GB.items()}}
CUDA_CHECKPOINTED = 0.367
# Encoding one image into the latent cache, half precision at 512 px (scales with pixels and VAE bytes).
# Fitted on the same H100's first runs, when the UNet and text encoders still sat beside the VAE:
# SD1.5 512 px 2.44 GB, SDXL 1024 px 9.86 GB (fp32 VAE). The loop now encodes with the VAE alone.
CUDA_VAE_ENCODE_GB = 0.38
# Frozen weights stored below the run's precision (train.frozen_dtype; memory/codecs.py): bytes per stored weight,
# scales included (fp8 and int8 one per output row; nf4 an fp32 absmax per block of 64).
STORED_BYTES = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5625}
# Share of the denoiser frozen.KEEP_HALF (fp8) or frozen.KEEP_QUANTIZED (int8, nf4) leaves in the run's precision:
# embeddings, norms, the first and last layers; for fp8 also the adaptive-norm modulation Linears (SD3's norm1.linear
# is ~1/3 of SD 3.5 Medium's 2.24 B, Flux's norm1/norm1_context/norm.linear 28% of its 11.9 B), which int8 and nf4
# quantize as diffusers' bitsandbytes loading does. Counted on the full-size architectures by bench qlora; its
# blocks measured 1.001 B a weight for int8 and 0.563 for nf4 (Flux.1, Z-Image).
KEPT_SHARE = {"fp8": {"sd1": 0.0329, "sd2": 0.0329, "sdxl": 0.0103, "sd3": 0.3489, "flux": 0.2768, "zimage": 0.0019},
              "quantized": {"sd1": 0.0329, "sd2": 0.0329, "sdxl": 0.0103, "sd3": 0.0092, "flux": 0.0056,
                            "zimage": 0.0019}}  # bench qlora's kept_share (sd2: sd1's)
TE_KEPT_SHARE = 0.03  # a text encoder's token embedding (T5-XXL's 131 M of 4.76 B) stays in the run's precision
# fp8 stand-ins also replace frozen Linear layers, and a step keeps less still. Share of the UNet
# activations left, fitted on the H100 (checkpointing on): SD1.5 512 px 2.03 -> 1.16 GB, SDXL 1024 px
# 6.81 -> 3.75 GB in all. sd2 takes sd1's share, not measured.
FP8_ACTIVATION_SHARE = {"sd1": 0.75, "sd2": 0.75, "sdxl": 0.56, "sd3": 0.56,  # sd3 takes sdxl's, not measured
                        "flux": 0.56, "zimage": 0.56}  # so do flux and zimage
# On a CPU fp8 keeps less of the activations too, and the run holds a fixed extra (the dequantized weights of the
# layer at hand, the allocator's share): both fitted on the two fp8 rows of bench/results.md (SD1.5 512 px 2.37 GB,
# SDXL 1024 px 5.81 GB), so there they are a calibration.
HOST_FP8_ACTIVATION_SHARE = 0.65
HOST_FP8_EXTRA_GB = 0.56
# train.offload on a GPU: the UNet's frozen weights stay in host RAM and one layer at a time visits (the largest,
# SDXL's 2560x1280x3x3 convolution, is 59 MB in half precision and 29 MB in fp8 beside it); norms stay (0.02% of
# the parameters). Counted from the architectures, not measured on a GPU.
STREAMED_ON_DEVICE_GB = 0.1
TE_ACTIVATION_GB = {"sd1": 0.05, "sd2": 0.1, "sdxl": 0.3, "sd3": 0.3,  # one 77-token caption through trained
                    "flux": 0.05, "zimage": 0.0}  # encoders (flux: its CLIP-L, as SD1's)
VAE_ENCODE_GB = 0.15  # what encoding a 512 px image on the fly adds to the peak, half precision
RUNTIME_GB = 0.4  # python, torch, diffusers, transformers and peft loaded (host estimate only)
# Seconds per step at batch 1, native resolution, fp16 on a mid-range consumer GPU (RTX 3060 class).
STEP_S = {"sd1": 0.45, "sd2": 0.9, "sdxl": 1.6, "sd3": 1.6,  # sd3: SDXL's, not measured
          "flux": 6.4, "zimage": 3.3}  # flux, zimage: SDXL's scaled by parameters, not measured
# A CPU step against that GPU's: SD1.5 at 512 px in bf16 took 6.70 s a step on this 2-core CPU (bench/results.md) against
# 0.45 s. Only the rule of thumb uses it; steps measured here replace it.
CPU_STEP_FACTOR = 15.0
TINY_STEP_S_PER_IMAGE = 0.045  # the embedded model on a 2-core CPU, measured with bench learn


@dataclass
class Estimate:
    peak_gb: float
    weights_gb: float
    lora_gb: float
    activations_gb: float
    steps: int
    seconds: float
    unmeasured: list[str] = field(default_factory=list)  # what the figures rest on that nobody measured

    def text(self, measured_time: str | None = None) -> str:
        """With `measured_time` (speed_log.time_range: steps timed on this machine) the time is that range."""
        memory = (f"~{self.peak_gb:.1f} GB peak (weights {self.weights_gb:.1f}, LoRA+optimizer {self.lora_gb:.2f}, "
                  f"activations {self.activations_gb:.1f})")
        notes = f" Not measured: {'; '.join(self.unmeasured)}." if self.unmeasured else ""
        if measured_time:
            return f"{memory}; {self.steps} steps: {measured_time}.{notes}"
        return (f"{memory}; {self.steps} steps: not measured on this machine yet (a rule of thumb says "
                f"~{duration(self.seconds)}; Measure speed times a few steps here).{notes}")


def safetensors_params(folder: Path) -> int:
    """Parameter count from safetensors headers only: no weights are read."""
    total = 0
    for f in folder.rglob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                count = 1
                for d in v["shape"]:
                    count *= d
                total += count
    return total


def params_m(cfg, family: str) -> dict:
    """unet / text_encoders / vae in millions for this run: counted from a local diffusers folder's headers (a
    pruned, distilled or tiny model is its own size), else the family's published sizes (a single file or a Hub id);
    SD3's T5 counts only when model.t5 loads it."""
    folder = Path(cfg.model.source).expanduser() if cfg.model.source not in ("", "tiny") else None
    counted = folder_params_m(str(folder.resolve())) if folder is not None and \
        (folder / "model_index.json").is_file() else None
    p = counted or PARAMS_M[family]
    t5 = p.get("t5", 0.0) if cfg.model.t5 else 0.0
    return {"unet": p["unet"], "vae": p["vae"], "text_encoders": p["text_encoders"] + t5,
            "largest_te": max(p["largest_te"], t5)}


@functools.lru_cache(maxsize=16)
def folder_params_m(folder: str) -> dict | None:
    """A diffusers folder's parameter counts (millions) by role, from its safetensors headers (no weights read);
    SD3's third encoder is its T5, as PARAMS_M holds it. None when a part is missing or not in safetensors."""
    root = Path(folder)
    counts = {}
    for part in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if (root / part).is_dir():
            n = safetensors_params(root / part)
            if not n:
                return None
            counts[part] = n / 1e6
    denoiser = counts.get("transformer", counts.get("unet"))
    if denoiser is None or "vae" not in counts:
        return None
    sd3 = "text_encoder_3" in counts
    tes = [counts[t] for t in ("text_encoder", "text_encoder_2") if t in counts]
    out = {"unet": denoiser, "vae": counts["vae"], "text_encoders": sum(tes), "largest_te": max(tes, default=0.0)}
    if sd3:
        out["t5"] = counts["text_encoder_3"]
    return out


# The published denoisers' width (a UNet's first-level channels, a transformer's hidden size) and depth (a UNet's
# ResNet layers over its levels; a transformer's blocks, a two-stream block counting twice), and their VAEs' 8 pixels
# per latent cell. A local folder's activations and LoRA size scale by its own width x depth against these, and its
# tokens by its own VAE: the full-size figures applied to any Flux-shaped folder put a tiny one at 50.6 GB (issue 37).
PUBLISHED_SHAPE = {"sd1": (320, 8), "sd2": (320, 8), "sdxl": (320, 6), "sd3": (1536, 24), "flux": (3072, 76),
                   "zimage": (3840, 34)}
PUBLISHED_CELL = 8


def denoiser_shape(family: str, config: dict) -> tuple[float, float] | None:
    """(width, depth) of a denoiser from its config, comparable with PUBLISHED_SHAPE; None when it does not say."""
    try:
        if family in ("sd1", "sd2", "sdxl"):
            blocks = config["block_out_channels"]
            per_level = config.get("layers_per_block", 2)
            layers = sum(per_level) if isinstance(per_level, list) else per_level * len(blocks)
            return float(blocks[0]), float(layers)
        if family == "sd3":
            return float(config["num_attention_heads"] * config["attention_head_dim"]), float(config["num_layers"])
        if family == "flux":
            return (float(config["num_attention_heads"] * config["attention_head_dim"]),
                    float(2 * config["num_layers"] + config["num_single_layers"]))
        if family == "zimage":
            return float(config["dim"]), float(config["n_layers"] + 2 * config.get("n_refiner_layers", 2))
    except (KeyError, TypeError, IndexError):
        return None
    return None


PUBLISHED_VAE_WIDTH = 128  # every published VAE's first level (SD, SDXL, SD3, Flux.1, Z-Image)


@functools.lru_cache(maxsize=16)
def _folder_scales(folder: str, family: str) -> tuple[float, float, float]:
    from trainer.models.info import denoiser_config

    root = Path(folder)
    try:
        blocks = json.loads((root / "vae" / "config.json").read_text(encoding="utf-8"))["block_out_channels"]
        cell, vae = 2 ** (len(blocks) - 1), min(1.0, blocks[0] / PUBLISHED_VAE_WIDTH)
    except (OSError, ValueError, KeyError, TypeError, IndexError, ZeroDivisionError):
        cell, vae = PUBLISHED_CELL, 1.0
    shape = denoiser_shape(family, denoiser_config(root) or {})
    if shape is None or family not in PUBLISHED_SHAPE:
        return 1.0, 1.0, vae
    size = shape[0] / PUBLISHED_SHAPE[family][0] * shape[1] / PUBLISHED_SHAPE[family][1]
    return size * (PUBLISHED_CELL / cell) ** 2, size, vae


def shape_scales(cfg, family: str) -> tuple[float, float, float]:
    """(activations, LoRA size, VAE activations) of this run's model against the published one of its family: 1 for
    a single file or a Hub id (the published shapes), a local folder's own width x depth (and, for activations, its
    tokens; for the VAE, its width)."""
    source = cfg.model.source
    if source in ("", "tiny") or not Path(source).expanduser().is_dir():
        return 1.0, 1.0, 1.0
    return _folder_scales(str(Path(source).expanduser().resolve()), family)


@functools.cache
def embedded_params() -> int:
    """The embedded model's parameter count: package data, read once (settings and plans ask on every change)."""
    return safetensors_params(EMBEDDED_DIR) if EMBEDDED_DIR.exists() else 5_000_000


def estimate(cfg, n_samples: int | None = None, host: bool = False) -> Estimate:
    """Peak GPU memory of a run; with `host`, the peak RSS of a training process that runs on the CPU
    (what `bench speed` measures here): nothing can be offloaded there, and the runtime counts."""
    family = peek_family(cfg.model.source, cfg.model.family) or "sd1"
    half = cfg.train.mixed_precision in ("fp16", "bf16")
    wbytes = 2 if half else 4
    steps = cfg.train.max_steps or max(1, (n_samples or 1) * cfg.data.repeats * cfg.train.epochs //
                                       max(1, cfg.train.batch_size * cfg.train.gradient_accumulation))
    if family == "tiny":
        params = embedded_params()
        weights = params * te_bytes(stored_as(cfg), wbytes) / GB
        lora = cfg.lora.rank * 20_000 * 16 / GB
        res = cfg.data.resolution or NATIVE["tiny"]
        act = 0.02 * cfg.train.batch_size * (res / NATIVE["tiny"]) ** 2
        secs = steps * TINY_STEP_S_PER_IMAGE * cfg.train.batch_size * (res / NATIVE["tiny"]) ** 2
        return Estimate(round(weights + lora + act + (RUNTIME_GB if host else 0), 2), weights, lora, act, steps, secs)
    p = params_m(cfg, family)
    train_te = cfg.lora.train_text_encoder if cfg.lora.train_text_encoder is not None else \
        text_encoder_trained_by_default(family)
    cached_text = cfg.data.caches_text(bool(train_te))
    # Cached captions: the encoders leave the GPU, and then memory altogether (training/residency.py let_encoders_go); they count
    # in the caption phase and, on the host, while the base loads.
    te_on_device = 0.0 if cached_text else p["text_encoders"]
    store = stored_as(cfg)
    stand_ins = store is not None  # any stored form: the stand-ins keep no inputs, hold one dequantized layer at a time
    frozen_bytes = te_bytes(store, wbytes)
    unet_bytes = denoiser_bytes(family, wbytes, store)
    vae_bytes = 4 if (family in FP32_VAE_UNDER_FP16 and cfg.train.mixed_precision == "fp16") or not half else 2
    vae_on_device = host or not cfg.data.cache_latents
    vae_gb = (p["vae"] * vae_bytes if vae_on_device else 0) * 1e6 / GB
    unet_gb = STREAMED_ON_DEVICE_GB if cfg.train.offload and not host else p["unet"] * unet_bytes * 1e6 / GB
    weights = unet_gb + te_on_device * frozen_bytes * 1e6 / GB + vae_gb
    # On the host the base is loaded in half precision before its layers turn to fp8/int8/nf4: that can be the peak.
    load_peak = _loading_gb(cfg, family, p, wbytes, store) + vae_gb if host else 0.0
    act_scale, lora_scale, vae_scale = shape_scales(cfg, family)
    per_rank = LORA_PER_RANK_M[family][0] * lora_scale * cfg.lora.train_unet + \
        LORA_PER_RANK_M[family][1] * bool(train_te)
    state = 2 if cfg.optim.optimizer == "adamw8bit" else 8
    lora = per_rank * cfg.lora.rank * 1e6 * (4 + 4 + state) / GB  # fp32 weights + grads + optimizer state
    # 'auto' resolution: what the trainer will pick (a local folder's own size, else the family's; on a CPU 512 px for
    # a big family)
    folder = cfg.model.source not in ("", "tiny") and Path(cfg.model.source).expanduser().is_dir()
    res = cfg.data.resolution or (folder and peek_resolution(cfg.model.source, cfg.model.family, on_cpu=host)) or \
        auto_resolution(NATIVE[family], host)
    pixels = (res / NATIVE[family]) ** 2 * cfg.train.batch_size * act_scale
    act_gb, kept = (ACTIVATION_GB, CHECKPOINTED) if host else (CUDA_ACTIVATION_GB, CUDA_CHECKPOINTED)
    fp8_share = (HOST_FP8_ACTIVATION_SHARE if host else FP8_ACTIVATION_SHARE[family]) if stand_ins else 1.0
    kept = MODERN_CHECKPOINTED.get(family, kept)
    unet_act = act_gb[family] * pixels * (1 if half else 2) * (kept if cfg.train.gradient_checkpointing else 1.0) * \
        fp8_share + (HOST_FP8_EXTRA_GB if stand_ins and host else 0.0)
    te_act = TE_ACTIVATION_GB[family] * cfg.train.batch_size * (1 if half else 2) if train_te else 0.0
    # Encoding latents on the fly frees its buffers before the UNet runs, but the allocator keeps part
    # of them: measured, it adds to the peak rather than overlapping.
    vae_act = VAE_ENCODE_GB * vae_scale * (res / 512) ** 2 * cfg.train.batch_size * (vae_bytes / 2) \
        if not cfg.data.cache_latents else 0.0
    act = unet_act + te_act + vae_act
    # a step's work: the denoiser's parameters x its tokens (a local folder's own, against the published model's)
    work = p["unet"] / PARAMS_M[family]["unet"] * (act_scale / lora_scale if lora_scale else 1.0)
    secs = steps * STEP_S[family] * pixels / act_scale * work * (1.3 if cfg.train.gradient_checkpointing else 1.0) * \
        (1 if half else 2.5) * (CPU_STEP_FACTOR if host else 1.0)
    encode_gb = p["vae"] * vae_bytes * 1e6 / GB + CUDA_VAE_ENCODE_GB * vae_scale * (res / 512) ** 2 * vae_bytes / 2
    # Cache-ahead (data.cache_ahead) encodes while training: the VAE and one encode sit beside the training step.
    ahead = not host and cfg.data.cache_latents and cfg.data.cache_ahead and not (cfg.data.random_crop or cfg.data.flip)
    phases = [weights + lora + act + (encode_gb if ahead else 0.0), load_peak]
    if not host:  # the models visit the GPU one phase at a time (see loop.train); the largest phase is the peak
        if cfg.data.cache_latents and not ahead:  # a first run encodes every image with the VAE alone on the device
            phases.append(encode_gb)
        if cached_text:  # the encoders visit the GPU one at a time to fill the caption cache
            phases.append(p["largest_te"] * frozen_bytes * 1e6 / GB + TE_ACTIVATION_GB[family])
    peak = max(phases) + (RUNTIME_GB if host else 0.0)
    return Estimate(round(peak, 2), weights, lora, act, steps, secs, _unmeasured(cfg, family, host, store))


def stored_as(cfg) -> str | None:
    """The frozen weights' stored form, or None for the run's precision (fp8 only computes in half precision)."""
    kind = cfg.train.frozen_dtype
    if kind == "fp8":
        return kind if cfg.train.mixed_precision in ("fp16", "bf16") else None
    return kind if kind in STORED_BYTES else None


def denoiser_bytes(family: str, wbytes: int, store: str | None) -> float:
    """Bytes per denoiser weight: the stored form's, with the layers it leaves in the run's precision."""
    if store is None:
        return wbytes
    share = KEPT_SHARE["fp8" if store == "fp8" else "quantized"].get(family, 0.0)
    return share * wbytes + (1 - share) * STORED_BYTES[store]


def te_bytes(store: str | None, wbytes: int) -> float:
    if store is None:
        return wbytes
    return TE_KEPT_SHARE * wbytes + (1 - TE_KEPT_SHARE) * STORED_BYTES[store]


def _unmeasured(cfg, family: str, host: bool, store: str | None) -> list[str]:
    """The figures an estimate of this run takes from somewhere else, said beside it."""
    notes = []
    if family == "sd2":
        notes.append("SD2's memory (SD1.5's scaled by pixels)")
    if family == "sd3" and not host:
        notes.append("SD3 on a GPU (the CPU fit at SDXL's GPU/CPU ratio)")
    if family in ("flux", "zimage") and not host:
        notes.append(f"{FAMILY_WORDS[family]} on a GPU (its CPU figure at SDXL's GPU/CPU ratio)")
    if store and not host and family in ("sd2", "sd3", "flux", "zimage"):
        notes.append(f"{store}'s activation saving for {family} (taken from {'SD1.5' if family == 'sd2' else 'SDXL'})")
    if store in ("int8", "nf4") and not host:
        notes.append(f"{store} on a GPU (its weights are counted; its activations and speed are fp8's)")
    if cfg.train.offload and not host:
        notes.append("train.offload (counted from the architecture; its speed cost is a guess of 2x)")
    if family in ("sd2", "sd3", "flux", "zimage"):
        notes.append(f"the rule-of-thumb step time for {family} (SD{'1.5' if family == 'sd2' else 'XL'}'s, scaled)")
    return notes


def _loading_gb(cfg, family: str, p: dict, wbytes: int, store: str | None) -> float:
    """Weights resident while the base loads and the captions are encoded. A diffusers folder stored in the run's
    precision (as SDXL and SD 3.5 are published) is mapped from its files, and a model's pages arrive when it is
    first used: the encoders' while they encode, the denoiser's when training starts, so the two do not add up
    (SD 3.5 Medium with T5-XXL: 10.81 GB measured, not the 15.6 GB of all its weights). With fp8 the UNet turns to
    fp8 before the encoders load (loop._ready_unet), which reads all of it. A single file or a Hub id loads every
    part at once. int8 and nf4 load in the file's own half precision whatever the run's (setup.loading_dtype), so a
    run in fp32 never holds the model in fp32 (full-size SD1.5 in fp32: 5.22 GB peak; with nf4 2.18, int8 2.03)."""
    folder = cfg.model.source in ("", "tiny") or Path(cfg.model.source).expanduser().is_dir()
    if store in ("int8", "nf4"):
        wbytes = min(wbytes, 2)  # as published: half precision
    if folder and store:
        return max(p["unet"] * wbytes, p["unet"] * denoiser_bytes(family, wbytes, store) + p["text_encoders"] * wbytes) \
            * 1e6 / GB
    if folder:
        return max(p["unet"], p["text_encoders"]) * wbytes * 1e6 / GB
    return (p["unet"] + p["text_encoders"]) * wbytes * 1e6 / GB


def host_load_gb(cfg) -> float:
    """System RAM a run on a GPU needs while it loads: the base arrives on the host in half precision (fp32
    without mixed precision) before any model moves to the device, plus the runtime."""
    family = peek_family(cfg.model.source, cfg.model.family) or "sd1"
    wbytes = 2 if cfg.train.mixed_precision in ("fp16", "bf16") else 4
    if family == "tiny":
        params = embedded_params()
        return round(params * wbytes / GB + RUNTIME_GB, 2)
    p = params_m(cfg, family)
    return round(_loading_gb(cfg, family, p, wbytes, stored_as(cfg)) + p["vae"] * wbytes * 1e6 / GB + RUNTIME_GB, 2)

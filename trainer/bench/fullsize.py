"""Full-size SD1.5, SDXL and SD 3.5 Medium pipelines with random weights, built from their published configs.

Nothing is downloaded: the architectures are written out here, the weights are random, and the
folder is a normal diffusers pipeline, so the benchmark trains it through the real loader and loop.
Only the tokenizer is small (the embedded word-level one); the text encoders keep CLIP's full
vocabulary size, so their memory and compute are the real ones.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280], cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
                 transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
           block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)
FAMILIES = {"sd15": (SD15_UNET, 512, 0.18215), "sdxl": (SDXL_UNET, 1024, 0.13025)}
# SD 3.5 Medium (stabilityai/stable-diffusion-3.5-medium): MMDiT-X with a second attention in its first 13 blocks.
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, decoder_start_token_id=0)
SD3_VAE = dict(VAE, latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
               use_post_quant_conv=False)
WORDS = "a photo of person dog cat red blue green portrait landscape in the style".split()
MARKER = "fullsize.json"


def random_unet(config: dict, dtype: torch.dtype, seed: int = 0):
    """Build the UNet on the meta device and fill it in `dtype`, so no fp32 copy of 2.6 B params is made."""
    from diffusers import UNet2DConditionModel

    return random_model(lambda: UNet2DConditionModel(**config), dtype, seed)


def random_model(make, dtype: torch.dtype, seed: int = 0):
    """`make()` run on the meta device, then filled with random weights in `dtype`."""
    with torch.device("meta"):
        unet = make()
    unet = unet.to(dtype).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.ndim >= 2:  # fan-in scaled, as the default init would, so activations stay in range
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("weight") and "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
        for b in unet.buffers():  # to_empty left them unset; saved ones (SD3's position table) must be finite
            if b.is_floating_point():
                b.zero_()
    return unet


def build_sd35m(folder: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """SD 3.5 Medium, one component at a time (7.8 B parameters with T5-XXL: never all in memory at once). The CLIP
    tokenizers are the small word-level one at 77 tokens; the T5 slot gets it at 256 tokens, SD3's T5 length."""
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from trainer.models.tiny import load_tokenizer, write_tokenizer

    want = {"kind": "sd35m", "dtype": str(dtype), "seed": seed, "transformer": repr(SD35M_TRANSFORMER)}
    marker = folder / MARKER
    if marker.exists() and json.loads(marker.read_text()) == want:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    parts = {
        "transformer": lambda: SD3Transformer2DModel(**SD35M_TRANSFORMER),
        "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG)),
        "text_encoder_3": lambda: T5EncoderModel(T5Config(**T5_XXL)),
    }
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__}
    for i, (name, make) in enumerate(parts.items()):
        model = random_model(make, dtype, seed + i)
        model.save_pretrained(folder / name, safe_serialization=True)
        index[name] = [type(model).__module__.split(".")[0], type(model).__name__]
        del model
    AutoencoderKL(**SD3_VAE, sample_size=1024).to(dtype).save_pretrained(folder / "vae", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    for name, length in (("tokenizer", 77), ("tokenizer_2", 77), ("tokenizer_3", 256)):
        load_tokenizer(write_tokenizer(folder / name, WORDS, max_length=length))
        index[name] = ["transformers", "CLIPTokenizer"]
    index.update(vae=["diffusers", "AutoencoderKL"], scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    marker.write_text(json.dumps(want))
    return folder


def build(kind: str, folder: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write a random-weight pipeline of `kind` ('sd15', 'sdxl' or 'sd35m') to `folder` unless it is there already."""
    if kind == "sd35m":
        return build_sd35m(folder, dtype, seed)
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.models.tiny import load_tokenizer, write_tokenizer

    unet_cfg, resolution, scaling = FAMILIES[kind]
    want = {"kind": kind, "dtype": str(dtype), "seed": seed, "unet": unet_cfg}
    marker = folder / MARKER
    if marker.exists() and json.loads(marker.read_text()) == want:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(seed)
    tok = load_tokenizer(write_tokenizer(folder / "_tok", WORDS, max_length=77))
    vae = AutoencoderKL(**VAE, sample_size=resolution, scaling_factor=scaling).to(dtype)
    unet = random_unet(unet_cfg, dtype, seed)
    te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L)).to(dtype)
    if kind == "sdxl":
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG)).to(dtype)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=DDIMScheduler(**SCHEDULER))
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te1, tokenizer=tok, unet=unet,
                                       scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tok")
    marker.write_text(json.dumps(want))  # written last: a half-built folder is rebuilt next time
    return folder


def parameter_counts(folder: Path) -> dict:
    from trainer.memory.estimate import safetensors_params

    return {part: safetensors_params(folder / part) / 1e6 for part in ("unet", "transformer", "vae", "text_encoder",
                                                                       "text_encoder_2", "text_encoder_3")
            if (folder / part).exists()}


if __name__ == "__main__":
    import sys

    build(sys.argv[1], Path(sys.argv[2]))

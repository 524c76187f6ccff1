"""Tiny SD1 / SD2 / SDXL / SD3 / Flux.1 / Z-Image components built from config, for tests, benchmarks and the
embedded model: the real diffusers and transformers classes at a few thousand parameters (no download).

The tokenizer is word-level: every word of the given vocabulary is one token, and words outside
it fall back to single characters, so any prompt still encodes.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

BASE_WORDS = (
    "a an the of on in with and photo style small large big tiny red green blue yellow orange purple "
    "white black gray pink circle square triangle star cross ring background gradient plain dotted "
    "striped hatched figure object shape top bottom left right center"
).split()


def write_tokenizer(folder: str | Path, words=BASE_WORDS, max_length: int = 16) -> Path:
    """Write a CLIP BPE tokenizer whose merges spell each word of `words` as one token."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        vocab.setdefault(tok, len(vocab))

    for c in string.ascii_lowercase + string.digits + ",.!?-'":
        add(c)
        add(c + "</w>")
    merges: list[str] = []
    for word in sorted(set(w.lower() for w in words)):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            line = f"{parts[0]} {parts[1]}"
            if line not in merges:
                merges.append(line)
            add(merged)
            parts = [merged] + parts[2:]
    add("<|startoftext|>")
    add("<|endoftext|>")
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": max_length, "bos_token": "<|startoftext|>",
                    "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}),
        encoding="utf-8")
    return folder


def load_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def text_encoder_config(tokenizer, hidden: int = 32, layers: int = 2, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def vae(block_out=(32, 64), latent_channels: int = 4):
    from diffusers import AutoencoderKL

    n = len(block_out)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=list(block_out),
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=1, norm_num_groups=16, sample_size=32,
    )


def sd1_unet(cross_dim: int = 32, blocks=(32, 64), sample_size: int = 16):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=list(blocks), cross_attention_dim=cross_dim, attention_head_dim=8,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], norm_num_groups=16,
    )


def sdxl_unet(cross_dim: int = 64, blocks=(32, 64), sample_size: int = 16, pooled_dim: int = 32):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=list(blocks), cross_attention_dim=cross_dim, attention_head_dim=(2, 4),
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], norm_num_groups=16,
        use_linear_projection=True, transformer_layers_per_block=[1, 1],
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=pooled_dim + 6 * 8,
    )


def sd3_transformer(joint_dim: int = 48, pooled_dim: int = 64, dual_attention: bool = True):
    """SD3.5 Medium's shape in miniature: joint blocks, the last one context-pre-only, the first with SD3.5's second
    image-only attention (attn2) and qk RMS-norm; 16 latent channels, patch size 2."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=joint_dim, caption_projection_dim=32,
        pooled_projection_dim=pooled_dim, pos_embed_max_size=32,
        dual_attention_layers=(0,) if dual_attention else (), qk_norm="rms_norm" if dual_attention else None,
    )


def build_pipeline(family: str, folder: str | Path, seed: int = 0, scheduler: dict | None = None):
    """Build a randomly initialised tiny pipeline of `family` ('sd1', 'sd2', 'sdxl', 'sd3', 'flux' (dev),
    'flux-schnell' or 'zimage') and save it
    in the diffusers layout under `folder`; `scheduler` adds to its scheduler's settings (a v-prediction,
    zero-terminal-SNR SDXL: {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}). Returns the folder."""
    from diffusers import (DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = load_tokenizer(write_tokenizer(folder / "_tok"))
    sched_kwargs = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", clip_sample=False,
                        steps_offset=1, **(scheduler or {}))
    if family == "sd3":
        pipe = _sd3_pipeline(tok, scheduler)
    elif family in ("flux", "flux-schnell"):
        pipe = _flux_pipeline(tok, schnell=family == "flux-schnell")
    elif family == "zimage":
        pipe = _zimage_pipeline(tok)
    elif family == "sdxl":
        te1 = CLIPTextModel(text_encoder_config(tok, hidden=32))
        te2 = CLIPTextModelWithProjection(text_encoder_config(tok, hidden=32, projection_dim=32))
        pipe = StableDiffusionXLPipeline(
            vae=vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
            unet=sdxl_unet(cross_dim=64, pooled_dim=32), scheduler=DDPMScheduler(**sched_kwargs),
        )
    else:
        if family == "sd2":
            sched_kwargs["prediction_type"] = "v_prediction"
        te = CLIPTextModel(text_encoder_config(tok, hidden=32))
        unet = sd1_unet(cross_dim=32)
        if family == "sd2":
            # SD2's UNet uses linear projections and per-level head dims; that is how it is told apart.
            unet = _sd2_unet()
        pipe = StableDiffusionPipeline(
            vae=vae(), text_encoder=te, tokenizer=tok, unet=unet, scheduler=DDPMScheduler(**sched_kwargs),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    import shutil

    shutil.rmtree(folder / "_tok")
    return folder


def _sd3_pipeline(tok, scheduler: dict | None):
    """CLIP-L and CLIP-G (32 wide each, so their 64-wide concatenation is zero-padded to T5's 80, as SD3 pads 2048 to
    4096), a T5 encoder, a 16-channel VAE with SD3's shift and scale, and the flow-matching scheduler (shift 3)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    te1 = CLIPTextModelWithProjection(text_encoder_config(tok, hidden=32, projection_dim=32))
    te2 = CLIPTextModelWithProjection(text_encoder_config(tok, hidden=32, projection_dim=32))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=80, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id,
                                 decoder_start_token_id=0))
    vae_model = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1,
        norm_num_groups=16, sample_size=32, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return StableDiffusion3Pipeline(
        transformer=sd3_transformer(joint_dim=80, pooled_dim=64), vae=vae_model,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, **(scheduler or {})),
        text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok, text_encoder_3=t5, tokenizer_3=tok,
    )


# The 16-channel VAE Flux.1 and Z-Image decode with, in miniature: its own shift and scale.
FLUX_VAE = dict(latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611)
# A chat template in the shape of Qwen3's (a user turn, then the assistant's), in words the tiny tokenizer spells.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")
CHAT_TOKENS = 64  # the templated prompt is longer than a CLIP window


def flux_vae():
    """Four blocks, as the published VAE has ([128, 256, 512, 512]): 8 pixels per latent cell, so a tiny Flux or
    Z-Image sees as many tokens per image as the real one (with two blocks, 1024 px made 65,536 tokens, not 4,096).
    Their transformers' configs carry no sample_size, as the published ones do not: the native size is the family's."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=[16, 16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, norm_num_groups=8, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, **FLUX_VAE)


def flux_transformer(guidance: bool = True, joint_dim: int = 48, pooled_dim: int = 32):
    """Flux.1's shape in miniature: one double (joint) block and two single blocks over packed 2x2 patches of 16
    latent channels; `guidance` embeds the guidance value as dev does (schnell has none)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=joint_dim,
                                  pooled_projection_dim=pooled_dim, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))


def _flux_pipeline(tok, schnell: bool = False):
    """CLIP-L (pooled, 32 wide), a T5 encoder (48 wide), the transformer and the flow scheduler: dev shifts its
    timesteps by the image's token count, schnell by a fixed 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(text_encoder_config(tok, hidden=32))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=48, d_kv=12, d_ff=64, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id,
                                 decoder_start_token_id=0))
    shifting = dict(shift=1.0, use_dynamic_shifting=False) if schnell else dict(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **shifting),
                        vae=flux_vae(), text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok,
                        transformer=flux_transformer(guidance=not schnell))


def zimage_transformer(cap_dim: int = 32):
    """Z-Image's shape in miniature: two main layers and two refiner layers each for the image and the caption,
    2x2 patches of 16 latent channels, rotary positions over (caption/frame, height, width)."""
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2,
                                    n_refiner_layers=2, n_heads=4, n_kv_heads=4, cap_feat_dim=cap_dim,
                                    axes_dims=[4, 6, 6], axes_lens=[512, 64, 64])


def _zimage_pipeline(tok):
    """A Qwen3 language model (two layers, 32 wide; its second-to-last hidden layer conditions), the transformer
    and the flow scheduler with Z-Image's fixed shift of 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = CHAT_TOKENS
    qwen = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=512, pad_token_id=tok.pad_token_id))
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                                    use_dynamic_shifting=False),
                          vae=flux_vae(), text_encoder=qwen, tokenizer=tok, transformer=zimage_transformer(32))


def _sd2_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], norm_num_groups=16,
    )

"""diffusers UNet module paths -> the original (SGM/LDM) names that SDXL LoRAs use in the wild.

kohya trains SDXL on the original UNet layout, so its files say `input_blocks_4_1_...`; ComfyUI and
A1111 read both, kohya's tools only this one. The inverse is never hand-written: callers enumerate
the model's modules and map them forward.
"""
from __future__ import annotations

import re

RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
          "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
       "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def to_sgm(path: str, layers_per_block: int, up_levels_with_attention: set[int]) -> str:
    for k, v in TOP.items():
        if path == k or path.startswith(k + "."):
            return v + path[len(k):]
    n = layers_per_block
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(\..*)?$", path)
    if m:
        kind, level, part, idx, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        if kind == "down_blocks":
            if part == "downsamplers":
                return f"input_blocks.{(level + 1) * (n + 1)}.0" + rest.replace(".conv", ".op", 1)
            block = 1 + level * (n + 1) + idx
        else:
            if part == "upsamplers":
                slot = 2 if level in up_levels_with_attention else 1
                return f"output_blocks.{level * (n + 1) + n}.{slot}" + rest
            block = level * (n + 1) + idx
        prefix = "input_blocks" if kind == "down_blocks" else "output_blocks"
        return f"{prefix}.{block}.{1 if part == 'attentions' else 0}" + (_resnet(rest) if part == "resnets" else rest)
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(\..*)?$", path)
    if m:
        part, idx, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        slot = 1 if part == "attentions" else (0 if idx == 0 else 2)
        return f"middle_block.{slot}" + (_resnet(rest) if part == "resnets" else rest)
    return path


def _resnet(rest: str) -> str:
    for k, v in RESNET.items():
        if rest == "." + k or rest.startswith("." + k + "."):
            return "." + v + rest[len(k) + 1:]
    return rest


def unet_namer(unet_config: dict):
    """A function mapping this UNet's diffusers module paths to SGM paths."""
    with_attention = {i for i, t in enumerate(unet_config["up_block_types"]) if "CrossAttn" in t}
    lpb = unet_config["layers_per_block"]
    lpb = lpb[0] if isinstance(lpb, (list, tuple)) else lpb
    return lambda path: to_sgm(path, lpb, with_attention)

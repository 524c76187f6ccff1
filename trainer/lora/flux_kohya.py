"""Flux.1 LoRAs in kohya's layout (sd-scripts' networks/lora_flux.py, Forge; ComfyUI and diffusers read it too): BFL's
module names with `.lora_down/.lora_up/.alpha`, where BFL fuses what diffusers keeps apart: a double block's image
q, k, v are one `img_attn_qkv` (the text stream's `txt_attn_qkv`), a single block's q, k, v and MLP input are one
`linear1`. LoRA Studio trains the diffusers layers, each its own LoRA, so a fused module is written as their block
diagonal: the downs stacked, each up in its own rows and columns, each layer's alpha/rank folded into its up and the
fused alpha equal to its rank (scale 1). Every loader then applies exactly the ΔW each layer trained, and
diffusers' kohya-Flux converter recognises the blocks (its "sparse" case) and splits them back. A member that did
not train (no single-block MLP LoRA) is a zero block of the same rank, so each fused module has equal blocks.

Reading goes the other way: `split` turns kohya Flux modules (ours, or sd-scripts' fused ones with one shared down)
into the diffusers layers they apply to, exactly; so Preview, merge, resize and bake see one Flux naming."""
from __future__ import annotations

import re
from dataclasses import replace

import torch

from trainer.errors import LoraError
from trainer.lora.inject import ADAPTER

# diffusers path within a block -> (BFL module, slot in the fused weight or None)
DOUBLE = {"attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
          "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
          "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_out.0": ("img_attn_proj", None),
          "attn.to_add_out": ("txt_attn_proj", None), "ff.net.0.proj": ("img_mlp_0", None),
          "ff.net.2": ("img_mlp_2", None), "ff_context.net.0.proj": ("txt_mlp_0", None),
          "ff_context.net.2": ("txt_mlp_2", None), "norm1.linear": ("img_mod_lin", None),
          "norm1_context.linear": ("txt_mod_lin", None)}
SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
          "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None), "norm.linear": ("modulation_lin", None)}
BLOCKS = {"transformer_blocks": ("double_blocks", DOUBLE), "single_transformer_blocks": ("single_blocks", SINGLE)}
# the diffusers layers of each fused module, in the order BFL stacks them
FUSED = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
         "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
# whole-model layers outside the blocks, by the names sd-scripts gives them
OUTSIDE = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer_linear": "proj_out",
           "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
           "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
           "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2"}
PREFIX = "lora_unet_"
KOHYA_NAME = re.compile(r"lora_unet_(double_blocks|single_blocks)_(\d+)_(.+)")
CLIP_NAME = re.compile(r"lora_te1?_text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])")


def bfl_name(path: str) -> tuple[str, int | None]:
    """A diffusers transformer path -> (kohya module name, slot in its fused weight or None)."""
    block, index, rest = path.split(".", 2)
    bfl, table = BLOCKS[block]
    if rest not in table:
        raise LoraError(f"transformer.{path} has no place in kohya's Flux layout; save it with save.layout = auto")
    name, slot = table[rest]
    return f"{PREFIX}{bfl}_{index}_{name}", slot


def state_dict(transformer: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The trained transformer's LoRA layers in kohya's Flux layout (text encoders go through write.kohya_state_dict)."""
    from trainer.lora.write import lora_layers

    plain: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    blocks: dict[str, str] = {}  # fused name -> its block's diffusers path
    for path, mod in lora_layers(transformer):
        name, slot = bfl_name(path)
        down = mod.lora_A[ADAPTER].weight.detach().float().cpu()
        up = mod.lora_B[ADAPTER].weight.detach().float().cpu()
        scale = float(mod.scaling[ADAPTER])
        if slot is None:
            plain[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
            plain[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
            plain[f"{name}.alpha"] = torch.tensor(scale * down.shape[0], dtype=dtype)
        else:
            fused.setdefault(name, {})[slot] = (down, up * scale)
            blocks[name] = ".".join(path.split(".")[:2])  # "transformer_blocks.0"
    for name, members in fused.items():
        plain.update(_fuse(name, members, transformer, blocks[name], dtype))
    return plain


def _fuse(name: str, members: dict, transformer, block: str, dtype) -> dict[str, torch.Tensor]:
    """The block-diagonal fused module; a member that trained no LoRA is a zero block of the same rank."""
    layers = FUSED[next(kind for kind in FUSED if name.endswith(kind))]
    rank = next(iter(members.values()))[0].shape[0]
    downs, ups = [], []
    for slot, layer in enumerate(layers):
        base = transformer.get_submodule(f"{block}.{layer}")
        out_features = getattr(base, "out_features", None) or base.get_base_layer().out_features
        in_features = getattr(base, "in_features", None) or base.get_base_layer().in_features
        down, up = members.get(slot, (torch.zeros(rank, in_features), torch.zeros(out_features, rank)))
        if down.shape[0] != rank:
            raise LoraError(f"{name}: its layers trained different ranks ({down.shape[0]} and {rank}); kohya's layout "
                            "fuses them into one module of one rank")
        downs.append(down)
        ups.append(up)
    total = rank * len(layers)
    up = torch.zeros(sum(u.shape[0] for u in ups), total)
    row = 0
    for j, u in enumerate(ups):
        up[row:row + u.shape[0], j * rank:(j + 1) * rank] = u
        row += u.shape[0]
    return {f"{name}.lora_down.weight": torch.cat(downs).to(dtype).contiguous(),
            f"{name}.lora_up.weight": up.to(dtype).contiguous(), f"{name}.alpha": torch.tensor(float(total), dtype=dtype)}


# ---- reading -----------------------------------------------------------------------------------------------------
def is_kohya_flux(names) -> bool:
    return any(KOHYA_NAME.match(n) for n in names) or any(n[len(PREFIX):] in OUTSIDE for n in names
                                                          if n.startswith(PREFIX))


def diffusers_name(path: str) -> str:
    return "lora_transformer_" + path.replace(".", "_")


def split(modules: dict) -> dict:
    """kohya Flux modules -> the diffusers layers they apply to (`lora_transformer_<path>`, with `path` set), exactly:
    a fused module's up is cut by rows (dims from its shapes: BFL's linear1 is q, k, v of the inner width and the MLP
    of the rest), and where the up is block diagonal each layer keeps its own block of the rank. Other modules (the
    text encoder's) pass through."""
    out: dict[str, Module] = {}
    for name, m in modules.items():
        match = KOHYA_NAME.match(name)
        if name.startswith(PREFIX) and name[len(PREFIX):] in OUTSIDE:
            path = OUTSIDE[name[len(PREFIX):]]
            out[diffusers_name(path)] = replace(m, path=f"transformer.{path}")
            continue
        if not match:
            te = CLIP_NAME.fullmatch(name)
            out[name] = replace(m, path=f"text_encoder.text_model.encoder.layers.{te[1]}."
                                        f"{te[2].replace('attn_', 'attn.').replace('mlp_', 'mlp.')}") if te else m
            continue
        bfl, index, rest = match.groups()
        block = "transformer_blocks" if bfl == "double_blocks" else "single_transformer_blocks"
        table = DOUBLE if bfl == "double_blocks" else SINGLE
        layers = [p for p, (n, _) in sorted(table.items(), key=lambda kv: kv[1][1] or 0) if n == rest]
        if not layers:
            raise LoraError(f"{name}: no Flux layer is named {rest!r} in kohya's layout")
        if len(layers) == 1:
            path = f"{block}.{index}.{layers[0]}"
            out[diffusers_name(path)] = replace(m, path=f"transformer.{path}")
            continue
        if m.dora_scale is not None:
            raise LoraError(f"{name}: a fused DoRA module cannot be split into its layers")
        inner = m.down.shape[1]
        rows = m.up.shape[0]
        dims = [inner] * 3 + ([rows - 3 * inner] if len(layers) == 4 else [])
        if sum(dims) != rows or min(dims) <= 0:
            raise LoraError(f"{name}: its lora_up has {rows} rows, which do not split into the fused layers "
                            f"({len(layers)} of width {inner}...); the file does not fit Flux.1")
        for j, (layer, piece) in enumerate(zip(layers, _rows(m.up, dims))):
            down, up = _own_block(m.down, piece, j, len(layers), m.up)
            path = f"{block}.{index}.{layer}"
            out[diffusers_name(path)] = replace(m, down=down, up=up, alpha=m.alpha * down.shape[0] / m.down.shape[0],
                                                path=f"transformer.{path}")
    return out


def _rows(up: torch.Tensor, dims: list[int]) -> list[torch.Tensor]:
    return list(torch.split(up, dims, dim=0))


def _own_block(down: torch.Tensor, piece: torch.Tensor, j: int, n: int, up: torch.Tensor):
    """(down, up) of one member: its own rank block where the fused up is block diagonal (our files, diffusers'
    converter), else the shared down with its rows of up (sd-scripts' fused LoRA)."""
    rank = down.shape[0]
    if rank % n == 0:
        r = rank // n
        cols = torch.zeros(rank, dtype=torch.bool)
        cols[j * r:(j + 1) * r] = True
        if not piece[:, ~cols].any():
            return down[j * r:(j + 1) * r], piece[:, cols]
    return down, piece

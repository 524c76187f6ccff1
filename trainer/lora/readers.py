"""Which programs apply a LoRA file as it trained, by what the file is (torch-free: the Library, the model card and
`lora inspect` say it). Each line rests on a test that recomputes what that reader applies: ComfyUI's and A1111's key
maps and formulas (tests/test_formats.py, test_lycoris.py, test_modern.py, test_flux_kohya.py) and diffusers' own
`load_lora_weights` (test_sd3.py, test_modern.py, test_round4.py)."""
from __future__ import annotations


def kind_of(keys) -> dict:
    """What readers care about, from a file's tensor names: network ('lora', 'loha', 'lokr'), DoRA, layout."""
    keys = list(keys)
    network = "loha" if any(k.endswith(".hada_w1_a") for k in keys) else \
        "lokr" if any(k.endswith((".lokr_w1", ".lokr_w1_a")) for k in keys) else "lora"
    dora = any(k.endswith((".dora_scale", ".lora_magnitude_vector")) for k in keys)
    layout = "diffusers" if any(".lora_A." in k for k in keys) else "kohya"
    bfl = any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in keys)
    return {"network": network, "dora": dora, "layout": layout, "bfl": bfl}


def readers(family: str | None, kind: dict) -> list[str]:
    """One line per reader: 'exact', or what it does instead."""
    sd = family in ("sd1", "sd2", "sdxl", None)
    if kind["network"] != "lora":
        return ["ComfyUI and Forge: exact", *(["AUTOMATIC1111 1.5+: exact"] if sd else []),
                "kohya's tools (LyCORIS): exact",
                "diffusers' load_lora_weights: not read (it reads no LyCORIS file; LoRA Studio's Preview and bake do)"]
    if kind["dora"]:
        if kind["layout"] == "kohya":
            return ["ComfyUI and Forge: exact", *(["AUTOMATIC1111: exact"] if sd else []),
                    "diffusers' load_lora_weights: drops the DoRA magnitudes with a warning and applies a plain LoRA "
                    "(W + up·down); save.layout = peft writes a file diffusers applies exactly"]
        return ["diffusers' load_lora_weights: exact (peft's DoRA)",
                "ComfyUI, Forge, AUTOMATIC1111: write it with save.layout = kohya for them"]
    if family == "flux":
        lines = ["ComfyUI and Forge: exact", "diffusers' load_lora_weights: exact"]
        return lines + (["kohya's sd-scripts (networks.lora_flux): exact"] if kind["bfl"] else
                        ["kohya's sd-scripts: not read (diffusers' names); save.layout = kohya writes BFL's names"])
    if family in ("sd3", "zimage"):
        return ["ComfyUI: exact", "diffusers' load_lora_weights: exact",
                "AUTOMATIC1111: not read (it runs no " + ("SD3" if family == "sd3" else "Z-Image") + " model)"]
    if kind["layout"] == "diffusers":
        return ["diffusers' load_lora_weights: exact (its adapter metadata carries the alphas)",
                "ComfyUI, Forge, AUTOMATIC1111: write it with save.layout = kohya for them"]
    return ["AUTOMATIC1111, Forge and ComfyUI: exact", "kohya's tools: exact", "diffusers' load_lora_weights: exact"]

"""Generate one file per bad-input kind, with the reason the report must give for it."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw


def _shape(size=(96, 80), colour="red", mode="RGB"):
    im = Image.new("RGB", size, "white")
    w, h = size
    ImageDraw.Draw(im).rectangle((w // 8, h // 8, w * 3 // 4, h * 2 // 3), fill=colour)
    ImageDraw.Draw(im).ellipse((w // 2, h // 16, w - w // 16, h // 2), fill="blue")
    return im.convert(mode) if mode != "RGB" else im


def _png_with_size(width: int, height: int) -> bytes:
    """A real PNG whose header declares a huge size (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + type of IHDR
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def make_bad_dataset(folder: Path) -> dict[str, str]:
    """Write the fixture set; returns file name -> a phrase its report must contain ('' = must be usable)."""
    folder.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str] = {}

    def save(name, im, fmt=None, caption="a red square", **kw):
        im.save(folder / name, format=fmt, **kw)
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")

    save("good.png", _shape())
    expect["good.png"] = ""
    buf = io.BytesIO()
    _shape((120, 100)).save(buf, format="JPEG", quality=90)
    (folder / "corrupt.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect["corrupt.jpg"] = "corrupt or truncated"
    (folder / "empty.png").write_bytes(b"")
    expect["empty.png"] = "zero-byte"
    (folder / "notes.png").write_text("this is text, not a picture")
    expect["notes.png"] = "not an image"
    (folder / "bomb.png").write_bytes(_png_with_size(100_000, 100_000))
    expect["bomb.png"] = "decompression bomb"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    save("rotated.jpg", _shape((96, 72)), "JPEG", exif=exif)
    expect["rotated.jpg"] = ""
    rgba = _shape(mode="RGBA")
    rgba.putalpha(_shape(mode="L").point(lambda v: 0 if v > 250 else 255))  # white background transparent
    save("rgba.png", rgba)
    expect["rgba.png"] = ""
    save("cmyk.jpg", _shape(mode="CMYK"), "JPEG")
    expect["cmyk.jpg"] = ""
    save("sixteen.png", _shape(mode="L").convert("I;16"))
    expect["sixteen.png"] = ""
    save("palette.png", _shape(mode="P"))
    expect["palette.png"] = ""
    save("tiny.png", _shape((20, 20)))
    expect["tiny.png"] = "too small"
    save("thin.png", _shape((400, 70)))
    expect["thin.png"] = "extreme aspect ratio"
    save("x_dup.png", _shape())  # byte-identical to good.png (sorted later, so it is the duplicate)
    expect["x_dup.png"] = "exact duplicate"
    near = _shape().point(lambda v: min(255, v + 3))
    save("near.png", near)
    expect["near.png"] = "near-duplicate"
    save("nocaption.png", _shape((90, 90), "green"), caption=None)
    expect["nocaption.png"] = "no caption file"
    save("latin1.png", _shape((90, 90), "purple"), caption=None)
    (folder / "latin1.txt").write_bytes("café, crème".encode("cp1252"))
    expect["latin1.png"] = "not UTF-8"
    save("blank.png", _shape((90, 90), "orange"), caption="   ")
    expect["blank.png"] = "empty caption"
    (folder / "readme.pdf").write_bytes(b"%PDF-1.4")
    expect["readme.pdf"] = "not an image type"
    return expect


# ---- LoRA files with defects, made from a good one ---------------------------------------------------

def lora_variants(good: Path, out: Path) -> dict[str, Path]:
    """From a trained LoRA: NaN values, ranks that do not fit, all-zero up weights, and files that are no LoRA
    of a kind LoRA Studio reads (LoHa, a plain tensor, an SDXL text-encoder LoRA, a pickle)."""
    import math
    import pickle

    import torch
    from safetensors.torch import load_file, save_file

    tensors, made = load_file(str(good)), {}
    downs = sorted(k for k in tensors if k.endswith(".lora_down.weight"))

    def write(name, t):
        made[name] = out / f"{name}.safetensors"
        save_file(t, str(made[name]), metadata={"ss_base_model_version": "sd_v1"} if name != "sdxl" else None)

    nan = dict(tensors)
    nan[downs[0]] = nan[downs[0]].clone()
    nan[downs[0]].view(-1)[0] = math.nan
    write("nan", nan)
    inf = dict(tensors)
    up = downs[-1].replace("lora_down", "lora_up")
    inf[up] = inf[up].clone().fill_(math.inf)
    write("inf", inf)
    mismatch = dict(tensors)
    up = downs[0].replace("lora_down", "lora_up")
    mismatch[up] = mismatch[up][:, :-1].contiguous()
    write("mismatch", mismatch)
    write("zero", {k: (torch.zeros_like(v) if ".lora_up." in k else v) for k, v in tensors.items()})
    write("loha", {"lora_unet_x.hada_w1_a": torch.ones(2, 2), "lora_unet_x.hada_w1_b": torch.ones(2, 2)})
    write("plain", {"weight": torch.ones(4, 4)})
    write("sdxl", {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 32),
                   "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(32, 2)})
    made["pickle"] = out / "evil.ckpt"
    made["pickle"].write_bytes(pickle.dumps({"state_dict": {}}))
    return made


# ---- archives and folders ------------------------------------------------------------------------------

def _png_bytes(colour, size=(72, 64)) -> bytes:
    buf = io.BytesIO()
    _shape(size, colour).save(buf, format="PNG")
    return buf.getvalue()


def zip_with_bad_crc(path: Path) -> Path:
    """Two good members and one whose stored bytes were damaged after the CRC was written."""
    import zipfile

    bad = _png_bytes("green")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("a.png", _png_bytes("red"))
        z.writestr("a.txt", "a red square")
        z.writestr("b.png", bad)
        z.writestr("c.png", _png_bytes("purple"))
    data = bytearray(path.read_bytes())
    at = data.find(bad) + len(bad) // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def folder_with_zip(folder: Path) -> Path:
    """An image, a zip of two more, and a stray non-image, in one folder."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "loose.png").write_bytes(_png_bytes("red"))
    with zipfile.ZipFile(folder / "more.zip", "w") as z:
        z.writestr("in_zip_1.png", _png_bytes("blue"))
        z.writestr("in_zip_2.png", _png_bytes("orange"))
    (folder / "notes.docx").write_bytes(b"PK\x03\x04 not really")
    return folder


def duplicates_with_one_caption(folder: Path) -> Path:
    """The same image twice: the copy sorted first has no caption, the other has the user's caption."""
    folder.mkdir(parents=True, exist_ok=True)
    data = _png_bytes("red")
    (folder / "dup_of_good_01.png").write_bytes(data)
    (folder / "good_01.png").write_bytes(data)
    (folder / "good_01.txt").write_text("zorbo, red box", encoding="utf-8")
    (folder / "other.png").write_bytes(_png_bytes("blue"))
    (folder / "other.txt").write_text("a blue square", encoding="utf-8")
    return folder


def dataset_with_hidden_image(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "seen.png").write_bytes(_png_bytes("red"))
    (folder / "seen.txt").write_text("a red square", encoding="utf-8")
    (folder / ".hidden.png").write_bytes(_png_bytes("blue"))
    return folder

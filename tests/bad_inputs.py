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

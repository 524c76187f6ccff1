"""Booru-style tags with SmilingWolf's WD tagger models (v3: ViT, SwinV2, ConvNeXt, EVA02), through onnxruntime.

A model is a folder (or Hub repo) with `model.onnx` and `selected_tags.csv` (tag_id, name, category, count;
category 9 = rating, 0 = general, 4 = character). The model takes NHWC float32 BGR pixels 0..255 at its own
square size (448 for v3) and returns one probability per tag, as the models' own demo feeds them: the image
composited on white, padded to a white square, resized bicubic.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

RATING, GENERAL, CHARACTER = 9, 0, 4
FILES = ("model.onnx", "selected_tags.csv")
# Emoticon tags whose underscores are the face, not word separators (the WD demo keeps these as they are).
KAOMOJI = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
           "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}


@dataclass
class TaggerOptions:
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    blacklist: list[str] = field(default_factory=list)  # tags never written (spaces or underscores, any case)
    underscores_to_spaces: bool = True


def resolve_files(model: str, progress=None) -> tuple[Path, Path]:
    """(model.onnx, selected_tags.csv) from a local folder, else downloaded from the Hub (kept in its cache)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        missing = [f for f in FILES if not (folder / f).exists()]
        if missing:
            raise ValueError(f"{folder} is not a WD tagger: it lacks {', '.join(missing)}")
        return folder / FILES[0], folder / FILES[1]
    from huggingface_hub import hf_hub_download

    paths = []
    for i, name in enumerate(FILES):
        if progress:
            progress(f"downloading {model}/{name} ({i + 1}/{len(FILES)})")
        paths.append(Path(hf_hub_download(model, name)))
    return paths[0], paths[1]


def read_tags(csv_path: Path) -> tuple[list[str], np.ndarray]:
    names, categories = [], []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            names.append(row["name"])
            categories.append(int(row["category"]))
    return names, np.array(categories)


class WDTagger:
    def __init__(self, model: str, options: TaggerOptions | None = None, device: str | None = None, progress=None):
        import onnxruntime as ort

        self.name = model
        self.options = options or TaggerOptions()
        onnx_path, csv_path = resolve_files(model, progress)
        self.tags, self.categories = read_tags(csv_path)
        available = ort.get_available_providers()
        providers = ["CUDAExecutionProvider"] if device != "cpu" and "CUDAExecutionProvider" in available else []
        self.session = ort.InferenceSession(str(onnx_path), providers=providers + ["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name, self.size = inp.name, int(inp.shape[1])
        width = self.session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(self.tags):
            raise ValueError(f"{model}: the model scores {width} tags but selected_tags.csv lists {len(self.tags)}")
        self._blocked = {self._norm(t) for t in self.options.blacklist}

    @staticmethod
    def _norm(tag: str) -> str:
        return tag.strip().lower().replace("_", " ")

    def prepare(self, image: Image.Image) -> np.ndarray:
        im = image.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
        canvas.alpha_composite(im)
        rgb = canvas.convert("RGB")
        side = max(rgb.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
        square = square.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR

    def scores(self, images: list) -> np.ndarray:
        batch = np.stack([self.prepare(im) for im in images])
        return self.session.run(None, {self.input_name: batch})[0]

    def tags_for(self, probs: np.ndarray) -> list[str]:
        """Character tags, then general tags, each over its threshold and most confident first; ratings dropped."""
        o = self.options
        picked = []
        for category, threshold in ((CHARACTER, o.character_threshold), (GENERAL, o.general_threshold)):
            idx = np.where((self.categories == category) & (probs >= threshold))[0]
            picked += [i for i in idx[np.argsort(-probs[idx], kind="stable")]]
        out = []
        for i in picked:
            tag = self.tags[i]
            if self._norm(tag) in self._blocked:
                continue
            if o.underscores_to_spaces and tag not in KAOMOJI:
                tag = tag.replace("_", " ")
            out.append(tag)
        return out

    def caption(self, images: list) -> list[str]:
        return [", ".join(self.tags_for(p)) for p in self.scores(images)]

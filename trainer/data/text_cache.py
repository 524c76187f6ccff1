"""The caption cache: each caption's embeddings from the frozen text encoders, on disk beside the latent cache, with the
most recently used in RAM up to a budget. Flux's T5-XXL sequence is 512 x 4096 values a caption (4 MiB in bf16): held
in RAM, 10,000 captions were 40 GB (issue 37). Entries are keyed by caption and by everything that changes their
values (the family, the encoders' configs and a fingerprint of their weights, their dtype, clip skip), so a dataset's
captions are encoded once across runs, as its latents are. What is stored per caption is the family's choice
(`Family.text_entry`): Z-Image keeps only the prompt's real tokens, not its padding."""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.atomic import atomic_path

MEMORY_BYTES = 512 << 20  # captions kept in RAM: ~128 Flux captions, thousands of SD ones


def fingerprint(module: torch.nn.Module, sample: int = 1024) -> str:
    """A cheap identity of a model's weights: every tensor's name, shape, dtype and its first and last `sample`
    values. A fine-tune changes every tensor it touches, so two models with equal fingerprints encode alike; reading
    all of T5-XXL (9.5 GB) to hash it would cost more than the cache saves on a small dataset."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        as_dict.pop("_name_or_path", None)
        as_dict.pop("transformers_version", None)
        h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, t in module.state_dict().items():
        if t.device.type == "meta":
            raise ValueError("the text encoders were let go already")
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        for part in (flat[:sample], flat[-sample:]):
            h.update(part.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TextCache:
    """caption -> the family's stored entry (a dict of tensors); `get` returns it from RAM or disk, `put` writes it
    atomically. `identity` names what made the entries (TextCache.identity)."""

    def __init__(self, folder: str | Path, identity: str, memory_bytes: int | None = None):
        self.folder = Path(folder) / identity[:20]
        self.identity = identity
        self.memory_bytes, self._held = MEMORY_BYTES if memory_bytes is None else memory_bytes, 0
        self._memory: OrderedDict[str, dict] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def identity(family: str, text_encoders, tokenizers, extra: dict) -> str:
        h = hashlib.sha256(json.dumps({"family": family, **extra}, sort_keys=True, default=str).encode())
        for te in text_encoders:
            h.update(fingerprint(te).encode())
        for tok in tokenizers:
            if tok is not None:
                h.update(f"{type(tok).__name__}{len(tok)}{tok.model_max_length}".encode())
        return h.hexdigest()

    def _key(self, caption: str) -> str:
        return hashlib.sha256(caption.encode("utf-8")).hexdigest()

    def _path(self, caption: str) -> Path:
        key = self._key(caption)
        return self.folder / key[:2] / f"{key}.safetensors"

    def _remember(self, caption: str, entry: dict) -> None:
        if caption in self._memory:
            self._memory.move_to_end(caption)
            return
        self._memory[caption] = entry
        self._held += sum(t.numel() * t.element_size() for t in entry.values())
        while self._held > self.memory_bytes and len(self._memory) > 1:
            _, old = self._memory.popitem(last=False)
            self._held -= sum(t.numel() * t.element_size() for t in old.values())

    def has(self, caption: str) -> bool:
        return caption in self._memory or self._path(caption).is_file()

    def get(self, caption: str) -> dict:
        if caption in self._memory:
            self.hits += 1
            self._memory.move_to_end(caption)
            return self._memory[caption]
        try:
            entry = load_file(str(self._path(caption)))
        except Exception as e:  # a file cut short or removed while the run goes: say which, and what to do
            raise KeyError(f"the caption cache entry for {caption[:60]!r} in {self.folder} cannot be read ({e}); "
                           "delete that folder and start the run again") from None
        self.misses += 1
        self._remember(caption, entry)
        return entry

    def put(self, caption: str, entry: dict) -> None:
        entry = {k: v.detach().to("cpu").contiguous() for k, v in entry.items()}
        with atomic_path(self._path(caption)) as tmp:
            save_file(entry, str(tmp))
        self._remember(caption, entry)

    @property
    def held_bytes(self) -> int:
        return self._held

"""On-disk latent cache. A key covers image content, bucket, crop and VAE identity, so an unchanged
dataset is encoded once across runs, and an edited image or another VAE is encoded again."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path


def default_cache_dir() -> Path:
    env = os.environ.get("LORA_STUDIO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lora-studio"


def vae_identity(vae: torch.nn.Module) -> str:
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class LatentCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        if not path.exists():
            self.misses += 1
            return None
        try:
            latent = load_file(str(path))["latent"]
        except Exception:  # truncated or corrupt: recompute rather than fail the run
            self.misses += 1
            return None
        self.hits += 1
        return latent

    def put(self, key: str, latent: torch.Tensor) -> None:
        with atomic_path(self._path(key)) as tmp:
            save_file({"latent": latent.detach().to("cpu").contiguous()}, str(tmp))

"""On-disk latent cache. A key covers image content, bucket, crop and VAE identity, so an unchanged
dataset is encoded once across runs, and an edited image or another VAE is encoded again."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from ..resources import default_cache_dir  # noqa: F401  (re-exported: callers import it from here)


def vae_identity(vae: torch.nn.Module) -> str:
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class LatentCache:
    """Disk cache with an in-memory layer, so a training step never re-reads a latent it has seen."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0
        self._memory: dict[str, torch.Tensor] = {}

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
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
        self._memory[key] = latent
        return latent

    def put(self, key: str, latent: torch.Tensor) -> None:
        latent = latent.detach().to("cpu").contiguous()
        with atomic_path(self._path(key)) as tmp:
            save_file({"latent": latent}, str(tmp))
        self._memory[key] = latent


CENTRE = (0.5, 0.5)


def encode_latent(vae, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One image (CHW in [-1, 1]) to a scaled latent, sampled with `gen` for reproducibility."""
    dist = vae.encode(pixels.unsqueeze(0).to(vae.device, vae.dtype)).latent_dist
    latent = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(dist.mean.device, dist.mean.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latent.float() - shift) * vae.config.scaling_factor)[0].cpu()


@torch.no_grad()
def fill_latent_cache(data, cache: LatentCache, vae, vae_id: str, progress: bool = True, stop=None) -> tuple[int, int]:
    """Encode every centre-cropped image of `data` that the cache lacks; `stop()` is asked before each image (a user
    who pressed Stop does not wait for the rest). Returns (already cached, encoded)."""
    from tqdm.auto import tqdm

    gen = torch.Generator("cpu").manual_seed(0)
    todo = [i for i in range(len(data)) if cache.get(data.cache_key(i, CENTRE, vae_id)) is None]
    for i in tqdm(todo, desc="cache latents", disable=not (todo and progress)):
        if stop is not None and stop():
            break
        pixels, _ = data.pixels(i, CENTRE, False)
        cache.put(data.cache_key(i, CENTRE, vae_id), encode_latent(vae, pixels, gen))
    cache.hits = cache.misses = 0
    return len(data) - len(todo), len(todo)

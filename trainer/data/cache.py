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
    """Disk cache with an in-memory layer, so a training step rarely re-reads a latent it has seen. The layer holds
    at most `memory_bytes` (least recently used go first): 10,000 SDXL latents would be 2.5 GB."""

    def __init__(self, folder: str | Path, memory_bytes: int = 1 << 30):
        from collections import OrderedDict

        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0
        self.memory_bytes, self._held = memory_bytes, 0
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()

    def _remember(self, key: str, latent: torch.Tensor) -> None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return
        self._memory[key] = latent
        self._held += latent.numel() * latent.element_size()
        while self._held > self.memory_bytes and len(self._memory) > 1:
            _, old = self._memory.popitem(last=False)
            self._held -= old.numel() * old.element_size()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            self.hits += 1
            self._memory.move_to_end(key)
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
        self._remember(key, latent)
        return latent

    def has(self, key: str) -> bool:
        """In memory, or a whole file on disk (its header read, not its tensor: cache-ahead asks this of every image
        at start). A file cut short by a crash is not."""
        if key in self._memory:
            return True
        import json
        import struct

        path = self._path(key)
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                header = json.loads(f.read(n)) if 0 < n < 1 << 20 else None
            size = path.stat().st_size
        except (OSError, ValueError):
            return False
        if not isinstance(header, dict) or "latent" not in header:
            return False
        return 8 + n + header["latent"]["data_offsets"][1] == size

    def put(self, key: str, latent: torch.Tensor) -> None:
        latent = latent.detach().to("cpu").contiguous()
        with atomic_path(self._path(key)) as tmp:
            save_file({"latent": latent}, str(tmp))
        self._remember(key, latent)


CENTRE = (0.5, 0.5)


def latent_generator(key: str) -> torch.Generator:
    """The VAE's sampling noise for one cache entry, seeded by its key: a latent is the same whichever order images
    are encoded in (all before training, or each just before its step) and whatever else drew random numbers."""
    return torch.Generator("cpu").manual_seed(int(key[:15], 16))


def encode_latent(vae, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One image (CHW in [-1, 1]) to a scaled latent, sampled with `gen` for reproducibility."""
    dist = vae.encode(pixels.unsqueeze(0).to(vae.device, vae.dtype)).latent_dist
    latent = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(dist.mean.device, dist.mean.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latent.float() - shift) * vae.config.scaling_factor)[0].cpu()


@torch.no_grad()
def fill_latent_cache(data, cache: LatentCache, vae, vae_id: str, progress=None, stop=None, order=None,
                      workers: int | None = None) -> tuple[int, int]:
    """Encode every centre-cropped image of `data` that the cache lacks, in `order` (indices; default all in turn).
    Images are decoded and resized on `workers` threads (Pillow works without the interpreter lock) while this
    thread encodes them, in order. `stop()` is asked before each image; `progress(done, total)` as they go.
    Returns (already cached, encoded)."""
    order = list(range(len(data))) if order is None else list(order)
    todo = [i for i in order if cache.get(data.cache_key(i, CENTRE, vae_id)) is None]
    encoded = 0
    for i, pixels in _decoded(data, todo, workers):
        if stop is not None and stop():
            break
        key = data.cache_key(i, CENTRE, vae_id)
        cache.put(key, encode_latent(vae, pixels, latent_generator(key)))
        encoded += 1
        if progress:
            progress(encoded, len(todo))
    cache.hits = cache.misses = 0
    return len(order) - len(todo), encoded


def _decoded(data, indices: list[int], workers: int | None):
    """(index, pixels) in order, decoded a bounded window ahead on threads."""
    import os
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending, it = deque(), iter(indices)

        def fill():
            while len(pending) < 2 * workers:
                i = next(it, None)
                if i is None:
                    return
                pending.append((i, pool.submit(lambda j: data.pixels(j, CENTRE, False)[0], i)))

        fill()
        while pending:
            i, future = pending.popleft()
            fill()
            yield i, future.result()


class LatentFeeder:
    """Cache-ahead: the latents a step needs, encoded just before it (the VAE on the device until every latent is
    cached), with the next batch's images decoded on a thread meanwhile. Latents are seeded by their cache keys, so
    this trains the same LoRA as filling the whole cache first."""

    def __init__(self, data, cache: LatentCache, vae, vae_id: str, progress=None, on_complete=None):
        from concurrent.futures import ThreadPoolExecutor

        self.data, self.cache, self.vae, self.vae_id = data, cache, vae, vae_id
        self.progress, self.on_complete = progress, on_complete
        self.missing = {i for i in range(len(data)) if not cache.has(data.cache_key(i, CENTRE, vae_id))}
        self.total, self.encoded = len(self.missing), 0
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.ahead: dict[int, object] = {}

    @property
    def complete(self) -> bool:
        return not self.missing

    def prefetch(self, batch) -> None:
        for i in batch:
            if i in self.missing and i not in self.ahead:
                self.ahead[i] = self.pool.submit(lambda j: self.data.pixels(j, CENTRE, False)[0], i)

    @torch.no_grad()
    def ensure(self, batch) -> None:
        for i in batch:
            if i not in self.missing:
                continue
            future = self.ahead.pop(i, None)
            pixels = future.result() if future is not None else self.data.pixels(i, CENTRE, False)[0]
            key = self.data.cache_key(i, CENTRE, self.vae_id)
            self.cache.put(key, encode_latent(self.vae, pixels, latent_generator(key)))
            self.missing.discard(i)
            self.encoded += 1
            if self.progress:
                self.progress(self.encoded, self.total)
        if self.complete:
            self.close()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.on_complete:
            done, self.on_complete = self.on_complete, None
            done()

"""The two hashes people compare LoRA files by, torch-free so the app can show them.

- file SHA-256: of every byte of the file. A1111 and Civitai call its first 10 hex digits "AutoV2".
- tensor SHA-256: of the bytes after the safetensors header, so editing metadata (a rename) keeps it.
  kohya writes it as `sshs_model_hash`; A1111 and Civitai call its first 12 hex digits "AutoV3".
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path


def file_hashes(path: str | Path) -> dict[str, str]:
    whole, tensors = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        header = f.read(n)
        whole.update(head + header)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            whole.update(chunk)
            tensors.update(chunk)
    file_sha, tensor_sha = whole.hexdigest(), tensors.hexdigest()
    return {"file_sha256": file_sha, "autov2": file_sha[:10], "tensor_sha256": tensor_sha, "autov3": tensor_sha[:12]}


def describe(hashes: dict[str, str]) -> list[str]:
    return [f"file SHA-256 {hashes['file_sha256']} (AutoV2 {hashes['autov2']})",
            f"tensor SHA-256 {hashes['tensor_sha256']} (kohya sshs_model_hash; AutoV3 {hashes['autov3']})"]


def cached_file_sha256(path: str | Path, index: Path | None = None) -> str:
    """The file's SHA-256, remembered by path, size and modification time (a base checkpoint of several GB is
    hashed once, not on every run). The index is a small JSON file in the cache folder."""
    import json

    from .atomic import write_text
    from .resources import default_cache_dir

    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    index = index or default_cache_dir() / "file-sha256.json"
    try:
        known = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key not in known:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        known = {k: v for k, v in known.items() if not k.startswith(f"{path}|")}  # this file's older versions go
        known[key] = h.hexdigest()
        try:
            write_text(index, json.dumps(known, indent=0))
        except OSError:
            pass  # a read-only cache: hash again next time
    return known[key]


def model_folder_sha256(folder: str | Path) -> str:
    """A diffusers folder's hash, for the LoRA's `ss_new_sd_model_hash`: the SHA-256 of its denoiser's weights
    file (`unet/` or `transformer/`), or of its shards' hashes in order. "" when it has none."""
    folder = Path(folder)
    for part in ("unet", "transformer"):
        files = sorted((folder / part).glob("*.safetensors"))
        if len(files) == 1:
            return cached_file_sha256(files[0])
        if files:
            return hashlib.sha256("".join(cached_file_sha256(f) for f in files).encode()).hexdigest()
    return ""

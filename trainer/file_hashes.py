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

"""A LoRA file checked without torch, for the app: what `lora inspect` refuses and flags, from the safetensors header
and the raw tensor bytes (numpy). Dropping a 220 KB LoRA into Preview used to start a torch-importing process to
read its header (about 160 s on a loaded machine); this takes milliseconds."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.safetensors_header import HeaderError, read  # noqa: F401 (the LoRA checks' errors)

# Markers of adapter kinds LoRA Studio does not read (refused by name rather than half-loaded).
UNSUPPORTED = {"oft_blocks": "OFT", "oft_diag": "OFT", ".a1.weight": "GLoRA", "diff_b": "full-difference",
               "on_input": "IA3", ".diff": "full-difference"}
DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
LORA_KEYS = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight")
LYCORIS_KEYS = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a")  # LoHa and LoKr (their first factor)


def _finite(raw: bytes, dtype: str) -> bool:
    if dtype == "BF16":  # no numpy bf16: a value is NaN or infinite when its 8 exponent bits are all ones
        bits = np.frombuffer(raw, dtype=np.uint16)
        return not bool(((bits & 0x7F80) == 0x7F80).any())
    if dtype in DTYPES:
        return bool(np.isfinite(np.frombuffer(raw, dtype=DTYPES[dtype])).all())
    return True  # integer tensors are always finite


def check(path: str | Path) -> list[str]:
    """Refuse what cannot be used (raises HeaderError); return the defects `inspect` would flag (NaN/Inf values,
    up/down ranks that do not fit), each a line."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise HeaderError(f"{path.name}: LoRAs are read from .safetensors only (pickle files can run code)")
    header, n = read(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise HeaderError(f"{path.name} holds no tensors")
    for marker, kind in UNSUPPORTED.items():
        if any(marker in k for k in tensors):
            raise HeaderError(f"{path.name} is a {kind} file; LoRA Studio reads LoRA, LoCon, DoRA, LoHa and LoKr only")
    downs = [k for k in tensors if k.endswith(LORA_KEYS)]
    if not downs and not any(k.endswith(LYCORIS_KEYS) for k in tensors):
        raise HeaderError(f"{path.name} has no LoRA weights (no lora_down/lora_up or lora_A/lora_B keys); is it a "
                          "base model or an embedding?")
    _lycoris_complete(path, tensors)
    for k, v in sorted(tensors.items()):
        if k.endswith(".alpha") and _count(v.get("shape", [])) != 1:
            raise HeaderError(f"{path.name}: {k} holds {_count(v['shape'])} values, not one number: the file is damaged "
                              "or not a LoRA; export it again")
    size = path.stat().st_size - 8 - n
    for k, v in tensors.items():
        start, end = v.get("data_offsets", [0, 0])
        if end > size or start > end:
            raise HeaderError(f"{path.name} is truncated ({k} ends past the file); download or export it again")
    defects = []
    mismatched = []
    for down in sorted(downs):
        up = down.replace("lora_down", "lora_up").replace("lora_A", "lora_B").replace("lora.down", "lora.up")
        if up not in tensors:
            raise HeaderError(f"{down} has no matching up weight: the file is incomplete")
        if tensors[up]["shape"][1] != tensors[down]["shape"][0]:
            mismatched.append(down)
    if mismatched:
        defects.append(f"{len(mismatched)} module(s) with lora_up and lora_down ranks that do not match, e.g. "
                       f"{mismatched[0]}")
    bad = []
    with open(path, "rb") as f:
        for k, v in sorted(tensors.items()):
            start, end = v["data_offsets"]
            f.seek(8 + n + start)
            if not _finite(f.read(end - start), v["dtype"]):
                bad.append(k)
    if bad:
        defects.append(f"{len(bad)} tensor(s) with NaN or infinite values, e.g. {bad[0]} (training diverged, or the "
                       "file was damaged)")
    return defects


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _lycoris_complete(path: Path, tensors: dict) -> None:
    """Every LoHa/LoKr module has the factors a loader rebuilds ΔW from, and they multiply (lycoris.LycorisModule.check,
    torch-free: on the header's shapes)."""
    modules: dict[str, set] = {}
    for k in tensors:
        name, _, part = k.rpartition(".")
        if part.startswith(("hada_", "lokr_")):
            modules.setdefault(name, set()).add(part)
    for name, parts in sorted(modules.items()):
        loha = any(p.startswith("hada_") for p in parts)
        need = [[("hada_w1_a", "hada_w1_b")], [("hada_w2_a", "hada_w2_b")]] if loha else \
            [[("lokr_w1",), ("lokr_w1_a", "lokr_w1_b")], [("lokr_w2",), ("lokr_w2_a", "lokr_w2_b")]]
        for choices in need:
            if not any(all(c in parts for c in choice) for choice in choices):
                wanted = " or ".join("+".join(choice) for choice in choices)
                raise HeaderError(f"{path.name}: {name} is a {'LoHa' if loha else 'LoKr'} module without {wanted}: the "
                                  "file is incomplete; download or export it again")
        shape = {p: tensors[f"{name}.{p}"]["shape"] for p in parts}
        pairs = [("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b"), ("lokr_w1_a", "lokr_w1_b"),
                 ("lokr_w2_a", "lokr_w2_b")]
        tucker = any(p.endswith(("_t1", "_t2")) for p in parts)
        bad = [f"{a} {shape[a]} · {b} {shape[b]}" for a, b in pairs if a in shape and b in shape and not tucker
               and (len(shape[a]) < 2 or not shape[b] or shape[a][1] != shape[b][0])]
        if loha and not tucker and not bad and \
                (shape["hada_w1_a"][0], shape["hada_w1_b"][1]) != (shape["hada_w2_a"][0], shape["hada_w2_b"][1]):
            bad.append(f"hada_w1 {shape['hada_w1_a'][0]}x{shape['hada_w1_b'][1]} ⊙ hada_w2 "
                       f"{shape['hada_w2_a'][0]}x{shape['hada_w2_b'][1]}")
        if bad:
            raise HeaderError(f"{path.name}: {name}'s factors do not fit together ({bad[0]}): the file is damaged; "
                              "export it again")

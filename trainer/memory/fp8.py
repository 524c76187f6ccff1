"""float8 e4m3 storage with one scale per output row, and a fast way back to bf16/fp16 on a CPU (see frozen.py for
why frozen weights are stored this way, codecs.py for the other storages)."""
from __future__ import annotations

import threading

import torch

STORAGE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(STORAGE).max
def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, per-output-row scale) with weight ≈ fp8 · scale."""
    w = weight.detach().float()
    amax = w.flatten(1).abs().amax(dim=1).clamp(min=1e-12)
    scale = (amax / FP8_MAX).reshape(-1, *([1] * (w.ndim - 1)))
    return (w / scale).to(STORAGE), scale


def dequantize(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, scratch: bool = False) -> torch.Tensor:
    """fp8 · scale in `dtype`. With `scratch` (on a CPU) the result lives in a buffer that the next call with scratch
    overwrites: only for a weight used at once and dropped, as the stand-ins' forward and backward do."""
    if w.dtype == STORAGE and w.device.type == "cpu" and dtype in _BITS:
        return _cpu_upcast(w, scale, dtype, scratch)
    return w.to(dtype) if scale is None else w.to(dtype) * scale.to(dtype)


# float8 e4m3 (s eeee mmm) -> bf16 / fp16 by moving bits: (left shift, mask of sign + exponent/mantissa bits kept,
# power of two that turns e4m3's exponent bias 7 into the target's). Exact for every finite byte (tested); e4m3's
# subnormals land on the target's subnormals, which the same multiply scales right.
_BITS = {torch.bfloat16: (4, -30736, 2.0 ** 120),  # 0x87F0: sign, then e4m3's 7 bits at bf16's bits 10..4
         torch.float16: (7, -16512, 2.0 ** 8)}  # 0xBF80: sign, then at fp16's bits 13..7


def _cpu_upcast(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, scratch: bool) -> torch.Tensor:
    """w.to(dtype) * scale, on a CPU about 15x faster than torch's float8 conversion there, which goes one element
    at a time (measured on 2 cores, a 1280x5120 weight: 11.6 ms -> 0.73 ms). CUDA converts natively and fast.

    Why the scratch buffer: otherwise every frozen layer's pass allocates and frees a weight-sized buffer between
    the activations, holes the C allocator keeps. One reused buffer per thread: SD1.5 512 px fp8 peak 2.32 -> 2.24
    GB and 8.2 -> 7.6 s a step on 2 cores (the rest of a CPU run's excess over a GPU's is the allocator's too:
    returning freed memory at once, MALLOC_MMAP_THRESHOLD_, cut the peak to 1.9 GB but made steps 1.3-1.7x)."""
    shift, mask, bias = _BITS[dtype]
    if scratch:
        bits = _scratch(w.numel()).view(w.shape)
        bits.copy_(w.view(torch.int8))  # int8 -> int16 sign-extends: the sign lands on bit 15, the mask clears bits 14..
    else:
        bits = w.view(torch.int8).to(torch.int16)
    bits = bits.bitwise_left_shift_(shift).bitwise_and_(mask).view(dtype)
    return bits.mul_(bias if scale is None else scale.to(dtype) * bias)


_local = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel:
        _local.buf = buf = torch.empty(numel, dtype=torch.int16)
    return buf[:numel]

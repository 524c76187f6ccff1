"""How a frozen stand-in (memory/frozen.py) stores its weight: float8 with a scale per output row, or bitsandbytes'
int8 (one absmax per output row) and NF4 (4-bit NormalFloat, one absmax per block of 64: the QLoRA data type).

Why bitsandbytes, and why through its functional API: it is the library the QLoRA recipe (diffusers' Flux example,
OneTrainer) is built on, and since 0.47 its quantize and dequantize ops run on a CPU as well as CUDA (and MPS), so the
tests and the embedded model use the same code a GPU run does. torchao's NF4 tensor and optimum-quanto were the other
candidates: peft wraps torchao's int8 only, and quanto is no longer developed. diffusers' own BitsAndBytesConfig
refuses to load without a GPU ("A GPU is needed for quantization"), and its Linear4bit layers would bypass the
stand-ins this trainer streams and keeps no activations for. A stand-in dequantizes its weight for each pass (as
bitsandbytes' Linear4bit does for training batches), so the gradients that reach the LoRA layers are exact for the
stored weights, and LoRA weights, their gradients and the optimizer stay in full precision.
"""
from __future__ import annotations

import functools
import logging
import threading

import torch

from trainer.memory import fp8

NF4_BLOCK = 64  # bitsandbytes' and QLoRA's block size for NF4
KINDS = ("fp8", "int8", "nf4")
# Bytes a stored weight takes, scales included (per weight: int8 4 B per row; NF4 4 B per 64 weights).
BYTES = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5 + 4 / NF4_BLOCK}


class CodecError(RuntimeError):
    """A storage this machine cannot run: one line that says which setting works instead."""


@functools.cache
def bnb_functional():
    """bitsandbytes.functional, imported once. Its CPU backend looks for optional Hub kernels on import and warns when
    they are absent; the dequantize-then-matmul path used here does not need them, so that warning is not shown."""
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bf
    except ImportError as e:
        raise CodecError(f"train.frozen_dtype int8 and nf4 need bitsandbytes, which did not import ({e}): pip install "
                         "bitsandbytes, or set train.frozen_dtype to fp8 or auto") from None
    finally:
        noisy.setLevel(level)
    return bf


def check(kind: str | None, device: torch.device) -> None:
    """One small weight through `kind` on `device`: a backend without kernels for it fails here, before the model
    loads, with the setting that works instead. A quantized base never silently falls back to full precision."""
    if kind not in ("int8", "nf4"):
        return
    bf = bnb_functional()
    w = torch.linspace(-1, 1, 2 * NF4_BLOCK).reshape(2, NF4_BLOCK)
    try:  # quantized on the host, as frozen.freeze does before the model moves; dequantized where it computes
        stored, scale = encode(kind, w)
        back = decode(kind, stored.to(device), scale.to(device), torch.float32, w.shape)
    except Exception as e:  # noqa: BLE001 - any backend failure is the same one line
        raise CodecError(f"train.frozen_dtype={kind} does not run on this {device.type} with bitsandbytes "
                         f"{getattr(bf, '__version__', '') or _bnb_version()} ({type(e).__name__}: {str(e)[:160]}); "
                         "set train.frozen_dtype=fp8 (with bf16) or auto") from None
    if (back.cpu() - w).abs().max() > 0.2:
        raise CodecError(f"train.frozen_dtype={kind} gave wrong weights on this {device.type} (bitsandbytes "
                         f"{_bnb_version()}); set train.frozen_dtype=fp8 (with bf16) or auto")


def _bnb_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return "?"


def encode(kind: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored, scale) for a frozen weight (any shape: a convolution's is quantized as its output rows)."""
    if kind == "fp8":
        return fp8.quantize(weight)
    w = weight.detach()
    if kind == "int8":  # LLM.int8's row-wise absmax quantization (no outlier columns: threshold 0)
        q, row_absmax, _ = bnb_functional().int8_vectorwise_quant(w.reshape(w.shape[0], -1).float())
        return q, row_absmax.float()
    if kind == "nf4":
        bf = bnb_functional()
        flat = w.reshape(-1)
        if flat.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            flat = flat.float()
        packed, state = bf.quantize_4bit(flat, blocksize=NF4_BLOCK, quant_type="nf4")
        return packed, state.absmax
    raise ValueError(f"unknown frozen storage {kind!r}; allowed: {', '.join(KINDS)}")


def decode(kind: str, stored: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, shape,
           scratch: bool = False) -> torch.Tensor:
    """The weight in `dtype`, shaped `shape`, on `stored`'s device. `scratch`: fp8 on a CPU may reuse a buffer."""
    if kind == "fp8":
        return fp8.dequantize(stored, scale, dtype, scratch=scratch)
    numel = int(torch.Size(shape).numel())
    out = _scratch(numel, dtype) if scratch and stored.device.type == "cpu" else None
    if kind == "int8":
        if out is None:
            return bnb_functional().int8_vectorwise_dequant(stored, scale).to(dtype).reshape(shape)
        # the same product (int8 x row absmax / 127) into the reused buffer (tests: equal to bitsandbytes')
        return out.view(stored.shape).copy_(stored).mul_((scale.to(dtype) / 127)[:, None]).reshape(shape)
    if kind == "nf4":
        bf = bnb_functional()
        out_dtype = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        state = bf.QuantState(absmax=scale, shape=torch.Size([numel]), code=_nf4_code(stored.device),
                              blocksize=NF4_BLOCK, quant_type="nf4", dtype=out_dtype)
        if out is not None and out_dtype == dtype:
            return _nf4_in_chunks(bf, stored, scale, out, dtype).reshape(shape)
        return bf.dequantize_4bit(stored, state).reshape(shape).to(dtype)
    raise ValueError(f"unknown frozen storage {kind!r}")


_local = threading.local()
CHUNK = 1 << 20  # weights a CPU dequantizes at once: 8 MB of fp32, under glibc's mmap threshold, so reused


def _nf4_in_chunks(bf, stored: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor, dtype) -> torch.Tensor:
    """NF4 into `out` on a CPU, CHUNK weights at a time (NF4's blocks are independent). bitsandbytes' CPU kernel
    returns a new tensor and has no out= variant; one the size of a whole weight (SD1.5's largest: 118 MB in fp32)
    is a fresh mmap each pass, whose page faults cost more than the dequantizing (a full-size SD1.5 step at 64 px:
    3.7 s against 1.4 in fp32; in chunks 1.5 against 0.95); chunks come from the heap, reused."""
    numel = out.numel()
    code = _nf4_code(stored.device)
    flat = stored.reshape(-1)
    for start in range(0, numel, CHUNK):
        n = min(CHUNK, numel - start)
        state = bf.QuantState(absmax=absmax[start // NF4_BLOCK:(start + n + NF4_BLOCK - 1) // NF4_BLOCK],
                              shape=torch.Size([n]), code=code, blocksize=NF4_BLOCK, quant_type="nf4",
                              dtype=dtype)
        out[start:start + n].copy_(bf.dequantize_4bit(flat[start // 2:(start + n + 1) // 2], state).reshape(-1))
    return out


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer for a weight used at once and dropped (a stand-in's forward or backward pass), reused by
    the next: a fresh weight-sized buffer every pass costs a CPU more than the dequantizing (SD1.5's 831 M quantized
    weights turned back to fp32: 1.36 s into new buffers, 0.58 s into one reused; see fp8.py for the allocator's
    side)."""
    need = numel * torch.empty(0, dtype=dtype).element_size()
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < need:
        _local.buf = buf = torch.empty(need, dtype=torch.uint8)
    return buf[:need].view(dtype)


@functools.cache
def _nf4_code(device: torch.device) -> torch.Tensor:
    return bnb_functional().get_4bit_type("nf4", device=device)

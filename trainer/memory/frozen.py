"""Frozen base layers that keep nothing for the backward pass but their weight, optionally in float8.

A frozen nn.Conv2d still keeps its input for the backward pass (only a weight gradient needs it). The
stand-ins here keep only the weight and compute the input gradient from it. Measured on an H100 that
saves little: SD1.5 512 px without checkpointing 2.82 -> 2.69 GB, and nothing with checkpointing,
which recomputes those inputs anyway. With fp8 they also store
frozen Linear and Conv2d weights as float8 e4m3 with one scale per output row, computed in bf16/fp16:
half of fp16's memory. LoRA layers, norms, embeddings and the VAE keep their own precision.

Why not diffusers' layerwise casting for fp8: its hooks cast a layer up for the forward and back down
right after, in place, while autograd still holds that weight for the backward pass. Gradients that
flow through a frozen layer to LoRA layers before it are then computed from the wrong bytes (measured
on a 2-layer toy: the LoRA gradient was off by more than its own size). Here autograd keeps the stored
tensor itself and the backward pass casts it up again: gradients are exact for the stored weights.
"""
from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

STORAGE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(STORAGE).max
# Small, sensitive layers that set the whole model's input and output scale stay in half precision.
KEEP_HALF = ("conv_in", "conv_out", "time_embedding", "add_embedding", "time_emb_proj", "norm", "embed")


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


def _weight_for(w: torch.Tensor, scale: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The stored weight in `like`'s dtype on `like`'s device, for one use: a weight streamed from host RAM (see
    freeze's `stream`) is copied to the GPU here, each pass, and dropped after."""
    return dequantize(w.to(like.device), scale, like.dtype, scratch=True)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, scale, bias):
        ctx.save_for_backward(w, scale)
        return F.linear(x, _weight_for(w, scale, x), bias)

    @staticmethod
    def backward(ctx, grad):
        w, scale = ctx.saved_tensors
        return grad @ _weight_for(w, scale, grad), None, None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, scale, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(w, scale)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, _weight_for(w, scale, x), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        w, scale = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        grad_x = torch.nn.grad.conv2d_input(shape, _weight_for(w, scale, grad), grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None, None


class _Frozen(torch.nn.Module):
    """The stored weight (half, or fp8 with `scale`) and bias of a frozen layer, computed in the autocast
    dtype (else the storage dtype). A streamed weight is a plain attribute, not a buffer, so moving the model to
    the GPU leaves it in host RAM."""

    def _store(self, layer: torch.nn.Module, compute_dtype: torch.dtype, fp8: bool, stream: bool) -> None:
        w, scale = quantize(layer.weight) if fp8 else (layer.weight.detach().to(compute_dtype), None)
        if stream:
            self.stored_weight = w
        else:
            self.register_buffer("stored_weight", w)
        self.register_buffer("scale", None if scale is None else scale.to(compute_dtype))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().to(compute_dtype))
        self.register_buffer("anchor", torch.zeros(0, dtype=compute_dtype))  # where the layer computes: moves with .to()
        self.compute_dtype = compute_dtype

    @property
    def streamed(self) -> bool:
        return "stored_weight" not in self._buffers

    @property
    def weight(self) -> torch.Tensor:  # for code that reads a layer's weight (shapes, dtype, device; DoRA's norm)
        return dequantize(self.stored_weight.to(self.anchor.device), self.scale, self.compute_dtype)

    def _inputs(self, x):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else self.compute_dtype
        return x.to(dtype), None if self.bias is None else self.bias.to(dtype)


class FrozenLinear(_Frozen):
    """Stands in for a frozen nn.Linear wherever it sat (peft's base_layer included)."""

    def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype, fp8: bool, stream: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._store(linear, compute_dtype, fp8, stream)

    def forward(self, x):
        x, bias = self._inputs(x)
        return _Linear.apply(x, self.stored_weight, self.scale, bias)


class FrozenConv2d(_Frozen):
    def __init__(self, conv: torch.nn.Conv2d, compute_dtype: torch.dtype, fp8: bool, stream: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._store(conv, compute_dtype, fp8, stream)

    def forward(self, x):
        x, bias = self._inputs(x)
        return _Conv2d.apply(x, self.stored_weight, self.scale, bias, self.stride, self.padding, self.dilation,
                             self.groups)


def _replaceable(name: str, mod: torch.nn.Module, fp8: bool, stream: bool) -> bool:
    if "lora_" in name or type(mod) not in (torch.nn.Linear, torch.nn.Conv2d) or mod.weight.requires_grad:
        return False
    if isinstance(mod, torch.nn.Conv2d) and (mod.padding_mode != "zeros" or isinstance(mod.padding, str)):
        return False
    if stream:
        return True
    if fp8:
        return not _keeps_half(name)
    return isinstance(mod, torch.nn.Conv2d)  # a frozen Linear keeps only its weight already


def _keeps_half(name: str) -> bool:
    return any(k in name for k in KEEP_HALF)


def freeze(model: torch.nn.Module, compute_dtype: torch.dtype, fp8: bool = False, stream: bool = False) -> int:
    """Replace `model`'s frozen Conv2d layers (and with fp8 or `stream` its frozen Linear layers) by stand-ins that
    keep no input for the backward pass; returns how many. With fp8 they store float8, bar KEEP_HALF's layers.
    With `stream` their weights stay in host RAM when the model moves to the GPU, and go there one layer at a
    time, for that layer's forward and backward pass: the GPU holds the activations, the LoRA and one layer.

    Why not accelerate's or diffusers' offloading: their hooks swap a parameter's data back to the CPU right after
    the forward, while autograd still holds that parameter for the backward pass, which then meets a CPU tensor
    (SimpleTuner #1975: "mat2 is on cpu" in backward; it removed diffusers' group offload in #3150), and they move
    the trained LoRA weights too. Here the backward pass copies the stored weight again itself.

    Call after LoRA injection (peft must see the original layers) and before moving to the GPU, so the
    half-precision weights never reach it."""
    if fp8 and compute_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("fp8 frozen weights compute in bf16 or fp16: set train.mixed_precision to bf16 or fp16")
    names = [name for name, mod in model.named_modules() if _replaceable(name, mod, fp8, stream)]
    for name in names:  # names, not modules: each replaced layer is freed at once, not after the last one
        parent, _, leaf = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        mod = getattr(holder, leaf)
        cls = FrozenLinear if isinstance(mod, torch.nn.Linear) else FrozenConv2d
        in_fp8 = fp8 and not _keeps_half(name)
        setattr(holder, leaf, cls(mod, compute_dtype, in_fp8, stream))
        if in_fp8:
            page_out(mod.weight)
        del mod
    if fp8 and names:
        _own_memory(model)
    return len(names)


def page_out(t: torch.Tensor) -> None:
    """Tell Linux the pages under `t` are not needed soon (madvise MADV_PAGEOUT). A base loaded from a safetensors
    file in its own dtype is a read-only map of that file: the pages fp8 has just replaced would otherwise stay
    in this process's memory until the whole map goes, so the half-precision model and its fp8 copy would peak
    together. Data is never changed: a page touched again is read back (file) or swapped in (anonymous)."""
    import sys

    if sys.platform != "linux" or t.device.type != "cpu" or t.numel() * t.element_size() < 1 << 20:
        return
    import ctypes
    import mmap

    libc = _libc()
    if libc is None:
        return
    start, size = t.data_ptr(), t.numel() * t.element_size()
    first = (start + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE  # whole pages inside the tensor only
    last = (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_PAGEOUT)


MADV_PAGEOUT = 21  # Linux 5.4+; older kernels answer EINVAL and nothing happens


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _own_memory(model: torch.nn.Module) -> None:
    """Frozen tensors fp8 left alone (norms, embeddings, KEEP_HALF layers) still point into the loaded file's
    map and keep all of it mapped; copies of them let it go."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if not t.requires_grad and t.dtype != STORAGE and t.device.type == "cpu":
                t.data = t.data.clone()


def stored_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes held by the model per dtype (parameters and buffers): what a plan promises, checked."""
    out: dict[str, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        key = str(t.dtype).replace("torch.", "")
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out

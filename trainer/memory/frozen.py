"""Frozen base layers that keep nothing for the backward pass but their weight, optionally in float8, int8 or NF4.

A frozen nn.Conv2d still keeps its input for the backward pass (only a weight gradient needs it). The
stand-ins here keep only the weight and compute the input gradient from it. Measured on an H100 that
saves little: SD1.5 512 px without checkpointing 2.82 -> 2.69 GB, and nothing with checkpointing,
which recomputes those inputs anyway. With fp8 they also store
frozen Linear and Conv2d weights as float8 e4m3 with one scale per output row, computed in bf16/fp16:
half of fp16's memory; with int8 or nf4 (QLoRA) as bitsandbytes' int8 rows or 4-bit NF4 blocks (codecs.py), a
half or a quarter of it again, computed in the run's precision (fp32 too). LoRA layers, norms, embeddings and the
VAE keep their own precision.

Why not diffusers' layerwise casting for fp8: its hooks cast a layer up for the forward and back down
right after, in place, while autograd still holds that weight for the backward pass. Gradients that
flow through a frozen layer to LoRA layers before it are then computed from the wrong bytes (measured
on a 2-layer toy: the LoRA gradient was off by more than its own size). Here autograd keeps the stored
tensor itself and the backward pass casts it up again: gradients are exact for the stored weights.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from trainer.memory import codecs
from trainer.memory.fp8 import STORAGE, dequantize, quantize  # noqa: F401 - the fp8 storage's names, as before

# Small, sensitive layers that set the whole model's input and output scale stay in half precision.
KEEP_HALF = ("conv_in", "conv_out", "time_embedding", "add_embedding", "time_emb_proj", "norm", "embed")
# int8 and nf4 also store the adaptive-norm modulation Linears (norm1.linear and the like: 28% of Flux.1, a third of
# SD 3.5 Medium), as diffusers' bitsandbytes loading does; the final norm_out's stays.
KEEP_QUANTIZED = tuple(k for k in KEEP_HALF if k != "norm") + ("norm_out",)


def _weight_for(w: torch.Tensor, scale: torch.Tensor | None, like: torch.Tensor, how: tuple,
                scratch: bool = True) -> torch.Tensor:
    """The stored weight in `like`'s dtype on `like`'s device, for one use: a weight streamed from host RAM (see
    freeze's `stream`) is copied to the GPU here, each pass, and dropped after. `how`: (storage, weight shape).
    `scratch`: the result may live in a buffer the next call overwrites (fp8 on a CPU)."""
    kind, shape = how
    w = w.to(like.device)
    if kind is None:
        return w.to(like.dtype)
    return codecs.decode(kind, w, None if scale is None else scale.to(like.device), like.dtype, shape,
                         scratch=scratch)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, scale, bias, how):
        ctx.save_for_backward(w, scale)
        ctx.how = how
        return F.linear(x, _weight_for(w, scale, x, how), bias)

    @staticmethod
    def backward(ctx, grad):
        w, scale = ctx.saved_tensors
        return grad @ _weight_for(w, scale, grad, ctx.how), None, None, None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, scale, bias, how, stride, padding, dilation, groups):
        ctx.save_for_backward(w, scale)
        ctx.conf = (x.shape, how, stride, padding, dilation, groups)
        return F.conv2d(x, _weight_for(w, scale, x, how), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        w, scale = ctx.saved_tensors
        shape, how, stride, padding, dilation, groups = ctx.conf
        grad_x = torch.nn.grad.conv2d_input(shape, _weight_for(w, scale, grad, how), grad, stride, padding, dilation,
                                            groups)
        return grad_x, None, None, None, None, None, None, None, None


class _Frozen(torch.nn.Module):
    """The stored weight (in the compute dtype, or fp8/int8/nf4 with `scale`) and bias of a frozen layer, computed in
    the autocast dtype (else the compute dtype). A streamed weight is a plain attribute, not a buffer, so moving the
    model to the GPU leaves it in host RAM."""

    def _store(self, layer: torch.nn.Module, compute_dtype: torch.dtype, store: str | None, stream: bool) -> None:
        self.store, self.weight_shape = store, tuple(layer.weight.shape)
        w, scale = codecs.encode(store, layer.weight) if store else (layer.weight.detach().to(compute_dtype), None)
        if stream:
            self.stored_weight = w
        else:
            self.register_buffer("stored_weight", w)
        # fp8's row scales in the compute dtype, as before; int8 and nf4 keep theirs in fp32 (bitsandbytes' absmax)
        self.register_buffer("scale", None if scale is None else scale.to(compute_dtype if store == "fp8" else
                                                                          torch.float32))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().to(compute_dtype))
        self.register_buffer("anchor", torch.zeros(0, dtype=compute_dtype))  # where the layer computes: moves with .to()
        self.compute_dtype = compute_dtype

    @property
    def how(self) -> tuple:
        return self.store, self.weight_shape

    @property
    def streamed(self) -> bool:
        return "stored_weight" not in self._buffers

    @property
    def weight(self) -> torch.Tensor:  # for code that reads a layer's weight (shapes, dtype, device; DoRA's norm)
        return _weight_for(self.stored_weight, self.scale, self.anchor, self.how, scratch=False)

    def _inputs(self, x):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else self.compute_dtype
        return x.to(dtype), None if self.bias is None else self.bias.to(dtype)


class FrozenLinear(_Frozen):
    """Stands in for a frozen nn.Linear wherever it sat (peft's base_layer included)."""

    def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype, store: str | None = None,
                 stream: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._store(linear, compute_dtype, store, stream)

    def forward(self, x):
        x, bias = self._inputs(x)
        return _Linear.apply(x, self.stored_weight, self.scale, bias, self.how)


class FrozenConv2d(_Frozen):
    def __init__(self, conv: torch.nn.Conv2d, compute_dtype: torch.dtype, store: str | None = None,
                 stream: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._store(conv, compute_dtype, store, stream)

    def forward(self, x):
        x, bias = self._inputs(x)
        return _Conv2d.apply(x, self.stored_weight, self.scale, bias, self.how, self.stride, self.padding,
                             self.dilation, self.groups)


def _replaceable(name: str, mod: torch.nn.Module, store: str | None, stream: bool) -> bool:
    if "lora_" in name or type(mod) not in (torch.nn.Linear, torch.nn.Conv2d) or mod.weight.requires_grad:
        return False
    if isinstance(mod, torch.nn.Conv2d) and (mod.padding_mode != "zeros" or isinstance(mod.padding, str)):
        return False
    if stream:
        return True
    if store:
        return not _kept(name, store)
    return isinstance(mod, torch.nn.Conv2d)  # a frozen Linear keeps only its weight already


def _kept(name: str, store: str) -> bool:
    """Left in the run's precision by `store`."""
    return any(k in name for k in (KEEP_HALF if store == "fp8" else KEEP_QUANTIZED))


def freeze(model: torch.nn.Module, compute_dtype: torch.dtype, store: str | None = None, stream: bool = False) -> int:
    """Replace `model`'s frozen Conv2d layers (and with a `store` or `stream` its frozen Linear layers) by stand-ins
    that keep no input for the backward pass; returns how many. With `store` ("fp8", "int8" or "nf4") they keep their
    weights in it, bar KEEP_HALF's (fp8) or KEEP_QUANTIZED's (int8, nf4) layers. With `stream` their weights stay in host RAM when the model moves to the
    GPU, and go there one layer at a time, for that layer's forward and backward pass: the GPU holds the
    activations, the LoRA and one layer (streamed in the stored form: nf4 crosses as its packed bytes).

    Why not accelerate's or diffusers' offloading: their hooks swap a parameter's data back to the CPU right after
    the forward, while autograd still holds that parameter for the backward pass, which then meets a CPU tensor
    (SimpleTuner #1975: "mat2 is on cpu" in backward; it removed diffusers' group offload in #3150), and they move
    the trained LoRA weights too. Here the backward pass copies the stored weight again itself.

    Call after LoRA injection (peft must see the original layers) and before moving to the GPU, so the
    half-precision weights never reach it. The layers are replaced one by one and each original is let go at once,
    so a base mapped from its file never sits in memory beside its whole quantized copy (see page_out)."""
    if store == "fp8" and compute_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("fp8 frozen weights compute in bf16 or fp16: set train.mixed_precision to bf16 or fp16")
    if store not in (None, *codecs.KINDS):
        raise ValueError(f"unknown frozen storage {store!r}; allowed: {', '.join(codecs.KINDS)}")
    names = [name for name, mod in model.named_modules() if _replaceable(name, mod, store, stream)]
    for name in names:  # names, not modules: each replaced layer is freed at once, not after the last one
        parent, _, leaf = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        mod = getattr(holder, leaf)
        cls = FrozenLinear if isinstance(mod, torch.nn.Linear) else FrozenConv2d
        kind = store if store and not _kept(name, store) else None
        setattr(holder, leaf, cls(mod, compute_dtype, kind, stream))
        if kind:
            page_out(mod.weight)
        del mod
    if store and names:
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
    """Frozen tensors the storage left alone (norms, embeddings, KEEP_HALF layers) still point into the loaded file's
    map and keep all of it mapped; copies of them let it go."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if not t.requires_grad and t.dtype not in (STORAGE, torch.int8, torch.uint8) and t.device.type == "cpu":
                t.data = t.data.clone()


def stored_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes held by the model per dtype (parameters and buffers): what a plan promises, checked."""
    out: dict[str, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        key = str(t.dtype).replace("torch.", "")
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out

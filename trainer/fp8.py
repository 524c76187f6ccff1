"""Frozen base weights stored in float8 (e4m3, one scale per output row), computed in bf16 or fp16.

A quarter of fp32's memory, half of fp16's, for the UNet and text encoders; the LoRA layers, norms,
embeddings and the VAE keep their own precision. Why not diffusers' layerwise casting: its hooks cast a
layer up for the forward and back down right after, in place, while autograd still holds that weight
for the backward pass. Gradients that flow through a frozen layer to LoRA layers before it are then
computed from the wrong bytes (measured on a 2-layer toy: the LoRA gradient was off by more than its
own size). Here autograd keeps the float8 tensor itself and the backward pass casts it up again, so
gradients are exact for the rounded weights and no half-precision copy outlives its matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STORAGE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(STORAGE).max
# Small, sensitive layers that set the whole model's input and output scale stay in half precision.
KEEP = ("conv_in", "conv_out", "time_embedding", "add_embedding", "time_emb_proj", "norm", "embed", "lora_")


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, per-output-row scale) with weight ≈ fp8 · scale."""
    w = weight.detach().float()
    amax = w.flatten(1).abs().amax(dim=1).clamp(min=1e-12)
    scale = (amax / FP8_MAX).reshape(-1, *([1] * (w.ndim - 1)))
    return (w / scale).to(STORAGE), scale


def dequantize(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return w8.to(dtype) * scale.to(dtype)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, scale, bias):
        ctx.save_for_backward(w8, scale)
        return F.linear(x, dequantize(w8, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        return grad @ dequantize(w8, scale, grad.dtype), None, None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, scale, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(w8, scale)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, dequantize(w8, scale, x.dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        grad_x = torch.nn.grad.conv2d_input(shape, dequantize(w8, scale, grad.dtype), grad, stride, padding,
                                            dilation, groups)
        return grad_x, None, None, None, None, None, None, None


class Fp8Linear(torch.nn.Module):
    """A frozen nn.Linear held in float8; stands in for it wherever it sat (peft's base_layer included)."""

    def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w8, scale = quantize(linear.weight)
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("scale", scale.to(compute_dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(compute_dtype))

    @property
    def weight(self) -> torch.Tensor:  # for code that reads a layer's weight (shapes, dtype, device)
        return dequantize(self.weight_fp8, self.scale, self.scale.dtype)

    def forward(self, x):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else self.scale.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return _Linear.apply(x.to(dtype), self.weight_fp8, self.scale, bias)


class Fp8Conv2d(torch.nn.Module):
    def __init__(self, conv: torch.nn.Conv2d, compute_dtype: torch.dtype):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("only zero-padded convolutions with numeric padding are stored in fp8")
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        w8, scale = quantize(conv.weight)
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("scale", scale.to(compute_dtype))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().to(compute_dtype))

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.weight_fp8, self.scale, self.scale.dtype)

    def forward(self, x):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else self.scale.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return _Conv2d.apply(x.to(dtype), self.weight_fp8, self.scale, bias, self.stride, self.padding, self.dilation,
                             self.groups)


def store_fp8(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every frozen Linear and Conv2d of `model` (bar KEEP) by its float8 stand-in; returns how many.
    Call after LoRA injection (peft must see the original layers) and before moving to the GPU, so the
    full-precision weights never reach it."""
    if compute_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("fp8 frozen weights compute in bf16 or fp16: set train.mixed_precision to bf16 or fp16")
    swaps = []
    for name, mod in model.named_modules():
        if any(k in name for k in KEEP) or type(mod) not in (torch.nn.Linear, torch.nn.Conv2d):
            continue
        if mod.weight.requires_grad:
            continue
        if isinstance(mod, torch.nn.Conv2d) and (mod.padding_mode != "zeros" or isinstance(mod.padding, str)):
            continue
        swaps.append((name, mod))
    for name, mod in swaps:
        parent, _, leaf = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        new = Fp8Linear(mod, compute_dtype) if isinstance(mod, torch.nn.Linear) else Fp8Conv2d(mod, compute_dtype)
        setattr(holder, leaf, new)
    return len(swaps)


def stored_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes held by the model per dtype (parameters and buffers): what a plan promises, checked."""
    out: dict[str, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        key = str(t.dtype).replace("torch.", "")
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out

"""Frozen stand-in layers: in half precision they equal nn.Conv2d and keep less for the backward pass;
in float8 they give exact gradients for the rounded weights, runs store what they promise, and a LoRA
trained over an fp8 base loads fully into the full-precision base."""
import copy
import math

import pytest
import torch

from tests.conftest import tiny_config
from trainer.lora import adapters
from trainer.memory import frozen
from trainer.errors import TrainingError
from trainer.training.events import read_events
from trainer.lora.read import read_lora
from trainer.training.loop import train
from trainer.models import load_base


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_outputs_and_input_gradients_equal_a_half_layer_with_the_rounded_weights(kind):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32) if kind == "linear" else torch.nn.Conv2d(8, 16, 3, padding=1, stride=2)
    layer.requires_grad_(False)
    stored = (frozen.FrozenLinear if kind == "linear" else frozen.FrozenConv2d)(layer, torch.bfloat16, store="fp8")
    assert stored.stored_weight.dtype == torch.float8_e4m3fn
    rel = (layer.weight - stored.weight.float()).abs().amax() / layer.weight.abs().amax()
    assert 0 < rel < 0.07  # e4m3 keeps 3 mantissa bits; the per-row scale uses its whole range
    ref = copy.deepcopy(layer).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(stored.weight)
    x = torch.randn(4, 64) if kind == "linear" else torch.randn(2, 8, 11, 11)
    results = []
    for module in (ref, stored):
        xi = x.to(torch.bfloat16).requires_grad_(True)
        y = module(xi)
        y.float().pow(2).sum().backward()
        results.append((y.detach(), xi.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_upcast_equals_torchs_float8_conversion_for_every_byte_and_scale(dtype):
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = ~codes.float().isnan()
    assert torch.equal(frozen.dequantize(codes, None, dtype)[finite], codes.to(dtype)[finite])
    torch.manual_seed(0)  # a weight with rows of very different sizes, subnormal codes among them
    weight = torch.randn(64, 48) * torch.logspace(-6, 1, 64)[:, None]
    weight[:, :8] *= 1e-5  # below e4m3's smallest normal once scaled to the row's largest
    stored, scale = frozen.quantize(weight)
    scale = scale.to(dtype)
    assert ((stored.view(torch.uint8) & 0x78) == 0).any()  # exponent bits 0: subnormal codes are covered
    assert torch.equal(frozen.dequantize(stored, scale, dtype), stored.to(dtype) * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_conv_stand_in_equals_the_conv_and_keeps_no_input(dtype):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).to(dtype).requires_grad_(False)
    stand_in = frozen.FrozenConv2d(conv, dtype)
    x = torch.randn(2, 16, 24, 24, dtype=dtype)
    results, kept = [], []
    for module in (conv, stand_in):
        xi = x.clone().requires_grad_(True)
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = module(xi)
        y.float().pow(2).sum().backward()
        results.append((y.detach(), xi.grad))
        kept.append(total[0])
    assert torch.allclose(results[0][0], results[1][0]) and torch.allclose(results[0][1], results[1][1], rtol=1e-3, atol=1e-3)
    weight_bytes = conv.weight.numel() * conv.weight.element_size()
    assert kept[0] >= x.numel() * x.element_size() and kept[1] <= weight_bytes  # the conv keeps its input


def test_stand_ins_change_memory_not_the_trained_lora(tiny_models, dataset, tmp_path, monkeypatch):
    sets = {"train.max_steps": 3, "sample.at_end": False, "lora.unet_extra": ["conv"]}
    first = train(tiny_config(tiny_models["sd1"], dataset, tmp_path / "a", **sets))
    assert any(isinstance(m, frozen.FrozenConv2d) for m in first.models["lora_unet"].modules())
    monkeypatch.setattr(frozen, "freeze", lambda *a, **k: 0)
    second = train(tiny_config(tiny_models["sd1"], dataset, tmp_path / "b", **sets))
    assert not any(isinstance(m, frozen.FrozenConv2d) for m in second.models["lora_unet"].modules())
    a, b = read_lora(first.lora_path).modules, read_lora(second.lora_path).modules
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].up.float(), b[k].up.float(), atol=1e-4), k


def test_fp8_run_stores_what_it_promises_and_its_lora_loads_into_the_full_base(tiny_models, dataset, tmp_path):
    cfg = tiny_config(tiny_models["sd1"], dataset, tmp_path / "run", **{
        "train.frozen_dtype": "fp8", "train.mixed_precision": "bf16", "lora.train_text_encoder": True,
        "train.max_steps": 4, "train.gradient_checkpointing": True, "sample.at_end": False})
    result = train(cfg)
    for prefix, model in result.models.items():
        frozen_half = [n for n, m in model.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)
                       and not m.weight.requires_grad and "lora_" not in n and not any(k in n for k in frozen.KEEP_HALF)]
        assert frozen_half == [], f"{prefix} kept {frozen_half[:3]} in half precision"
        assert sum(isinstance(m, (frozen.FrozenLinear, frozen.FrozenConv2d)) for m in model.modules()) > 0
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
        assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    unet_bytes = frozen.stored_bytes(result.models["lora_unet"])
    assert unet_bytes["float8_e4m3fn"] > 3 * unet_bytes.get("bfloat16", 0)  # the frozen bulk is fp8
    losses = [e["loss"] for e in read_events(tmp_path / "run") if e["type"] == "step"]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)

    full = load_base(str(tiny_models["sd1"]))  # fp32, never quantized
    models = {"lora_unet": full.unet, "lora_te": full.text_encoders[0]}
    placed = adapters.load(models, read_lora(result.lora_path), "fp8run")  # raises if any module has no layer
    assert placed["lora_unet"] > 0 and placed["lora_te"] > 0


def test_fp8_without_half_precision_is_refused(tiny_models, dataset, tmp_path):
    cfg = tiny_config(tiny_models["sd1"], dataset, tmp_path / "run", **{"train.frozen_dtype": "fp8"})
    with pytest.raises(TrainingError, match="train.mixed_precision=bf16"):
        train(cfg)


@pytest.mark.parametrize("fp8", [False, True])
def test_streamed_weights_are_no_buffers_and_give_the_same_outputs_and_gradients(fp8):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 5))
    model.requires_grad_(False).to(torch.bfloat16)  # as the loop loads a base: in the weight dtype
    kept, streamed = copy.deepcopy(model), copy.deepcopy(model)
    assert frozen.freeze(kept, torch.bfloat16, store="fp8" if fp8 else None) == (2 if fp8 else 1)
    assert frozen.freeze(streamed, torch.bfloat16, store="fp8" if fp8 else None, stream=True) == 2  # every frozen Linear and Conv2d
    layers = [m for m in streamed.modules() if isinstance(m, (frozen.FrozenLinear, frozen.FrozenConv2d))]
    assert all(m.streamed for m in layers)
    # Module.to() moves parameters and buffers only: a weight that is neither stays in host RAM.
    held = {id(t) for t in (*streamed.parameters(), *streamed.buffers())}
    assert not any(id(m.stored_weight) in held for m in layers)
    assert layers[0].stored_weight.dtype == (torch.float8_e4m3fn if fp8 else torch.bfloat16)
    x = torch.randn(3, 4, 6, 6, dtype=torch.bfloat16)
    outs = []
    for m in (kept, streamed):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.float().pow(2).sum().backward()
        outs.append((y.detach(), xi.grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_an_offloaded_run_streams_every_frozen_unet_layer_and_trains_the_same_lora(tiny_models, dataset, tmp_path):
    sets = {"train.max_steps": 3, "sample.at_end": False, "train.mixed_precision": "bf16",
            "train.frozen_dtype": "fp8", "train.gradient_checkpointing": True}
    plain = train(tiny_config(tiny_models["sd1"], dataset, tmp_path / "a", **sets))
    offloaded = train(tiny_config(tiny_models["sd1"], dataset, tmp_path / "b", **sets, **{"train.offload": True}))
    unet = offloaded.models["lora_unet"]
    left = [n for n, m in unet.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)
            and not m.weight.requires_grad and "lora_" not in n]
    assert left == [] and all(m.streamed for m in unet.modules() if isinstance(m, frozen.FrozenLinear))
    warned = [e["message"] for e in read_events(tmp_path / "b") if e["type"] == "warning"]
    assert any("train.offload" in w and "changes nothing" in w for w in warned)  # a CPU has nothing to offload to
    a, b = read_lora(plain.lora_path).modules, read_lora(offloaded.lora_path).modules
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].up.float(), b[k].up.float(), atol=1e-4, rtol=1e-3)

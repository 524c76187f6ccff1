"""QLoRA: frozen weights stored as bitsandbytes' int8 rows or NF4 blocks (train.frozen_dtype int8 / nf4). The stand-ins
give gradients exact for the stored weights, a run stores what it promises in fp32 compute on a CPU, its LoRA is an
ordinary LoRA for the full-precision base, and the estimator, planner and tiers count the stored bytes."""
import copy
import math

import pytest
import torch

from tests.conftest import tiny_config
from trainer.config import ConfigError, RunConfig
from trainer.errors import TrainingError
from trainer.lora import adapters
from trainer.lora.read import read_lora
from trainer.memory import codecs, estimate, frozen
from trainer.memory.plan import budget_for, make_plan
from trainer.models import load_base, tiny
from trainer.training.events import read_events
from trainer.training.loop import train


@pytest.mark.parametrize("kind,bound", [("int8", 0.01), ("nf4", 0.12)])
def test_codecs_round_trip_any_shape_within_their_precision_and_take_their_bytes(kind, bound):
    torch.manual_seed(0)
    for shape in ((96, 64), (16, 8, 3, 3)):  # a Linear's weight and a Conv2d's
        w = torch.randn(shape) * torch.logspace(-3, 0, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
        stored, scale = codecs.encode(kind, w)
        back = codecs.decode(kind, stored, scale, torch.float32, w.shape)
        assert back.shape == w.shape and back.dtype == torch.float32
        assert ((back - w).norm() / w.norm()) < bound  # NF4: ~9% on Gaussian weights; int8 rows: <1%
        nbytes = stored.numel() * stored.element_size() + scale.numel() * scale.element_size()
        if kind == "nf4":
            assert stored.dtype == torch.uint8 and nbytes == w.numel() * codecs.BYTES["nf4"]
        else:
            assert stored.dtype == torch.int8 and nbytes == w.numel() + 4 * shape[0]
        for dtype in (torch.bfloat16, torch.float16):
            assert codecs.decode(kind, stored, scale, dtype, w.shape).dtype == dtype
        # the reused-buffer path a CPU pass takes gives bitsandbytes' own dequantized weight
        torch.testing.assert_close(codecs.decode(kind, stored, scale, torch.float32, w.shape, scratch=True), back,
                                   rtol=1e-6, atol=1e-7)
    assert estimate.STORED_BYTES["nf4"] == codecs.BYTES["nf4"]


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_stand_in_outputs_and_gradients_equal_the_layer_with_the_stored_weights(kind, layer):
    """In fp32: what reaches LoRA layers before a quantized layer is the exact gradient through the weights it stores."""
    torch.manual_seed(0)
    mod = torch.nn.Linear(128, 64) if layer == "linear" else torch.nn.Conv2d(64, 32, 3, padding=1, stride=2)
    mod.requires_grad_(False)
    stand_in = (frozen.FrozenLinear if layer == "linear" else frozen.FrozenConv2d)(mod, torch.float32, store=kind)
    ref = copy.deepcopy(mod)
    with torch.no_grad():
        ref.weight.copy_(stand_in.weight)
    assert not torch.equal(ref.weight, mod.weight)  # it was quantized
    x = torch.randn(4, 128) if layer == "linear" else torch.randn(2, 64, 9, 9)
    outs = []
    for m in (ref, stand_in):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.pow(2).sum().backward()
        outs.append((y.detach(), xi.grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_streamed_quantized_weights_stay_packed_off_the_buffers(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 5))
    model.requires_grad_(False)
    kept, streamed = copy.deepcopy(model), copy.deepcopy(model)
    frozen.freeze(kept, torch.float32, store=kind)
    frozen.freeze(streamed, torch.float32, store=kind, stream=True)
    layers = [m for m in streamed.modules() if isinstance(m, (frozen.FrozenLinear, frozen.FrozenConv2d))]
    held = {id(t) for t in (*streamed.parameters(), *streamed.buffers())}
    assert layers and all(m.streamed and id(m.stored_weight) not in held for m in layers)
    assert {m.stored_weight.dtype for m in layers} == {torch.uint8 if kind == "nf4" else torch.int8}
    x = torch.randn(3, 4, 6, 6)
    torch.testing.assert_close(kept(x), streamed(x), rtol=0, atol=0)


def test_int8_and_nf4_quantize_the_modulation_linears_fp8_keeps(tmp_path):
    """Flux's norm1.linear (28% of Flux.1) stays half under fp8; int8 and nf4 store it, as diffusers' bitsandbytes
    loading does. The shares the estimator uses are these rules counted on the full-size architectures."""
    base = load_base(str(tiny.build_pipeline("flux", tmp_path / "flux", seed=0)))
    for store, kept_norm in (("fp8", True), ("nf4", False)):
        model = copy.deepcopy(base.unet).requires_grad_(False)
        frozen.freeze(model, torch.bfloat16, store=store)
        layer = model.transformer_blocks[0].norm1.linear
        assert (type(layer) is torch.nn.Linear) == kept_norm, store  # kept: left as it was, in the run's precision
        if not kept_norm:
            assert isinstance(layer, frozen.FrozenLinear) and layer.store == "nf4"
        assert type(model.norm_out.linear) is torch.nn.Linear  # the last layer stays in the run's precision
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        flux = FluxTransformer2DModel(guidance_embeds=True)
    total = sum(p.numel() for p in flux.parameters())
    for store, rule in (("fp8", "fp8"), ("nf4", "quantized")):
        stored = sum(m.weight.numel() for n, m in flux.named_modules()
                     if type(m) is torch.nn.Linear and not frozen._kept(n, store))
        assert abs((1 - stored / total) - estimate.KEPT_SHARE[rule]["flux"]) < 0.001


def test_an_nf4_run_in_fp32_stores_4_bits_trains_and_its_lora_is_for_the_full_base(tiny_models, dataset, tmp_path):
    sets = {"lora.train_text_encoder": True, "train.max_steps": 6, "sample.at_end": False, "optim.lr": 3e-3}
    plain = train(tiny_config(tiny_models["sd1"], dataset, tmp_path / "fp32", **sets))
    q = train(tiny_config(tiny_models["sd1"], dataset, tmp_path / "nf4", **sets, **{"train.frozen_dtype": "nf4"}))
    for prefix, model in q.models.items():
        left = [n for n, m in model.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)
                and not m.weight.requires_grad and "lora_" not in n and not frozen._kept(n, "nf4")]
        assert left == [], f"{prefix} left {left[:3]} unquantized"
        assert all(p.dtype == torch.float32 and p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    unet_bytes = frozen.stored_bytes(q.models["lora_unet"])
    assert unet_bytes["uint8"] * 2 > 0.9 * sum(m.weight.numel() for m in plain.models["lora_unet"].modules()
                                               if isinstance(m, torch.nn.Conv2d))  # the packed bulk
    events = read_events(tmp_path / "nf4")
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert any("nf4 copy of the base" in e["message"] for e in events if e["type"] == "warning")
    # An ordinary LoRA: the same modules as the fp32 run's, all of them placed on the full-precision base, and an
    # update near the fp32-trained one (the base it saw differed by NF4's rounding only).
    a, b = read_lora(plain.lora_path).modules, read_lora(q.lora_path).modules
    assert a.keys() == b.keys()
    full = load_base(str(tiny_models["sd1"]))
    models = {"lora_unet": full.unet, "lora_te": full.text_encoders[0]}
    placed = adapters.load(models, read_lora(q.lora_path), "nf4run")
    assert placed["lora_unet"] == sum(k.startswith("lora_unet") for k in b) and placed["lora_te"] > 0
    other = train(tiny_config(tiny_models["sd1"], dataset, tmp_path / "seed", **sets, **{"train.seed": 43}))
    c = read_lora(other.lora_path).modules

    def delta(m):
        return torch.cat([(m[k].up.float() @ m[k].down.float().flatten(1)).flatten() for k in a])

    # The tiny model's random weights make NF4's rounding large (its layers compound it): the nf4-trained update
    # still lies nearer the fp32 one than another seed's fp32 update does.
    assert 0 < (delta(a) - delta(b)).norm() < 0.9 * (delta(a) - delta(c)).norm()


def test_bad_storages_fail_before_loading_with_the_setting_that_works(tiny_models, dataset, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="frozen_dtype.*nf5.*auto, fp8, int8, nf4"):
        RunConfig.load(overrides=["train.frozen_dtype=nf5"])

    def broken(*a, **k):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(codecs, "encode", broken)
    loaded = []
    monkeypatch.setattr("trainer.training.setup.load_base", lambda *a, **k: loaded.append(a))
    cfg = tiny_config(tiny_models["sd1"], dataset, tmp_path / "run", **{"train.frozen_dtype": "nf4"})
    with pytest.raises(TrainingError, match=r"train.frozen_dtype=nf4 does not run on this cpu .*set "
                                            r"train.frozen_dtype=fp8 \(with bf16\) or auto") as e:
        train(cfg)
    assert "\n" not in str(e.value) and loaded == []  # one line, and nothing loaded; never a silent fp32 run


def test_without_bitsandbytes_the_line_says_what_to_install_or_set(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_bnb(name, *a, **k):
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real(name, *a, **k)

    codecs.bnb_functional.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_bnb)
    try:
        with pytest.raises(codecs.CodecError, match="pip install bitsandbytes, or set train.frozen_dtype to fp8"):
            codecs.check("nf4", torch.device("cpu"))
    finally:
        codecs.bnb_functional.cache_clear()


def _cfg(family, **sets):
    return RunConfig.load(overrides=[f"model.family={family}", "train.mixed_precision=bf16",
                                     *[f"{k}={v}" for k, v in sets.items()]])


def test_the_estimate_counts_stored_bytes_and_hits_the_issue_targets():
    common = dict(**{"data.resolution": 1024, "train.gradient_checkpointing": "true", "lora.rank": 16,
                     "lora.alpha": 16, "data.cache_ahead": "false", "optim.optimizer": "adamw8bit"})
    peaks = {store: estimate.estimate(_cfg("flux", **common, **{"train.frozen_dtype": store}), host=False).peak_gb
             for store in ("auto", "fp8", "int8", "nf4")}
    assert peaks["nf4"] < peaks["int8"] < peaks["fp8"] < peaks["auto"]
    assert peaks["nf4"] <= 8.0  # Flux.1-dev 1024 px, rank 16, no streaming
    streamed = estimate.estimate(_cfg("flux", **common, **{"train.frozen_dtype": "nf4", "train.offload": "true"}),
                                 host=False).peak_gb
    assert streamed <= 5.0
    assert estimate.estimate(_cfg("zimage", **common, **{"train.frozen_dtype": "nf4"}), host=False).peak_gb <= 6.0
    assert estimate.estimate(_cfg("sdxl", **common, **{"train.frozen_dtype": "nf4"}), host=False).peak_gb <= 3.5
    # nf4 in fp32 compute counts (fp8 there is not a stored form: it needs half precision)
    fp32 = RunConfig.load(overrides=["model.family=sd1", "train.frozen_dtype=nf4"])
    assert estimate.stored_as(fp32) == "nf4"
    assert estimate.stored_as(RunConfig.load(overrides=["model.family=sd1", "train.frozen_dtype=fp8"])) is None


def test_the_planner_takes_nf4_where_fp8_would_stream_and_never_two_storages(monkeypatch):
    plan = make_plan(_cfg("flux"), budget_for(12, ram_gb=64))
    assert plan.fits and "train.frozen_dtype=nf4" in plan.overrides and "train.offload=true" not in plan.overrides
    for gb in (6, 8, 12, 16, 24):
        for family in ("flux", "zimage", "sdxl", "sd1"):
            chosen = make_plan(_cfg(family), budget_for(gb, ram_gb=64)).overrides
            assert sum(o.startswith("train.frozen_dtype=") for o in chosen) <= 1, (family, gb, chosen)
    # a CPU without fast bf16 trains in fp32, where int8/nf4 compute too (fp8 would need bf16)
    monkeypatch.setenv("LORA_STUDIO_CPU_BF16", "slow")
    cpu = make_plan(RunConfig.load(overrides=["model.family=sdxl", "data.resolution=1024"]),
                    budget_for(None, ram_gb=12))
    assert cpu.fits and any(o in cpu.overrides for o in ("train.frozen_dtype=nf4", "train.frozen_dtype=int8"))


def test_the_vram_tiers_say_what_they_use_and_fit_by_the_estimate():
    from trainer.presets import resolve

    for family, tiers in (("flux", {6: ("nf4", True), 8: ("nf4", True), 12: ("nf4", False), 16: ("int8", False)}),
                          ("zimage", {6: ("nf4", False), 8: ("nf4", False)})):
        for gb, (store, streamed) in tiers.items():
            cfg = RunConfig.load(resolve("character", family=family, vram=gb), overrides=[f"model.family={family}"])
            assert (cfg.train.frozen_dtype, cfg.train.offload) == (store, streamed), (family, gb)
            assert estimate.estimate(cfg, host=False).peak_gb <= budget_for(gb).usable_gb, (family, gb)


def test_the_train_tab_shows_what_a_run_says_about_itself(tmp_path):
    """The nf4 run's note (samples on the 4-bit copy) and other warnings reached only events.jsonl: the run's state
    on the Train tab now carries each once, the first three, and how many more."""
    import json

    from app import jobs
    from app.context import Ctx
    from app.handlers.train import TrainHandlers
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    run = ws.runs / "r"
    run.mkdir(parents=True)
    notes = ["samples and validation render on the nf4 copy of the base", "skipped a.png: too small",
             "skipped b.png: too small", "skipped c.png: too small"]
    lines = [{"type": "warning", "message": m, "time": 1} for m in [notes[0], *notes]] + \
        [{"type": "done", "path": "x", "step": 3, "time": 2}]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines), encoding="utf-8")
    (run / "job.json").write_text(json.dumps({"state": "finished"}), encoding="utf-8")
    assert jobs.view(run).notes == notes  # each once, in order
    state = TrainHandlers(Ctx(ws, jobs.JobRunner(ws.runs))).refresh("r", None)[0]
    assert state.count("Note: ") == 3 and "Note: samples and validation render on the nf4 copy" in state
    assert "Note: skipped c.png" not in state and "(and 1 more in the run's events.jsonl)" in state


def test_bench_qlora_writes_its_sections_from_what_it_measured_and_keeps_the_parts_it_did_not_run(tmp_path):
    """Each part replaces its own section of bench/results.md and its entry in the measurements file; the other
    parts' sections stay, bench speed keeps them, and --report renders them again from the file alone."""
    import json

    from trainer.bench import qlora_report, sections

    md, saved = tmp_path / "results.md", tmp_path / "qlora.json"
    md.write_text("# Benchmark results\n\n## Summary\n\nspeed's own\n", encoding="utf-8")
    step = {"steps": [{"model": "sd15", "resolution": 64, "store": "auto", "peak_gb": 5.2, "step_s": 1.2,
                       "estimate_gb": 4.0, "error": "", "peak_vs_fp32": 1.0, "step_vs_fp32": 1.0},
                      {"model": "sd15", "resolution": 64, "store": "nf4", "peak_gb": 2.1, "step_s": 1.9,
                       "estimate_gb": 2.3, "error": "", "peak_vs_fp32": 0.41, "step_vs_fp32": 1.54}]}
    weights = {"kept_share": {"flux": {"params_m": 11901.4, "fp8": 0.2768, "quantized": 0.0056}}, "blocks": []}
    assert qlora_report.write(weights, md, saved) == ["QLoRA: stored weights"]
    assert qlora_report.write(step, md, saved) == ["QLoRA: step"]
    text = md.read_text(encoding="utf-8")
    assert "speed's own" in text and "| flux | 11901.4 | 0.2768 | 0.0056 |" in text
    assert "| sd15 | 64 | nf4 | 2.1 | 0.41 | 1.9 | 1.54 | 2.3 |" in text and "| sd15 | 64 | fp32 | 5.2 |" in text
    assert set(json.loads(saved.read_text(encoding="utf-8"))) == {"weights", "step"}
    kept = sections.kept_sections(md)
    assert "## QLoRA: step" in kept and "## QLoRA: stored weights" in kept and "speed's own" not in kept
    again = tmp_path / "again.md"
    assert qlora_report.render(json.loads(saved.read_text(encoding="utf-8")), again) == \
        ["QLoRA: stored weights", "QLoRA: step"]
    assert "| sd15 | 64 | nf4 | 2.1 |" in again.read_text(encoding="utf-8")

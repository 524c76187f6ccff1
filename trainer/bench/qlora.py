"""`lora-studio bench qlora`: what a quantized frozen base (train.frozen_dtype int8 / nf4) saves and what it costs.

- weights: one block of Flux.1 (double and single) and of Z-Image at full width, random bf16 weights, frozen by the
  trainer's own stand-ins in each storage: the stored bytes, measured, scaled to the published depths; and the share
  each storage leaves in the run's precision, counted on the whole architectures (the estimator's KEPT_SHARE).
- step: the full-size SD1.5 architecture (random weights, the real loader and loop, each row a process of its own)
  one 64 px step per storage: peak RSS and step time; fp32 frozen weights against int8 and nf4 (which compute in
  fp32 here too) and fp8 (which computes in bf16). On CUDA the same rows measure the card.
- quality: each preset of the embedded model trained with the same seed and data in fp32 and on an nf4 (and int8)
  base, each LoRA scored on the full-precision base (as users apply it), a second fp32 seed for the noise; the
  distance between the fp32- and nf4-trained LoRAs' images on the full-precision base against the LoRA's own effect;
  and the nf4 LoRA scored on the nf4 base too (what the trainer's samples show) against the full-precision base.
Each part replaces its section of bench/results.md (bench/qlora_report.py). The last line is one JSON object."""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

STORES = ("auto", "fp8", "int8", "nf4")
DEPTH = {"flux": {"double": 19, "single": 38}, "zimage": {"layer": 34}}


def kept_shares() -> dict:
    """Share of each published denoiser the stored forms leave in the run's precision (counted on the meta device)."""
    import torch

    from trainer.memory import frozen

    from .fullsize import SD15_UNET, SD35M_TRANSFORMER, SDXL_UNET

    from diffusers import (FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel,
                           ZImageTransformer2DModel)

    makers = {"sd1": lambda: UNet2DConditionModel(**SD15_UNET), "sdxl": lambda: UNet2DConditionModel(**SDXL_UNET),
              "sd3": lambda: SD3Transformer2DModel(**SD35M_TRANSFORMER),
              "flux": lambda: FluxTransformer2DModel(guidance_embeds=True), "zimage": ZImageTransformer2DModel}
    out = {}
    with torch.device("meta"):
        for family, make in makers.items():
            model = make()
            total = sum(p.numel() for p in model.parameters())
            row = {}
            for store in ("fp8", "nf4"):
                stored = sum(m.weight.numel() for name, m in model.named_modules()
                             if type(m) in (torch.nn.Linear, torch.nn.Conv2d) and not frozen._kept(name, store))
                row["fp8" if store == "fp8" else "quantized"] = round(1 - stored / total, 4)
            out[family] = {"params_m": round(total / 1e6, 1), **row}
            del model
    return out


def block_weights() -> list[dict]:
    """One full-width block per kind, frozen in each storage: bytes measured, scaled to the published depth."""
    import torch

    from trainer.memory import frozen

    from diffusers import FluxTransformer2DModel, ZImageTransformer2DModel

    rows = []
    for family, kinds in DEPTH.items():
        for kind, depth in kinds.items():
            for store in STORES:
                torch.manual_seed(0)
                if family == "flux":
                    with torch.device("meta"):
                        model = FluxTransformer2DModel(num_layers=1 if kind == "double" else 0,
                                                       num_single_layers=1 if kind == "single" else 0)
                    blocks = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
                else:
                    with torch.device("meta"):
                        model = ZImageTransformer2DModel(n_layers=1, n_refiner_layers=0)
                    blocks = "layers"
                block = getattr(model, blocks)[0].to_empty(device="cpu").to(torch.bfloat16)
                with torch.no_grad():
                    for p in block.parameters():
                        p.normal_(0, 0.02)
                block.requires_grad_(False)
                params = sum(p.numel() for p in block.parameters())
                if store != "auto":
                    frozen.freeze(block, torch.bfloat16, store=store)
                stored = sum(frozen.stored_bytes(block).values())
                rows.append({"family": family, "block": kind, "store": store, "params_m": round(params / 1e6, 1),
                             "block_mb": round(stored / 2**20, 1), "bytes_per_weight": round(stored / params, 4),
                             "depth": depth, "all_blocks_gb": round(stored * depth / 2**30, 2)})
                print(f"{family} {kind} block in {store}: {stored / 2**20:.1f} MB ({stored / params:.3f} B a weight);"
                      f" x{depth} = {stored * depth / 2**30:.2f} GB", flush=True)
                del model, block
    return rows


def steps(models_dir: Path | None = None) -> list[dict]:
    """Full-size SD1.5 at 64 px and the embedded model, one row per storage (speed.py's measured processes)."""
    from .speed import Setting, run

    settings = []
    for model, res, n in (("sd15", 64, 3), ("tiny", 64, 10)):
        for store in STORES:
            settings.append(Setting(model, res, False, True, False, steps=n, warmup=1, floor=False,
                                    fp8=store == "fp8", frozen=store if store in ("int8", "nf4") else "",
                                    compute="bf16" if store == "fp8" else "no"))
    result = run(settings=settings, models_dir=models_dir, ablations=False)
    rows = []
    for m in result["results"]:
        s = m.setting
        store = "fp8" if s.fp8 else s.frozen or "auto"
        rows.append({"model": s.model, "resolution": s.resolution, "store": store, "peak_gb": round(m.peak_gb, 3),
                     "step_s": None if m.step_s is None else round(m.step_s, 3), "estimate_gb": m.estimate_gb,
                     "error": m.error})
    for model in ("sd15", "tiny"):
        ref = next((r for r in rows if r["model"] == model and r["store"] == "auto" and r["step_s"]), None)
        for r in rows:
            if ref and r["model"] == model and r["step_s"]:
                r["peak_vs_fp32"] = round(r["peak_gb"] / ref["peak_gb"], 3)
                r["step_vs_fp32"] = round(r["step_s"] / ref["step_s"], 3)
    return rows


QUALITY_RUNS = {"fp32": [], "fp32 seed 43": ["train.seed=43"], "int8": ["train.frozen_dtype=int8"],
                "nf4": ["train.frozen_dtype=nf4"]}


def quality(kinds=("character", "style", "concept"), overrides: list[str] = ()) -> dict:
    """Each preset trained per QUALITY_RUNS on the embedded model; scores on the full-precision base."""
    import numpy as np

    from trainer.lora import adapters
    from trainer.lora.read import read_lora

    from ..world.learn import EVAL, SAMPLE_DATASETS, evaluate, generate, learn_file, load_pipeline, trigger_prompts

    pipe = load_pipeline()
    out = {}
    with tempfile.TemporaryDirectory(prefix="lora-studio-qlora-") as tmp:
        for kind in kinds:
            dataset = SAMPLE_DATASETS / kind
            files, scores = {}, {}
            for label, extra in QUALITY_RUNS.items():
                path, seconds, _ = learn_file(kind, Path(tmp) / label.replace(" ", "-"), overrides=[*overrides, *extra])
                base, lora, drift = evaluate(pipe, kind, path, dataset)
                files[label] = path
                scores[label] = {"score": round(lora, 4), "drift": round(drift, 4), "seconds": seconds}
                print(f"{kind:10s} {label:13s} score {base:.3f} -> {lora:.3f}   drift {drift:.3f}   {seconds:.0f} s",
                      flush=True)
            prompts = trigger_prompts(kind, EVAL["prompts"])
            args = (EVAL["seed"], EVAL["steps"], EVAL["guidance"])
            images = {"base": generate(pipe, prompts, *args)}
            models = {"lora_unet": pipe.unet, "lora_te": pipe.text_encoder}
            for label in ("fp32", "fp32 seed 43", "nf4"):
                adapters.load(models, read_lora(files[label]), label)
                adapters.mix(models, {label: {prefix: 1.0 for prefix in models}})
                try:
                    images[label] = generate(pipe, prompts, *args)
                finally:
                    adapters.remove(models, label)

            def distance(a, b):
                return float(np.mean([np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean() / 255
                                      for x, y in zip(images[a], images[b])]))

            effect, gap, seeds = distance("base", "fp32"), distance("fp32", "nf4"), distance("fp32", "fp32 seed 43")
            # What the trainer's samples show: the nf4 LoRA on the nf4 copy of the base it trained on (LoRA first,
            # then the stand-ins under peft's layers, as a run builds it).
            on_nf4 = _score_on_quantized(kind, files["nf4"], dataset, prompts, args)
            references = [p for p in sorted(dataset.glob("*.png"))]
            noise = abs(scores["fp32"]["score"] - scores["fp32 seed 43"]["score"])
            out[kind] = {**scores, "seed_noise": round(noise, 4),
                         "nf4_vs_fp32": round(scores["nf4"]["score"] / scores["fp32"]["score"], 4)
                         if scores["fp32"]["score"] else None,
                         "int8_vs_fp32": round(scores["int8"]["score"] / scores["fp32"]["score"], 4)
                         if scores["fp32"]["score"] else None,
                         "image_distance_fp32_nf4": round(gap, 4), "image_distance_seeds": round(seeds, 4),
                         "lora_effect": round(effect, 4),
                         "nf4_score_on_nf4_base": round(on_nf4, 4), "references": len(references)}
            print(f"{kind:10s} nf4/fp32 score {out[kind]['nf4_vs_fp32']}, int8/fp32 {out[kind]['int8_vs_fp32']} "
                  f"(seeds differ by {noise:.3f}); images fp32 vs nf4 LoRA differ {gap:.4f} (two fp32 seeds "
                  f"{seeds:.4f}) against the LoRA's own effect {effect:.4f}; the nf4 LoRA scores {on_nf4:.3f} on the nf4 base (as its samples show) and "
                  f"{scores['nf4']['score']:.3f} on the full one", flush=True)
    return out


def _score_on_quantized(kind: str, lora_file: Path, dataset: Path, prompts: list[str], args) -> float:
    import torch
    from PIL import Image

    from trainer.lora import adapters
    from trainer.lora.read import read_lora
    from trainer.memory import frozen

    from ..world import score
    from ..world.learn import generate, load_pipeline

    pipe = load_pipeline()
    models = {"lora_unet": pipe.unet.requires_grad_(False), "lora_te": pipe.text_encoder.requires_grad_(False)}
    adapters.load(models, read_lora(lora_file), "q")
    adapters.mix(models, {"q": {prefix: 1.0 for prefix in models}})
    replaced = sum(frozen.freeze(m, torch.float32, store="nf4") for m in models.values())
    assert replaced > 0, "nothing was quantized"
    references = [Image.open(p).convert("RGB") for p in sorted(dataset.glob("*.png"))]
    return score.SCORERS[kind](generate(pipe, prompts, *args), references)


def main(parts=("weights", "step", "quality"), kinds=("character", "style", "concept"), overrides=(),
         results_md: Path | None = None) -> dict:
    out: dict = {}
    if "weights" in parts:
        out["kept_share"] = kept_shares()
        print(json.dumps({"kept_share": out["kept_share"]}), flush=True)
        out["blocks"] = block_weights()
    if "step" in parts:
        out["steps"] = steps()
        for r in out["steps"]:
            print(f"{r['model']} {r['resolution']} px {r['store']:5s}: peak {r['peak_gb']:.2f} GB "
                  f"({r.get('peak_vs_fp32', '-')}x fp32), step {r['step_s']} s ({r.get('step_vs_fp32', '-')}x)"
                  + (f"  ERROR {r['error']}" if r["error"] else ""), flush=True)
    if "quality" in parts:
        out["quality"] = quality(kinds, list(overrides))
        ratios = [q["nf4_vs_fp32"] for q in out["quality"].values() if q["nf4_vs_fp32"] is not None]
        out["nf4_worst_score_ratio"] = min(ratios) if ratios else None
        out["nf4_median_score_ratio"] = statistics.median(ratios) if ratios else None
    if results_md is not None:
        from .qlora_report import MEASUREMENTS, write

        print(f"wrote {', '.join(write(out, results_md))} of {results_md} and {MEASUREMENTS}", flush=True)
    print(json.dumps(out))
    return out

"""`lora-studio bench learn`: train each preset on its sample dataset with the embedded tiny model
and print base score, LoRA score, drift, steps and seconds. The last line is one JSON object.

With `--fp8` it is the quality guard of fp8 frozen weights instead: each preset trains in bf16 at two seeds and
with fp8 frozen weights (bf16 compute) at the first, and fp8 counts as within noise when its score differs from
the bf16 score at the same seed by no more than the two bf16 seeds differ from each other.

With `--networks` it compares LoRA, LoHa and LoKr on each preset at about the same number of parameters (so the
same file size): LoHa at half the LoRA's rank (two low-rank pairs), LoKr with both Kronecker factors full (the
way LyCORIS users train it: a huge rank, alpha = rank, scale 1) and the factor whose UNet parameter count comes
closest to the LoRA's; score, drift and the file's size, one table."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

FP8_RUNS = {"bf16": ["train.mixed_precision=bf16"],
            "bf16 seed 43": ["train.mixed_precision=bf16", "train.seed=43"],
            "fp8": ["train.mixed_precision=bf16", "train.frozen_dtype=fp8"]}


def main(kinds=("character", "style", "concept"), overrides: list[str] = (), fp8: bool = False,
         networks: tuple[str, ...] = ()) -> dict:
    from ..world.learn import as_dict, generation_seconds, learn, load_pipeline, prompt_following

    pipe = load_pipeline()
    follow = prompt_following(pipe, 48, seed=7)
    print(f"base model: shape+colour right in {follow['hits']}/{follow['prompts']} prompts "
          f"({follow['accuracy']:.0%}); one 64 px generation {generation_seconds(pipe):.2f} s", flush=True)
    if fp8:
        return _fp8_guard(kinds, overrides, pipe)
    if networks:
        return _networks(kinds, overrides, pipe, networks)
    results = {}
    with tempfile.TemporaryDirectory(prefix="lora-studio-learn-") as tmp:
        for kind in kinds:
            r = learn(kind, Path(tmp), pipe=pipe, overrides=overrides)
            results[kind] = r
            print(f"{kind:10s} score base {r.score_base:.3f} -> lora {r.score_lora:.3f}   drift {r.drift:.3f}   "
                  f"{r.steps} steps in {r.seconds:.0f} s", flush=True)
    out = as_dict(results)
    print(json.dumps(out))
    return out


def _fp8_guard(kinds, overrides: list[str], pipe) -> dict:
    from ..world.learn import learn

    out = {}
    for kind in kinds:
        scores = {}
        for label, extra in FP8_RUNS.items():
            with tempfile.TemporaryDirectory(prefix="lora-studio-learn-") as tmp:
                r = learn(kind, Path(tmp), pipe=pipe, overrides=[*overrides, *extra])
            scores[label] = {"score": r.score_lora, "drift": r.drift, "seconds": r.seconds}
            print(f"{kind:10s} {label:13s} score {r.score_lora:.3f}   drift {r.drift:.3f}   {r.seconds:.0f} s",
                  flush=True)
        noise = abs(scores["bf16"]["score"] - scores["bf16 seed 43"]["score"])
        gap = scores["fp8"]["score"] - scores["bf16"]["score"]
        out[kind] = {**scores, "fp8_minus_bf16": round(gap, 4), "seed_noise": round(noise, 4),
                     "fp8_within_noise": abs(gap) <= noise}
        print(f"{kind:10s} fp8 - bf16 = {gap:+.3f}; bf16 seed 42 vs 43 differ by {noise:.3f}: "
              f"{'within' if abs(gap) <= noise else 'OUTSIDE'} noise", flush=True)
    print(json.dumps(out))
    return out


FULL_RANK = 1024  # a LoKr rank at or above half of every factor's side keeps both factors full


def lokr_factor_like(unet, lora) -> int:
    """The LoKr factor whose full-factor update has the parameter count nearest the LoRA's on this UNet."""
    import copy
    import dataclasses
    import math

    from peft import inject_adapter_in_model

    from ..lora.inject import peft_config, unet_targets

    targets = unet_targets(lora)

    def count(cfg) -> int:
        model = copy.deepcopy(unet).requires_grad_(False)
        inject_adapter_in_model(peft_config(cfg, targets), model, adapter_name="probe")
        return sum(p.numel() for name, p in model.named_parameters() if ".probe" in name)

    target = count(dataclasses.replace(lora, network="lora"))
    sizes = {f: count(dataclasses.replace(lora, network="lokr", rank=FULL_RANK, alpha=float(FULL_RANK), lokr_factor=f,
                                          decompose_both=False)) for f in (2, 4, 8, 16, -1)}
    return min(sizes, key=lambda f: abs(math.log(sizes[f] / target)))


def _networks(kinds, overrides: list[str], pipe, networks=("lora", "loha", "lokr")) -> dict:
    from ..config import RunConfig
    from ..presets import resolve
    from ..resources import SAMPLE_DATASETS
    from ..world.learn import learn

    out, rows = {}, []
    for kind in kinds:
        n_images = len(list((SAMPLE_DATASETS / kind).glob("*.png")))
        lora = RunConfig.load(resolve(kind, family="tiny", n_images=n_images), overrides=list(overrides)).lora
        rank, factor = lora.rank, lokr_factor_like(pipe.unet, lora)
        runs = {"lora": [], "loha": ["lora.network=\"loha\"", f"lora.rank={max(1, rank // 2)}",
                                     f"lora.alpha={max(1, rank // 2) / 2}"],
                "lokr": ["lora.network=\"lokr\"", f"lora.rank={FULL_RANK}", f"lora.alpha={FULL_RANK}",
                         f"lora.lokr_factor={factor}"]}
        out[kind] = {}
        for net, extra in ((n, e) for n, e in runs.items() if n in networks):
            with tempfile.TemporaryDirectory(prefix="lora-studio-learn-") as tmp:
                r = learn(kind, Path(tmp), pipe=pipe, overrides=[*overrides, *extra])
                size = sum(f.stat().st_size for f in (Path(tmp) / kind).glob("*.safetensors"))
            out[kind][net] = {"score_base": r.score_base, "score": r.score_lora, "drift": r.drift,
                              "file_kb": round(size / 1024, 1), "steps": r.steps, "seconds": r.seconds}
            rows.append(f"| {kind} | {net} | {r.score_base:.3f} | {r.score_lora:.3f} | {r.drift:.3f} | "
                        f"{size / 1024:.0f} | {r.seconds:.0f} |")
            print(f"{kind:10s} {net:5s} score {r.score_base:.3f} -> {r.score_lora:.3f}   drift {r.drift:.3f}   "
                  f"{size / 1024:.0f} KB   {r.seconds:.0f} s", flush=True)
    print("\n".join(["", "| preset | network | base score | score | drift | file KB | s |", "|---|---|---|---|---|---|---|",
                     *rows, ""]))
    print(json.dumps(out))
    return out

"""`lora-studio bench modern`: what one block of Flux.1 and of Z-Image keeps for the backward pass, measured on this
machine at full width (random bf16 weights, LoRA on the family's default targets, 512 and 1024 px; Flux's single
block also with LoRA on its attention alone, the targets before issue 37), with and without gradient
checkpointing, then scaled to the published depths. A full-size Flux.1 (24 GB in bf16) does not fit this machine's
RAM, a few of its blocks do: each measurement runs in a process of its own with one and with three blocks of a kind,
and half the difference is one block, free of the fixed costs (embeddings, the runtime). The estimator's constants
(trainer/memory/estimate.py MODERN_ACTIVATION_GB, MODERN_CHECKPOINTED) come from here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Published depths: Flux.1 dev/schnell 19 double + 38 single blocks; Z-Image 30 layers + 2 + 2 refiners.
DEPTH = {"flux": {"double": 19, "single": 38}, "zimage": {"layer": 34}}
TEXT_TOKENS = {"flux": 512, "zimage": 128}  # T5's padded 512; a Qwen3-templated caption of ~100 words
RANK = 16


def _shapes(family: str, kind: str, n: int) -> dict:
    if family == "flux":
        return {"num_layers": n if kind == "double" else 1, "num_single_layers": n if kind == "single" else 0,
                "guidance_embeds": True}
    return {"n_layers": n, "n_refiner_layers": 1}


def one(family: str, kind: str, n: int, pixels: int, checkpointing: bool, targets: str = "default") -> dict:
    """In this process: build, inject, one forward and backward at `pixels`; the peak RSS over the step (GB).
    `targets`: the family's default LoRA targets, or "attention" alone."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    dtype = torch.bfloat16
    if family == "flux":
        from diffusers import FluxTransformer2DModel as Model
    else:
        from diffusers import ZImageTransformer2DModel as Model
    with torch.device("meta"):
        model = Model(**_shapes(family, kind, n)).to(dtype)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.requires_grad_(False)
    from trainer.models.families import FAMILIES

    attention, _ = FAMILIES[family].lora_targets(dict(model.config))  # what a run trains by default
    if targets == "attention":
        attention = [t for t in attention if "single_transformer_blocks" not in t]  # without the single MLP
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=attention), model)
    lora_params = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    side = pixels // 16  # latent cells over two: the 2x2 patches' grid
    text = TEXT_TOKENS[family]
    if family == "flux":
        from trainer.models.flux import FluxFamily

        kwargs = dict(hidden_states=torch.randn(1, side * side, 64, dtype=dtype), timestep=torch.tensor([0.5]),
                      guidance=torch.tensor([1.0]), pooled_projections=torch.randn(1, 768, dtype=dtype),
                      encoder_hidden_states=torch.randn(1, text, 4096, dtype=dtype), txt_ids=torch.zeros(text, 3),
                      img_ids=FluxFamily.image_ids(2 * side, 2 * side, "cpu", torch.float32), return_dict=False)

        def step():
            return model(**kwargs)[0]
    else:
        x = [torch.randn(16, 1, 2 * side, 2 * side, dtype=dtype)]
        caps = [torch.randn(text, 2560, dtype=dtype)]

        def step():
            return torch.stack(model(x, torch.tensor([0.5]), caps, return_dict=False)[0])
    import gc

    gc.collect()
    before = _rss_gb()
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype):
        out = step()
    out.float().pow(2).mean().backward()
    seconds = time.perf_counter() - start
    peak = _peak_gb()
    return {"family": family, "kind": kind, "blocks": n, "pixels": pixels, "checkpointing": checkpointing,
            "targets": targets, "before_gb": round(before, 3), "peak_gb": round(peak, 3),
            "step_gb": round(peak - before, 3), "seconds": round(seconds, 1), "lora_params": lora_params}


def _rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _peak_gb() -> float:
    """The process's peak resident memory so far (Windows: its peak working set)."""
    if sys.platform == "win32":
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**30
    else:
        import resource

        scale = 2**30 if sys.platform == "darwin" else 2**20  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def measure(family: str, kind: str, n: int, pixels: int, checkpointing: bool, targets: str = "default") -> dict:
    """`one` in a fresh process, so its peak RSS is that step's alone."""
    code = ("import json, sys; from trainer.bench.modern import one; "
            f"print(json.dumps(one({family!r}, {kind!r}, {n}, {pixels}, {checkpointing}, {targets!r})))")
    # glibc serves large blocks from mmap only up to a threshold that grows as blocks are freed; past it freed memory
    # stays in the heap and the RSS keeps what autograd already let go. A fixed threshold makes the peak RSS the
    # peak of live tensors, which is what a GPU's allocator would hold.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600, env=env)
    if out.returncode != 0:
        return {"family": family, "kind": kind, "blocks": n, "pixels": pixels, "checkpointing": checkpointing,
                "targets": targets, "error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(sizes=(512, 1024)) -> dict:
    rows = []
    kinds = [("flux", "double", "default"), ("flux", "single", "default"), ("flux", "single", "attention"),
             ("zimage", "layer", "default")]
    for pixels in sizes:
        for family, kind, targets in kinds:
            for ckpt in (False, True):
                pair = [measure(family, kind, n, pixels, ckpt, targets) for n in (1, 3)]
                row = {"family": family, "kind": kind, "pixels": pixels, "checkpointing": ckpt, "targets": targets}
                if any("error" in p for p in pair):
                    row["error"] = next(p["error"] for p in pair if "error" in p)
                else:
                    row["block_gb"] = round((pair[1]["step_gb"] - pair[0]["step_gb"]) / 2, 3)
                    row["one_block_step_gb"], row["seconds"] = pair[0]["step_gb"], pair[0]["seconds"]
                    row["block_lora_params"] = (pair[1]["lora_params"] - pair[0]["lora_params"]) // 2
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"rows": rows, "scaled": scaled(rows), "cpu_cores": os.cpu_count()}


def scaled(rows: list[dict]) -> dict:
    """Per family and size: all blocks at the published depth, without and with checkpointing, and the share kept."""
    out = {}
    for family, depth in DEPTH.items():
        for pixels in sorted({r["pixels"] for r in rows}):
            total = {}
            for ckpt in (False, True):
                parts = [r for r in rows if r["family"] == family and r["pixels"] == pixels and
                         r["checkpointing"] == ckpt and "block_gb" in r and r.get("targets", "default") == "default"]
                if len(parts) != len(depth):
                    break
                total[ckpt] = sum(depth[r["kind"]] * max(r["block_gb"], 0.0) for r in parts)
            if len(total) == 2 and total[False] > 0:
                out[f"{family} {pixels}"] = {"activations_gb": round(total[False], 2),
                                             "checkpointed_gb": round(total[True], 2),
                                             "kept_share": round(total[True] / total[False], 3)}
    return out


def markdown(result: dict) -> str:
    lines = ["## Modern families", "",
             f"Generated by `lora-studio bench modern` on {result['cpu_cores']} CPU cores: one and three blocks of "
             "each kind at full width (random bf16 weights, LoRA rank 16 on the family's default targets; Flux's single "
             "block also on its attention alone), one image, one forward and "
             f"backward; half the difference is one block (Flux's text stream {TEXT_TOKENS['flux']} T5 tokens, Z-Image's "
             f"caption {TEXT_TOKENS['zimage']} tokens). Scaled to the published depths: Flux.1 19 double + 38 single "
             "blocks, Z-Image 30 layers + 4 refiner layers (counted as layers). Memory is the process's peak RSS "
             "over the step, with glibc's mmap threshold fixed so that freed tensors leave it. Do not edit: re-run it.", "",
             "| family | block | LoRA on | px | checkpointing | one block GB | one-block step s | LoRA params a block |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        value = r.get("block_gb", r.get("error", ""))
        on = "attention" if r.get("targets") == "attention" else "default"
        lines.append(f"| {r['family']} | {r['kind']} | {on} | {r['pixels']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{value} | {r.get('seconds', '')} | {r.get('block_lora_params', '')} |")
    lines += ["", "| model at size | activations GB (all blocks) | with checkpointing GB | share kept |",
              "|---|---|---|---|"]
    for name, s in result["scaled"].items():
        lines.append(f"| {name} px | {s['activations_gb']} | {s['checkpointed_gb']} | {s['kept_share']} |")
    return "\n".join(lines) + "\n"


def main(sizes=(512, 1024), results_md: Path | None = Path("bench/results.md")) -> dict:
    from trainer.bench.sections import replace_section

    result = run(sizes)
    text = markdown(result)
    print(text)
    if results_md is not None:
        replace_section(results_md, "Modern families", text)
        print(f"wrote the Modern families section of {results_md}")
    print(json.dumps(result))
    return result

"""LoRA tools: inspect, merge, resize, analyze, bake and card. Each writes new files atomically and
never overwrites one without `force`."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch

from trainer.atomic import UMASK, write_text
from trainer.file_hashes import file_hashes
from trainer.lora.write import SAVE_DTYPES, save_lora
from trainer.lora.read import FAMILY_NAMES, LoraError, LoraFile, Module, read_lora


def _check_output(path: Path, force: bool) -> None:
    """An output goes into a folder that exists (a typo must not create a tree of folders) and never
    replaces a file without `force`."""
    if not path.parent.is_dir():
        raise LoraError(f"the output folder {path.parent} does not exist; create it first or pick another --out")
    if path.exists() and not force:
        raise LoraError(f"{path} already exists; choose another output or pass --force")


def _check_rank(rank: int) -> None:
    if rank < 1:
        raise LoraError(f"--rank {rank} must be 1 or more")


def trigger_words(lora: LoraFile, top: int = 5) -> list[str]:
    md = lora.metadata
    if md.get("modelspec.trigger_phrase"):
        return [t.strip() for t in md["modelspec.trigger_phrase"].split(",") if t.strip()]
    try:
        freq = json.loads(md.get("ss_tag_frequency", "{}"))
    except ValueError:
        return []
    counts = Counter()
    for tags in freq.values():
        counts.update(tags)
    return [t for t, _ in counts.most_common(top)]


def inspect(path: str | Path) -> dict:
    lora = read_lora(path)
    ranks = lora.ranks()
    alphas = Counter(m.alpha for m in lora.modules.values())
    md = {k: (v[:80] + "…" if k == "modelspec.thumbnail" else v) for k, v in lora.metadata.items()}
    hashes = file_hashes(lora.path)
    network = {}
    if lora.network != "lora":  # LoHa/LoKr: the factors as the file holds them, and the rank of the update they make
        described = Counter(m.describe() for m in lora.modules.values())
        network = {"network": lora.network, "factors": dict(described.most_common(5)),
                   "effective_ranks": dict(ranks), "file_alpha": dict(Counter(m.file_alpha for m in
                                                                                lora.modules.values()))}
        ranks = Counter(m.dim or "full" for m in lora.modules.values())  # a full LoKr factor has no rank
        alphas = Counter(m.file_alpha for m in lora.modules.values())
    from trainer.lora.header import read as read_header
    from trainer.lora.readers import kind_of, readers

    keys = [k for k in read_header(lora.path)[0] if k != "__metadata__"]
    return {
        "file": str(lora.path), "family": lora.family, "family_source": lora.family_source, "layout": lora.layout,
        "loads_in": readers(lora.family, kind_of(keys)),
        "kind": lora.kind, **network, "rank": ranks.most_common(1)[0][0], "ranks": dict(ranks),
        "alpha": alphas.most_common(1)[0][0], "modules": len(lora.modules),
        "module_ranks": {n: m.rank for n, m in sorted(lora.modules.items())},  # effective: the update's rank
        "trigger_words": trigger_words(lora), **hashes,
        "defects": lora.defects(), "warnings": lora.warnings(), "metadata": md,
    }


def alpha_text(alpha) -> str:
    """A file's alpha for people: a LyCORIS module may carry none (its loaders then scale by 1)."""
    return "none (scale 1)" if alpha is None else f"{alpha:g}"


def to_tensors(modules: dict[str, Module], dtype: torch.dtype, paths: dict[str, str] | None = None) -> dict:
    """kohya keys; with `paths` (a peft-layout source's module paths), diffusers keys with the scale folded into
    lora_B, as the trainer writes SD3 files, so a merged or resized file loads where its source did."""
    out = {}
    if paths is not None:
        for name, m in sorted(modules.items()):
            if m.dora_scale is not None:
                raise LoraError("DoRA modules have no diffusers layout here; keep the file in kohya layout")
            out[f"{paths[name]}.lora_A.weight"] = m.down.to(dtype).contiguous()
            out[f"{paths[name]}.lora_B.weight"] = (m.up.float() * m.scale).to(dtype).contiguous()
        return out
    for name, m in sorted(modules.items()):
        out[f"{name}.lora_down.weight"] = m.down.to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = m.up.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=dtype)
        if m.dora_scale is not None:
            out[f"{name}.dora_scale"] = m.dora_scale.to(dtype).contiguous()
    return out


def factorize(delta: torch.Tensor, rank: int) -> tuple[Module, float]:
    """Best rank-`rank` LoRA for ΔW by SVD; returns it and the fraction of energy (Σσ²) lost."""
    flat = delta.flatten(1).float()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    rank = max(1, min(rank, s.numel()))
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).reshape(delta.shape[0], rank, *([1, 1] if delta.ndim == 4 else []))
    down = (root[:, None] * vh[:rank]).reshape(rank, *delta.shape[1:])
    total = float((s ** 2).sum())
    lost = float((s[rank:] ** 2).sum()) / total if total > 0 else 0.0
    return Module(down, up, float(rank)), lost


def energy_rank(s: torch.Tensor, keep: float) -> int:
    """Smallest rank keeping a `keep` fraction of Σσ² (the squared Frobenius norm)."""
    e = (s.float() ** 2).cumsum(0)
    if e[-1] <= 0:
        return 1
    return int((e / e[-1] < keep - 1e-12).sum().item()) + 1


def _same_family(loras: list[LoraFile]) -> str | None:
    fams = {l.family for l in loras if l.family}
    if len(fams) > 1:
        raise LoraError("cannot merge LoRAs of different families: " + ", ".join(FAMILY_NAMES[f] for f in sorted(fams)))
    if any(m.dora_scale is not None for l in loras for m in l.modules.values()):
        raise LoraError("DoRA LoRAs cannot be merged by adding updates (their magnitude is not additive)")
    return fams.pop() if fams else None


def merge(paths: list, weights: list[float], out: str | Path, rank: int | None = None, dtype: str = "fp16",
          force: bool = False) -> dict:
    """Merge LoRAs at weights. Without `rank`: exact, by concatenating ranks. With it: SVD to that rank,
    reporting the energy lost."""
    out = Path(out)
    _check_output(out, force)
    if rank is not None:
        _check_rank(rank)
    if len(paths) != len(weights):
        raise LoraError(f"{len(paths)} LoRAs but {len(weights)} weights; give one weight per LoRA")
    loras = [read_lora(p) for p in paths]
    for lora in loras:
        lora.require_usable("merge")
    family = _same_family(loras)
    names = sorted(set().union(*(l.modules for l in loras)))
    merged, losses = {}, {}
    for name in names:
        parts = [(l.modules[name], w) for l, w in zip(loras, weights) if name in l.modules]
        if rank is None:
            # Fold each scale·weight into its up matrix; the merged alpha equals its rank (scale 1).
            down = torch.cat([m.down.float() for m, _ in parts])
            up = torch.cat([m.up.float() * (m.scale * w) for m, w in parts], dim=1)
            merged[name] = Module(down, up, float(down.shape[0]))
        else:
            delta = sum(m.delta() * w for m, w in parts)
            merged[name], losses[name] = factorize(delta, rank)
    md = _merged_metadata(loras, weights, family, rank)
    save_lora(out, to_tensors(merged, SAVE_DTYPES[dtype], _peft_paths(loras)), md)
    lost = sum(losses.values()) / len(losses) if losses else 0.0
    converted = sorted({l.network for l in loras if l.network != "lora"})  # LoHa/LoKr merge as their ΔW: a LoRA
    return {"file": str(out), "modules": len(merged), "exact": rank is None, "energy_lost": lost,
            "rank": rank or max(m.rank for m in merged.values()), "converted_from": converted}


def _peft_paths(loras: list[LoraFile]) -> dict[str, str] | None:
    """Module name -> diffusers key path when every module of every source has one (the diffusers/peft layout, and
    Flux files read from kohya's layout), else None (kohya)."""
    if not all(m.path for l in loras for m in l.modules.values()):
        return None
    return {name: m.path for l in loras for name, m in l.modules.items()}


def _merged_metadata(loras, weights, family, rank) -> dict[str, str]:
    base = dict(loras[0].metadata)
    md = {k: v for k, v in base.items() if k.startswith(("ss_base_model_version", "ss_sd_model_name",
                                                          "modelspec.architecture", "modelspec.resolution",
                                                          "modelspec.prediction_type", "ss_resolution"))}
    triggers = [t for l in loras for t in trigger_words(l, top=2)]
    md.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank or "mixed"),
        "ss_network_alpha": str(rank or "mixed"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.trigger_phrase": ", ".join(dict.fromkeys(triggers)),
        "lora_studio.merged_from": json.dumps([{"file": l.path.name, "weight": w} for l, w in zip(loras, weights)]),
    })
    if family and "modelspec.architecture" not in md:
        from trainer.models import FAMILIES

        md["modelspec.architecture"] = f"{FAMILIES[family].modelspec_architecture}/lora"
    return md


def resize(path, out, rank: int | None = None, sv_ratio: float | None = None, sv_fro: float | None = None,
           dtype: str = "fp16", force: bool = False) -> dict:
    """New rank by SVD: fixed (`rank`), or per module keeping σ ≥ σ_max/sv_ratio, or a `sv_fro` energy fraction."""
    out = Path(out)
    _check_output(out, force)
    if sum(x is not None for x in (rank, sv_ratio, sv_fro)) != 1:
        raise LoraError("give exactly one of --rank, --sv-ratio or --sv-fro")
    if rank is not None:
        _check_rank(rank)
    if sv_ratio is not None and not (math.isfinite(sv_ratio) and sv_ratio >= 1):
        raise LoraError(f"--sv-ratio {sv_ratio:g} must be at least 1 (keep singular values >= the largest / RATIO; "
                        "e.g. 4)")
    if sv_fro is not None and not (0 < sv_fro <= 1):
        raise LoraError(f"--sv-fro {sv_fro:g} must be a fraction of the energy above 0 and at most 1 (e.g. 0.95)")
    lora = read_lora(path)
    lora.require_usable("resize")
    if any(m.dora_scale is not None for m in lora.modules.values()):
        raise LoraError("DoRA LoRAs cannot be resized by SVD without changing what they do")
    modules, losses = {}, []
    for name, m in sorted(lora.modules.items()):
        delta = m.delta()
        s = torch.linalg.svdvals(delta.flatten(1))
        if rank is not None:
            k = rank
        elif sv_ratio is not None:
            k = int((s >= s[0] / sv_ratio).sum().item())
        else:
            k = energy_rank(s, sv_fro)
        modules[name], lost = factorize(delta, min(k, m.rank))
        losses.append(lost)
    md = dict(lora.metadata)
    new_ranks = Counter(x.rank for x in modules.values())
    md["ss_network_dim"] = str(new_ranks.most_common(1)[0][0]) if len(new_ranks) == 1 else "dynamic"
    md["ss_network_alpha"] = md["ss_network_dim"]
    md["lora_studio.resized_from"] = json.dumps({"file": lora.path.name, "ranks": dict(lora.ranks())})
    md.pop("lora_adapter_metadata", None)  # its ranks and alphas are the old ones; the new file's scale is folded in
    converted = lora.network if lora.network != "lora" else None
    if converted:  # ΔW of a LoHa/LoKr, by SVD: the new file is a plain LoRA
        md.update({"ss_network_module": "networks.lora", "ss_network_args": "{}", "modelspec.tags": "lora",
                   "lora_studio.converted_from": converted})
    save_lora(out, to_tensors(modules, SAVE_DTYPES[dtype], _peft_paths([lora])), md)
    return {"file": str(out), "ranks": dict(new_ranks), "energy_lost_mean": sum(losses) / len(losses),
            "energy_lost_max": max(losses), "converted_from": converted}


def analyze(path) -> dict:
    """Per-module singular values and the ranks that keep 90/95/99% of the energy, with a suggestion."""
    lora = read_lora(path)
    lora.require_usable("analyze")
    per_module, need = {}, {0.90: [], 0.95: [], 0.99: []}
    for name, m in sorted(lora.modules.items()):
        s = torch.linalg.svdvals(m.delta().flatten(1))[: m.rank]
        per_module[name] = {"rank": m.rank, "singular_values": [round(float(x), 6) for x in s],
                            **{f"rank_{int(k * 100)}": energy_rank(s, k) for k in need}}
        for k in need:
            need[k].append(energy_rank(s, k))
    trained = lora.ranks().most_common(1)[0][0]
    summary = {f"rank_for_{int(k * 100)}": max(v) for k, v in need.items()}
    suggest = _power_of_two(summary["rank_for_95"])
    kept = _mean_energy_kept(lora, suggest)
    if suggest < trained:
        line = (f"rank {suggest} keeps {kept:.0%} of this LoRA; rank {trained} was more than needed "
                f"(resize with: lora-studio lora resize FILE --rank {suggest})")
    else:
        line = f"rank {trained} is used fully (rank {suggest} is needed for 95%); a higher rank may help"
    return {"file": str(lora.path), "trained_rank": trained, **summary, "suggested_rank": suggest,
            "energy_kept_at_suggested": kept, "suggestion": line, "modules": per_module}


def _power_of_two(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _mean_energy_kept(lora: LoraFile, rank: int) -> float:
    kept = []
    for m in lora.modules.values():
        s = torch.linalg.svdvals(m.delta().flatten(1)).float() ** 2
        kept.append(float(s[:rank].sum() / s.sum()) if s.sum() > 0 else 1.0)
    return sum(kept) / len(kept)


def card(path, force: bool = False) -> Path:
    """Write README.md beside the LoRA: triggers, base, settings, samples, and how to use it."""
    lora = read_lora(path)
    info = inspect(path)
    out = lora.path.with_name(lora.path.stem + ".README.md")
    _check_output(out, force)
    md = lora.metadata
    name = md.get("ss_output_name") or lora.path.stem
    trig = ", ".join(info["trigger_words"]) or "(none)"
    fam = FAMILY_NAMES.get(lora.family or "", "unknown")
    samples = sorted((lora.path.parent / "samples").glob("*.png"))[-4:] if (lora.path.parent / "samples").is_dir() else []
    settings = [("base model", md.get("ss_sd_model_name", "unknown")), ("family", fam),
                ("kind", lora.kind), ("rank / alpha", f"{info['rank']} / {alpha_text(info['alpha'])}"),
                ("resolution", md.get("modelspec.resolution", "?")), ("steps", md.get("ss_steps", "?")),
                ("learning rate", md.get("ss_learning_rate", "?")), ("images", md.get("ss_num_train_images", "?")),
                ("seed", md.get("ss_seed", "?")), ("AutoV2 / AutoV3 hash", f"{info['autov2']} / {info['autov3']}")]
    lines = [f"# {name}", "", f"A {fam} {lora.kind} made with LoRA Studio." if "lora_studio.config" in md
             else f"A {fam} {lora.kind}.", "", f"**Trigger words:** {trig}", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in settings]
    if samples:
        lines += ["", "## Samples", ""] + [f"![sample]({s.relative_to(lora.path.parent)})" for s in samples]
    lines += ["", "## Where it loads", ""] + [f"- {line}" for line in info["loads_in"]]
    lines += ["", "## Use it", "",
              f"- **AUTOMATIC1111 / Forge**: copy `{lora.path.name}` to `models/Lora/` and add "
              f"`<lora:{lora.path.stem}:0.8>` to the prompt{' with ' + trig if info['trigger_words'] else ''}.",
              "- **ComfyUI**: copy it to `models/loras/` and use a *Load LoRA* node (strength 0.8).",
              "- **diffusers**:", "", "```python",
              f'pipe.load_lora_weights("{lora.path.name}", adapter_name="{lora.path.stem}")',
              f'pipe.set_adapters(["{lora.path.stem}"], [0.8])', "```", ""]
    write_text(out, "\n".join(lines))
    return out


def bake(base: str, loras: list, weights: list[float], out: str | Path, force: bool = False, progress=None) -> dict:
    """Fuse LoRAs at weights into a copy of the base model, saved as a diffusers folder of .safetensors.
    `progress(done, total)`: modules fused so far."""
    import shutil
    import tempfile

    from trainer.lora.read import check_family, module_index, require_fit
    from trainer.models import load_base

    out = Path(out)
    _check_output(out, force)
    files = [read_lora(p) for p in loras]  # a broken LoRA is refused before the base model loads
    for lora in files:
        lora.require_usable("bake")
    b = load_base(base)
    models = b.family.models(b.unet, b.text_encoders)
    index = module_index(models, b.family.unet_namer(b.unet.config))
    applied, total = 0, sum(len(lora.modules) for lora in files)
    for lora, w in zip(files, weights):
        check_family(lora, b.family.name)
        missing = [n for n in lora.modules if n not in index]
        if missing:
            raise LoraError(f"{lora.path.name}: {len(missing)} module(s) not in this base model, e.g. {missing[0]}")
        for name, m in lora.modules.items():
            require_fit(lora.path.name, name, m, index[name].weight)
        with torch.no_grad():
            for name, m in lora.modules.items():
                weight = index[name].weight
                # At strength w, as ComfyUI and A1111 apply any adapter: W + w * (fused - W); for plain LoRA w * ΔW.
                change = m.fused(weight) - weight.float() if m.dora_scale is not None else m.delta()
                weight += (change * w).to(weight.dtype).reshape(weight.shape)
                applied += 1
                if progress:
                    progress(applied, total)
    pipe = b.family.pipeline(b.unet, b.vae, b.text_encoders, b.tokenizers, _scheduler(b.scheduler_config))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o777 & ~UMASK)  # mkdtemp's 0700 would make the finished model private to this user
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        clip_keys_for_loaders(tmp)
        if out.exists():  # only with force; the old folder goes only once the new one is whole
            old = out.with_name(f".{out.name}.old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"folder": str(out), "modules_changed": applied}


def clip_keys_for_loaders(folder: Path) -> list[Path]:
    """transformers 5 saves a CLIPTextModel without its `text_model.` level (`encoder.layers.0...`), which ComfyUI
    and A1111 read as every CLIP weight missing. Put the level back in each text encoder's files (transformers and
    diffusers load either form). Returns the files rewritten."""
    from safetensors.torch import load_file, save_file

    done = []
    for te in sorted(folder.glob("text_encoder*")):
        config = te / "config.json"
        if not config.exists() or json.loads(config.read_text(encoding="utf-8")).get("model_type") != "clip_text_model":
            continue  # T5 keeps its own names
        for f in sorted(te.glob("*.safetensors")):
            tensors = load_file(str(f))
            if all(k.startswith(("text_model.", "text_projection.")) for k in tensors):
                continue
            fixed = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
                     for k, v in tensors.items()}
            save_file(fixed, str(f), metadata={"format": "pt"})
            done.append(f)
        index = te / "model.safetensors.index.json"
        if index.exists():
            data = json.loads(index.read_text(encoding="utf-8"))
            data["weight_map"] = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
                                  for k, v in data.get("weight_map", {}).items()}
            index.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return done


def _scheduler(config: dict):
    """The base's own scheduler class (SD3: its flow-matching one), DDPM when the config names none."""
    import diffusers

    name = str(config.get("_class_name", ""))
    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    return (cls or diffusers.DDPMScheduler).from_config(config)

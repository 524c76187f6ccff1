"""`lora-studio doctor`: what is installed, what it runs on, and whether that combination can train.

Every finding is one line with one fix. A *blocking* finding means a run would fail: the CLI exits 1 and
the Train tab disables Start with the reason. Version checks read package metadata only (no imports), so
the app calls them without torch; the device section imports torch and is left out there.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from .resources import default_cache_dir

DIST = "lora-studio"
SHOWN = ("torch", "diffusers", "transformers", "peft", "accelerate", "gradio", "safetensors", "bitsandbytes",
         "torchvision")
LOCKED_INSTALL = 'pip install -c requirements.lock -e .  (from a checkout; the README\'s first command)'
LOW_DISK_GB = 5.0


@dataclass
class Finding:
    blocking: bool
    message: str
    fix: str
    note: bool = False  # nothing LoRA Studio needs changed: said, not warned about

    def line(self) -> str:
        kind = "BLOCKING" if self.blocking else "note" if self.note else "warning"
        return f"{kind}: {self.message}. {'If it matters to you' if self.note else 'Fix'}: {self.fix}"


@dataclass
class Rule:
    """A combination known to break something, seen in the wild: each package's version must match."""
    when: dict[str, str]
    message: str
    fix: str
    blocking: bool
    note: bool = False


KNOWN_BAD = [
    Rule({"transformers": ">=5.24", "peft": "<0.22"},
         "transformers {transformers} refuses its own adapter methods (add_adapter, set_adapter, delete_adapter) "
         "with peft {peft}: it demands peft >= 0.22. LoRA Studio does not use them and trains as usual, but "
         "scripts that add or switch text-encoder LoRAs through transformers fail here",
         # its fix used to be `pip install "transformers<5.24"`, which breaks the tested lock it fired on
         "nothing for LoRA Studio; for scripts of your own that call those methods, another environment with "
         "transformers<5.24 (installing it into this one would leave the tested requirements.lock)",
         blocking=False, note=True),
    Rule({"peft": "<0.17"},
         "peft {peft} predates the LoRA API LoRA Studio uses (inject_adapter_in_model with rank and alpha "
         "patterns)", 'pip install -c requirements.lock "peft>=0.17"', blocking=True),
]


@dataclass
class Report:
    python: str
    versions: dict[str, str | None]
    device: dict = field(default_factory=dict)
    disk: dict = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    plans: dict[str, str] = field(default_factory=dict)  # what the memory planner does here, per model

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.blocking]

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": not self.blocking}

    def text(self) -> str:
        lines = [f"python {self.python}"]
        lines += [f"{name:<13} {v or '(not installed)'}" for name, v in self.versions.items()]
        if self.device:
            d = self.device
            memory = f", {d['memory_gb']} GB" if d.get("memory_gb") else ""
            lines.append(f"{'device':<13} {d['kind']}: {d['name']}{memory}")
        for where, d in self.disk.items():
            lines.append(f"{where + ' disk':<13} {d['free_gb']} GB free at {d['path']}")
        width = max(map(len, self.plans), default=0)
        lines += [f"{model:<{width}} {text}" for model, text in self.plans.items()]
        lines += [f.line() for f in self.findings] or ["no problems found"]
        return "\n".join(lines)


def installed_versions(names=SHOWN) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def requirements() -> list[Requirement]:
    """LoRA Studio's own declared ranges, as installed (pyproject's `dependencies`)."""
    try:
        raw = metadata.requires(DIST) or []
    except metadata.PackageNotFoundError:
        return []
    reqs = [Requirement(r) for r in raw]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def _version(v: str) -> Version | None:
    try:
        return Version(v)
    except InvalidVersion:
        return None


def range_findings(reqs: list[Requirement], versions: dict[str, str | None]) -> list[Finding]:
    """Missing or too old is blocking; newer than the tested range only warns (it may well work)."""
    out = []
    for req in reqs:
        have = versions.get(req.name)
        if have is None:
            out.append(Finding(True, f"{req.name} is not installed (LoRA Studio needs {req})", LOCKED_INSTALL))
            continue
        v = _version(have)
        if v is None or req.specifier.contains(v, prereleases=True):
            continue
        floors = [s for s in req.specifier if s.operator in (">=", ">")]
        too_old = any(not SpecifierSet(str(s)).contains(v, prereleases=True) for s in floors)
        if too_old:
            out.append(Finding(True, f"{req.name} {have} is older than LoRA Studio supports ({req})",
                               f'pip install -c requirements.lock "{req}"'))
        else:
            out.append(Finding(False, f"{req.name} {have} is outside the tested range ({req})",
                               f'pip install -c requirements.lock "{req}" for the tested version'))
    return out


def rule_findings(versions: dict[str, str | None], rules=KNOWN_BAD) -> list[Finding]:
    out = []
    for rule in rules:
        have = {name: versions.get(name) for name in rule.when}
        if all(v is not None and _version(v) is not None and SpecifierSet(spec).contains(_version(v), prereleases=True)
               for (name, spec), v in zip(rule.when.items(), have.values())):
            out.append(Finding(rule.blocking, rule.message.format(**have), rule.fix, rule.note))
    return out


def torchvision_finding(versions: dict[str, str | None]) -> list[Finding]:
    """torchvision is built against one torch minor (0.N+15 for 2.N); a mismatch fails when transformers
    imports it for image processing ("operator torchvision::nms does not exist")."""
    tv, torch_v = _version(versions.get("torchvision") or ""), _version(versions.get("torch") or "")
    if tv is None or torch_v is None or tv.major != 0 or torch_v.major != 2:
        return []
    if tv.minor == torch_v.minor + 15:
        return []
    return [Finding(False, f"torchvision {versions['torchvision']} is built for torch 2.{tv.minor - 15}, "
                           f"but torch {versions['torch']} is installed; captioning and image processors may fail "
                           "to import", f"pip uninstall torchvision (LoRA Studio does not need it), or install "
                                        f"torchvision 0.{torch_v.minor + 15}")]


def device_info(versions: dict[str, str | None]) -> tuple[dict, list[Finding]]:
    """The accelerator torch sees; imports torch (about a second)."""
    findings = []
    try:
        import torch
    except Exception as e:  # a broken torch install is exactly what doctor must report, not crash on
        return {"kind": "none", "name": f"torch does not import: {str(e).splitlines()[0] if str(e) else e}"}, [
            Finding(True, "torch does not import", 'pip install -c requirements.lock "torch==2.13.0"')]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info = {"kind": "cuda", "name": props.name, "count": torch.cuda.device_count(),
                "memory_gb": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
        if versions.get("bitsandbytes") is None:
            findings.append(Finding(False, "bitsandbytes is not installed: the 6, 8 and 12 GB VRAM tiers use its "
                                           "8-bit AdamW", "pip install bitsandbytes"))
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        info = {"kind": "mps", "name": "Apple GPU"}
    else:
        from trainer.memory import cpu_features

        cpu_features.record_from_torch()
        info = {"kind": "cpu", "name": f"{os.cpu_count()} CPU cores", "capability": torch.backends.cpu.get_cpu_capability(),
                "bf16_fast": cpu_features.bf16_fast()}
        if not info["bf16_fast"]:
            findings.append(Finding(False, f"this CPU (torch capability {info['capability']}) has no AVX512-BF16 or "
                                           "AMX: bf16 runs 15-30x slower than fp32 there, so CPU runs train in fp32 "
                                           "(the memory plan switches bf16 off)",
                                    "nothing to do; a GPU trains much faster (python launch.py installs its torch)"))
        if torch.version.cuda is None and _nvidia_driver_present():
            findings.append(Finding(False, "an NVIDIA GPU is present but this torch is a CPU-only build, so "
                                           "training runs on the CPU", "install torch 2.13.0's CUDA build for "
                                           "your driver: python launch.py --reinstall (it picks the build for the driver), then run doctor again"))
    return info, findings


def _nvidia_driver_present() -> bool:
    if sys.platform.startswith("linux") and Path("/proc/driver/nvidia/version").exists():
        return True
    return shutil.which("nvidia-smi") is not None


def _existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_info(places: dict[str, Path]) -> tuple[dict, list[Finding]]:
    info, findings = {}, []
    for where, path in places.items():
        at = _existing(path)
        free = shutil.disk_usage(at).free / 2**30
        info[where] = {"path": str(path), "free_gb": round(free, 1)}
        if free < LOW_DISK_GB:
            findings.append(Finding(free < 0.5, f"only {free:.1f} GB free for the {where} at {path}",
                                    f"free some space or point the {where} elsewhere "
                                    f"({'--workspace DIR' if where == 'workspace' else 'LORA_STUDIO_CACHE=DIR'})"))
    return info, findings


def default_places() -> dict[str, Path]:
    home = os.environ.get("LORA_STUDIO_HOME")
    return {"workspace": Path(home) if home else Path.home() / "lora-studio", "cache": Path(default_cache_dir())}


def check(device: bool = True, versions: dict[str, str | None] | None = None, places: dict[str, Path] | None = None,
          reqs: list[Requirement] | None = None, vram: float | None = None) -> Report:
    """The whole report. `versions`, `places` and `reqs` default to this environment's (tests pass fakes)."""
    reqs = requirements() if reqs is None else reqs
    versions = installed_versions((*SHOWN, *(r.name for r in reqs))) if versions is None else versions
    report = Report(python=sys.version.split()[0], versions={n: versions.get(n) for n in SHOWN})
    report.findings += range_findings(reqs, versions) + rule_findings(versions) + torchvision_finding(versions)
    report.disk, found = disk_info(places or default_places())
    report.findings += found
    if device:
        report.device, found = device_info(versions)
        report.findings += found
        report.plans = memory_plans(report.device, vram)
    return report


# What doctor plans for: the character preset on the families' full-size models at their native resolution.
PLANNED = {"SD1.5 512px": "sd1", "SDXL 1024px": "sdxl", "SD3.5 Medium 1024px": "sd3", "Flux.1 dev 1024px": "flux",
           "Z-Image 1024px": "zimage"}


def memory_plans(device: dict, vram: float | None = None) -> dict[str, str]:
    """The memory plan for each PLANNED model on this machine's GPU (`vram` caps it), or its RAM on a CPU."""
    from . import presets
    from trainer.memory import plan
    from .config import RunConfig

    gpu = (device["name"], device["memory_gb"]) if device.get("kind") == "cuda" and device.get("memory_gb") else None
    budget = plan.budget_for(vram, gpu)
    out = {}
    for label, family in PLANNED.items():
        half = "fp16" if budget.device == "cuda" else "bf16"
        cfg = RunConfig.load(presets.resolve("character", family=family, n_images=20),
                             {"model": {"family": family}, "train": {"mixed_precision": half}})
        out[label] = plan.make_plan(cfg, budget).text()
    return out


def blocking_findings(workspace: Path | None = None) -> list[Finding]:
    """What stops a run here, without importing torch: for the app's Start button."""
    places = default_places()
    if workspace is not None:
        places["workspace"] = workspace
    return check(device=False, places=places).blocking

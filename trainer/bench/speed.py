"""`lora-studio bench speed`: the real training loop on full-size SD1.5 and SDXL architectures.

Each setting runs `lora-studio train` as its own process on a random-weight pipeline (see
`fullsize.py`) and a small generated dataset, and reads back from the run folder:
- seconds per step: the median gap between step events after the warm-up steps;
- time to first step: from launching the command to the first step event;
- peak memory: the process's peak RSS (os.wait4), or CUDA's max allocated when on a GPU;
- the VAE encodes it did (the `cache` event), so a second run on the same data must show 0.
The floor (`floor.py`) is a bare UNet forward + backward with the same inputs, precision and
checkpointing, measured in the same run. Every figure in bench/results.md comes from here.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer.bench.speed_report import _fmt, _line, write_markdown  # noqa: F401  (bench speed's report)

GB = 1024 ** 3
FAMILY_OF = {"sd15": "sd1", "sdxl": "sdxl", "sd35m": "sd3"}


@dataclass(frozen=True)
class Setting:
    model: str  # 'sd15', 'sdxl' or 'tiny'
    resolution: int
    checkpointing: bool
    cache: bool  # latent and text-encoder-output caching
    train_te: bool
    steps: int = 3  # measured steps, after `warmup`
    warmup: int = 1
    floor: bool = True  # False: memory only (an SDXL 1024 px step on a CPU takes minutes)
    launches: int = 1  # >1: time to first step is the median over that many launches (it is noisy)
    fp8: bool = False  # frozen UNet/text-encoder weights stored in float8 (train.frozen_dtype=fp8)
    t5: bool = True  # SD3: T5-XXL loaded (model.t5)
    offload: bool = False  # frozen UNet weights streamed from system RAM (train.offload; CUDA only)
    frozen: str = ""  # "int8" or "nf4": train.frozen_dtype (bench qlora)
    compute: str = ""  # train.mixed_precision for this row, whatever the bench's own ("no": fp32)

    def precision(self, bench_precision: str) -> str:
        # The embedded model trains in fp32 by default: its first-step time is measured as users get it.
        return self.compute or ("no" if self.model == "tiny" else bench_precision)

    @property
    def label(self) -> str:
        return (f"{self.model} {self.resolution}px, ckpt {'on' if self.checkpointing else 'off'}, "
                f"cache {'on' if self.cache else 'off'}, TE {'trained' if self.train_te else 'frozen'}"
                + (", fp8 frozen weights" if self.fp8 else "") + (", no T5" if not self.t5 else "")
                + (", offload" if self.offload else "") + (f", {self.frozen} frozen weights" if self.frozen else "")
                + (f", {'fp32' if self.compute == 'no' else self.compute}" if self.compute else ""))

    def overrides(self, precision: str) -> list[str]:
        return [f"data.resolution={self.resolution}", "train.batch_size=1", "lora.rank=16", "lora.alpha=16",
                "lora.unet_extra=[]", f"train.mixed_precision={self.precision(precision)}",
                f"train.gradient_checkpointing={str(self.checkpointing).lower()}",
                f"data.cache_latents={str(self.cache).lower()}", f"data.cache_text={str(self.cache).lower()}",
                "data.cache_ahead=false",  # the rows measure steps over a filled cache, with the VAE gone
                f"lora.train_text_encoder={str(self.train_te).lower()}", f"train.max_steps={self.warmup + self.steps}",
                "sample.at_end=false", "sample.every_n_steps=0", "save.state_every_n_steps=0",
                "data.min_bucket_side=64", "optim.optimizer=adamw", "train.fit_memory=false"] + \
            (["train.frozen_dtype=fp8"] if self.fp8 else []) + (["model.t5=false"] if not self.t5 else []) + \
            (["train.offload=true"] if self.offload else []) + \
            ([f"train.frozen_dtype={self.frozen}"] if self.frozen else [])


def matrix(quick: bool, device: str = "cpu") -> list[Setting]:
    """SD1.5 at 512 over checkpointing x caching x text encoder; SDXL at 1024 in its target setting.

    SDXL is memory-only on a CPU (one step after warm-up): a 1024 px step of a 2.6 B UNet takes minutes
    there. `quick` keeps the two target settings and the SD1.5 step/floor pair. On CUDA the fp8 rows are measured
    again with the frozen weights streamed from system RAM (train.offload), which changes nothing on a CPU.
    """
    sd15 = [Setting("sd15", 512, ck, cache, te) for ck in (True, False) for cache in (True, False)
            for te in (False, True)]
    sdxl = Setting("sdxl", 1024, True, True, False, steps=1, floor=False)
    tiny = Setting("tiny", 64, False, True, False, steps=10, warmup=2, launches=3)
    fp8 = [Setting("sd15", 512, True, True, False, fp8=True), Setting("sdxl", 1024, True, True, False, steps=1,
                                                                      floor=False, fp8=True)]
    offload = [dataclasses.replace(s, offload=True) for s in fp8] if device == "cuda" else []
    if quick:
        return [tiny, sd15[0], Setting("sd15", 512, False, True, False), sdxl, *fp8, *offload, *sd3_rows()]
    return [tiny] + sd15 + [sdxl] + fp8 + offload + sd3_rows()


def sd3_rows() -> list[Setting]:
    """SD 3.5 Medium at its native 1024 px with and without T5-XXL: one timed step after the warm-up one."""
    return [Setting("sd35m", 1024, True, True, False, steps=1, warmup=1, floor=False, t5=t5) for t5 in (True, False)]


@dataclass
class Measured:
    setting: Setting
    step_s: float | None
    first_step_s: float | None
    peak_gb: float
    vae_encodes: int | None
    floor_s: float | None = None
    floor_peak_gb: float | None = None
    estimate_gb: float | None = None
    error: str = ""
    step_times: list = field(default_factory=list)

    @property
    def over_floor(self) -> float | None:
        return self.step_s / self.floor_s if self.step_s and self.floor_s else None

    @property
    def estimate_err(self) -> float | None:
        return abs(self.estimate_gb - self.peak_gb) / self.peak_gb if self.estimate_gb else None


def device_precision() -> tuple[str, str]:
    import torch

    return ("cuda", "fp16") if torch.cuda.is_available() else ("cpu", "bf16")


def make_dataset(folder: Path, resolution: int, n: int = 4) -> Path:
    """n noise images with captions: content does not change the cost of a step."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of a red dog {i}", encoding="utf-8")
    return folder


def run_process(cmd: list[str], log: Path, env: dict | None = None) -> tuple[int, float, float]:
    """Run cmd; return (exit code, peak RSS in GB, launch wall time). No shell.

    The peak is the child's own VmHWM, polled until it exits. (rusage's ru_maxrss is no good here: a
    forked child starts from its parent's resident size, so a big parent would inflate every figure.)
    """
    import threading

    start = time.time()
    peak_kb = [0]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def poll():
            while not done.is_set():
                peak_kb[0] = max(peak_kb[0], _vm_hwm_kb(proc.pid))
                done.wait(0.1)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        proc.wait()
        done.set()
        watcher.join()
    return proc.returncode, peak_kb[0] * 1024 / GB, start


def _vm_hwm_kb(pid: int) -> int:
    """The process's peak resident size so far: VmHWM on Linux; elsewhere psutil's peak working set (Windows) or, on
    macOS, which keeps no peak, its resident size now (polled, so the peak between polls can be missed)."""
    if sys.platform.startswith("linux"):
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass  # gone, or a zombie that no longer has a memory map
        return 0
    import psutil

    try:
        info = psutil.Process(pid).memory_info()
    except psutil.Error:
        return 0
    return int(getattr(info, "peak_wset", info.rss)) // 1024


def trainer_command() -> list[str]:
    script = Path(sys.executable).parent / "lora-studio"
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]


def measure_setting(s: Setting, model_dir: str, data_dir: Path, cache_dir: Path, work: Path,
                    precision: str) -> Measured:
    from trainer.training.events import read_events

    run = work / ("run-" + "".join(c if c.isalnum() else "-" for c in s.label))
    cmd = trainer_command() + ["train", "--model", model_dir, "--dataset", str(data_dir), "--output", str(run),
                               "--force", "--set", f"data.cache_dir={cache_dir}"]
    for o in s.overrides(precision):
        cmd += ["--set", o]
    code, peak, launched = run_process(cmd, work / f"{run.name}.log")
    events = read_events(run)
    if code != 0:
        tail = (work / f"{run.name}.log").read_text(errors="replace").strip().splitlines()[-1:]
        return Measured(s, None, None, peak, None, error=f"exit {code}: {tail[0] if tail else ''}")
    steps = [e["time"] for e in events if e["type"] == "step"]
    gaps = [b - a for a, b in zip(steps, steps[1:])][s.warmup - 1:] if len(steps) > 1 else []
    cache = next((e for e in events if e["type"] == "cache"), None)
    done = next((e for e in events if e["type"] == "done"), {})
    if done.get("cuda_peak_gb"):
        peak = done["cuda_peak_gb"]
    return Measured(s, statistics.median(gaps) if gaps else None, steps[0] - launched if steps else None, peak,
                    cache["to_encode"] if cache else None, step_times=[round(g, 3) for g in gaps])


def measure_floor(model_dir: str, s: Setting, precision: str, work: Path, extra: tuple = ()) -> dict:
    cmd = [sys.executable, "-m", "trainer.bench.floor", "--model", model_dir, "--resolution", str(s.resolution),
           "--precision", precision, "--checkpointing", str(int(s.checkpointing)), "--steps", str(s.steps),
           "--warmup", str(s.warmup), *extra]
    log = work / ("floor-" + "-".join([s.model, str(s.resolution), str(int(s.checkpointing)), precision, *extra]) + ".log")
    code, peak, _ = run_process(cmd, log)
    lines = log.read_text(errors="replace").strip().splitlines()
    if code != 0 or not lines:
        return {"error": f"floor exit {code}: {lines[-1] if lines else ''}", "peak_gb": peak}
    out = json.loads(lines[-1])
    out["peak_gb"] = out.get("cuda_peak_gb", peak)
    return out


def estimate_for(s: Setting, precision: str, device: str) -> float:
    from ..config import RunConfig
    from trainer.memory.estimate import estimate

    model = ['model.source="tiny"'] if s.model == "tiny" else [f"model.family={FAMILY_OF[s.model]}"]
    cfg = RunConfig.load(overrides=[*model, *s.overrides(precision)])
    return estimate(cfg, host=(device == "cpu")).peak_gb


def run(quick: bool = False, work: Path | None = None, models_dir: Path | None = None,
        settings: list[Setting] | None = None, model_dirs: dict | None = None, ablations: bool = True) -> dict:
    t_start = time.time()
    device, precision = device_precision()
    settings = settings or matrix(quick, device)
    work = Path(work or tempfile.mkdtemp(prefix="lora-studio-bench-"))
    models_dir = Path(models_dir or Path.home() / ".cache" / "lora-studio" / "bench-models")
    model_dirs = dict(model_dirs or {})
    cache_dir = work / "cache"
    results: list[Measured] = []
    floors: dict = {}
    for s in settings:
        if s.model == "tiny":
            from trainer.models.info import EMBEDDED_DIR

            model_dirs.setdefault("tiny", str(EMBEDDED_DIR))
        if s.model not in model_dirs:
            print(f"building the random-weight {s.model} pipeline in {models_dir / s.model} ...", flush=True)
            # In its own process: this one stays small, and so does every child it starts.
            code, _, _ = run_process([sys.executable, "-m", "trainer.bench.fullsize", s.model, str(models_dir / s.model)],
                                     work / f"build-{s.model}.log")
            if code != 0:
                raise RuntimeError(f"building the {s.model} model failed; see {work / f'build-{s.model}.log'}")
            model_dirs[s.model] = str(models_dir / s.model)
        data = work / f"data-{s.model}-{s.resolution}"
        if not data.exists():
            make_dataset(data, s.resolution)
        m = measure_setting(s, model_dirs[s.model], data, cache_dir, work, precision)
        if s.launches > 1 and not m.error:  # the first launch keeps its own figures (e.g. VAE encodes)
            again = [measure_setting(s, model_dirs[s.model], data, cache_dir, work, precision)
                     for _ in range(s.launches - 1)]
            firsts = [x.first_step_s for x in (m, *again) if x.first_step_s is not None]
            m.first_step_s = statistics.median(firsts) if firsts else None
        key = (s.model, s.resolution, s.checkpointing, s.steps)
        if key not in floors and m.step_s is not None and s.floor:
            floors[key] = measure_floor(model_dirs[s.model], s, s.precision(precision), work)
        floor = floors.get(key, {})
        m.floor_s, m.floor_peak_gb = floor.get("floor_s"), floor.get("peak_gb")
        m.estimate_gb = estimate_for(s, precision, device)
        results.append(m)
        print(_line(m), flush=True)
    extra = run_ablations(model_dirs, precision, work) if ablations and "sd15" in model_dirs else []
    summary = summarise(results, device, precision, time.time() - t_start)
    summary["ablations"] = extra
    summary["cpu"] = cpu_description()
    return {"results": results, "summary": summary}


def cpu_description() -> dict:
    """What the CPU figures rest on: torch's CPU capability and whether bf16 is fast here (AVX512-BF16 or AMX; without
    either a bf16 matmul is 15-30x slower than fp32, and the bf16 rows measure that)."""
    import platform

    import torch

    from trainer.memory import cpu_features

    return {"capability": torch.backends.cpu.get_cpu_capability(), "bf16_fast": cpu_features.record_from_torch(),
            "processor": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def run_ablations(model_dirs: dict, precision: str, work: Path) -> list[dict]:
    """What each memory saving is worth, measured on the bare SD1.5 UNet step (see floor.py) and on
    loading the base model, each in its own process."""
    base = Setting("sd15", 512, True, True, False, steps=1)
    ref = measure_floor(model_dirs["sd15"], base, precision, work)
    rows = []
    for what, extra, prec in (("frozen UNet weights in half precision (vs fp32)", (), "no"),
                              ("SDPA attention (vs the classic attention processor)", ("--attention", "classic"), precision)):
        alt = measure_floor(model_dirs["sd15"], base, prec, work, extra)
        rows.append({"saving": what, "with_gb": ref.get("peak_gb"), "without_gb": alt.get("peak_gb"),
                     "with_s": ref.get("floor_s"), "without_s": alt.get("floor_s"), "error": alt.get("error", "")})
    load = [sys.executable, "-m", "trainer.bench.loadpeak", "--model", model_dirs["sd15"], "--precision", precision]
    peaks = {}
    for how in ("direct", "fp32-then-cast"):
        code, peak, _ = run_process(load + ["--how", how], work / f"load-{how}.log")
        peaks[how] = peak if code == 0 else None
    rows.append({"saving": "base model loaded straight into half precision (vs fp32, then cast)",
                 "with_gb": peaks["direct"], "without_gb": peaks["fp32-then-cast"]})
    for r in rows:
        print(f"saving: {r['saving']}: {_fmt(r['with_gb'])} GB with it, {_fmt(r['without_gb'])} GB without", flush=True)
    return rows


def summarise(results: list[Measured], device: str, precision: str, seconds: float) -> dict:
    def row(model, res, **want) -> Measured | None:
        return next((m for m in results if m.setting.model == model and m.setting.resolution == res
                     and all(getattr(m.setting, k) == v for k, v in want.items())), None)

    def peak_of(model, res, **want):
        m = row(model, res, **want)
        return round(m.peak_gb, 2) if m else None

    target = dict(checkpointing=True, cache=True, train_te=False, fp8=False, offload=False)
    target_fp8 = {**target, "fp8": True}
    target_offload = {**target_fp8, "offload": True}
    full = [m for m in results if m.setting.model != "tiny"]  # the tiny model's step is all overhead
    ratios = [m.over_floor for m in full if m.over_floor and m.setting.cache and not m.setting.train_te
              and not m.setting.fp8]  # the floor is a half-precision UNet: fp8 rows are compared to half rows
    half_step, fp8_step, offload_step = (getattr(row("sd15", 512, **want), "step_s", None)
                                         for want in (target, target_fp8, target_offload))
    errs = [m.estimate_err for m in full if m.estimate_err is not None]
    repeat_encodes, seen = [], set()
    for m in results:  # every cached run after the first on the same data must encode nothing
        if m.setting.cache and m.vae_encodes is not None:
            data = (m.setting.model, m.setting.resolution)
            if data in seen:
                repeat_encodes.append(m.vae_encodes)
            seen.add(data)
    tiny = next((m for m in results if m.setting.model == "tiny" and m.first_step_s), None)
    return {
        "device": device, "precision": precision,
        "step_over_floor": round(max(ratios), 3) if ratios else None,
        "sd15_512_peak_gb": peak_of("sd15", 512, **target),
        "sdxl_1024_peak_gb": peak_of("sdxl", 1024, **target),
        "sd15_512_fp8_peak_gb": peak_of("sd15", 512, **target_fp8),
        "sdxl_1024_fp8_peak_gb": peak_of("sdxl", 1024, **target_fp8),
        "sd35m_1024_peak_gb": peak_of("sd35m", 1024, **target, t5=True),
        "sd35m_1024_no_t5_peak_gb": peak_of("sd35m", 1024, **target, t5=False),
        "fp8_step_over_half_step": round(fp8_step / half_step, 3) if fp8_step and half_step else None,
        "sdxl_1024_offload_peak_gb": peak_of("sdxl", 1024, **target_offload),
        "offload_step_over_fp8_step": round(offload_step / fp8_step, 3) if offload_step and fp8_step else None,
        "estimator_max_rel_err": round(max(errs), 3) if errs else None,
        "second_run_vae_encodes": max(repeat_encodes) if repeat_encodes else None,
        "tiny_first_step_s": round(tiny.first_step_s, 2) if tiny else None,
        "settings": len(results), "failed": sum(bool(m.error) for m in results), "seconds": round(seconds),
    }


def save_measurements(out: dict, path: Path) -> None:
    from ..atomic import write_text

    rows = [{**asdict(m), "setting": asdict(m.setting)} for m in out["results"]]
    write_text(path, json.dumps({"summary": out["summary"], "results": rows}, indent=1) + "\n")


def load_measurements(path: Path) -> dict:
    """Re-read saved measurements and recompute the estimates with the current estimator."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    results = []
    for row in raw["results"]:
        m = Measured(**{**row, "setting": Setting(**row["setting"])})
        m.estimate_gb = estimate_for(m.setting, raw["summary"]["precision"], raw["summary"]["device"])
        results.append(m)
    old = raw["summary"]
    summary = summarise(results, old["device"], old["precision"], old["seconds"])
    summary["ablations"] = old.get("ablations", [])
    summary["measured_at"] = old.get("measured_at")
    summary["cpu"] = old.get("cpu")  # the machine that measured them, not this one
    return {"results": results, "summary": summary}


def main(quick: bool = False, results_md: Path = Path("bench/results.md"),
         measurements: Path = Path("bench/speed-measurements.json"), replay: Path | None = None,
         only: str | None = None) -> dict:
    if replay:
        out = load_measurements(replay)
        command = f"lora-studio bench speed --from {replay}"
    elif only:  # these rows measured now, beside the saved ones of the other models
        kept = load_measurements(measurements)
        fresh = run(settings=[s for s in matrix(quick, device_precision()[0]) if s.model == only], ablations=False)
        results = [m for m in kept["results"] if m.setting.model != only] + fresh["results"]
        summary = summarise(results, fresh["summary"]["device"], fresh["summary"]["precision"],
                            kept["summary"]["seconds"] + fresh["summary"]["seconds"])
        summary["ablations"] = kept["summary"]["ablations"]
        summary["cpu"] = fresh["summary"]["cpu"]
        summary["measured_at"] = f"{kept['summary'].get('measured_at')} ({only}: {time.strftime('%Y-%m-%d %H:%M')})"
        out = {"results": results, "summary": summary}
        save_measurements(out, measurements)
        command = f"lora-studio bench speed --only {only}"
    else:
        out = run(quick=quick)
        out["summary"]["measured_at"] = time.strftime("%Y-%m-%d %H:%M")
        save_measurements(out, measurements)
        command = "lora-studio bench speed" + (" --quick" if quick else "")
        print(f"wrote {measurements}")
    write_markdown(out, results_md, command)
    print(f"wrote {results_md}")
    summary = {k: v for k, v in out["summary"].items() if k != "ablations"}
    print(json.dumps(summary))
    return out

"""`lora-studio train`: layers the config (defaults, preset, --config, --set), plans memory, trains."""
from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path

from trainer.config import ConfigError, RunConfig, describe


def _settings_help() -> str:
    lines = ["settings for --set section.key=value (and for config files):"]
    for key, help_text, default in describe():
        lines.append(f"  {key} = {default!r}")
        lines.append(textwrap.indent(textwrap.fill(help_text, 90), "      "))
    return "\n".join(lines)


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a LoRA", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a LoRA. Settings layer as: defaults <- --preset <- --config <- --set.",
                       epilog=_settings_help())
    t.add_argument("--config", help="a config.toml (for example runs/x/config.toml to re-run a run)")
    t.add_argument("--model", help="base model: 'tiny', a diffusers folder, a .safetensors file or a Hub id "
                                   "(sets model.source)")
    t.add_argument("--dataset", help="folder of images with .txt captions (sets data.dataset)")
    t.add_argument("--preset", help="preset name (character, style, concept) or a preset .toml file")
    t.add_argument("--vram", type=int, metavar="GB", help="GPU memory tier (6, 8, 12, 16 or 24): batch, "
                   "checkpointing, caching, 8-bit optimizer and text-encoder training that fit it")
    t.add_argument("--output", help="run folder for config.toml, events.jsonl, samples and the LoRA (sets "
                                    "save.output_dir); a relative one that does not exist here goes in the "
                                    "workspace's runs/ ($LORA_STUDIO_HOME or ~/lora-studio), which the app lists")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting; repeatable (see the list below)")
    t.add_argument("--force", action="store_true", help="start over in a run folder that already holds a run")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or crashed run from its latest saved state "
                   "(its config.toml unless --config is given); the result equals an uninterrupted run")


def resolve_train_config(args) -> RunConfig:
    """defaults <- preset (for this model family, VRAM tier and dataset size) <- --config <- --set."""
    from trainer import presets

    overrides = list(args.overrides)
    for flag, key in ((args.model, "model.source"), (args.dataset, "data.dataset"), (args.output, "save.output_dir")):
        if flag is not None:
            overrides.append(f"{key}={_quote(flag)}")
    preset = None
    if args.preset:
        # The preset depends on what the rest of the layers chose: model, family and dataset.
        probe = RunConfig.load(args.config, overrides=overrides)
        preset = presets.resolve(args.preset, family=_peek_family(probe), vram=args.vram,
                                 n_images=_count_images(probe.data.dataset))
    elif args.vram:
        preset = presets.vram_layer(args.vram, _peek_family(RunConfig.load(args.config, overrides=overrides)))
    return RunConfig.load(preset, args.config, overrides=overrides)


def _peek_family(cfg: RunConfig) -> str | None:
    from trainer.models.info import peek_family

    return peek_family(cfg.model.source, cfg.model.family)


def _count_images(folder: str) -> int | None:
    from trainer.data.scan import DatasetError, scan

    try:
        return len(scan(folder).items) if folder else None
    except DatasetError:
        return None  # reported properly once training starts


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def plan_memory(cfg: RunConfig, vram: int | None):
    """The memory plan against where this run will train: the CUDA GPU torch sees (--vram caps it), else the
    CPU and its available RAM (a --vram tier then shapes the preset only: nothing here has that GPU)."""
    import torch

    from trainer.memory.plan import budget_for, make_plan

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = (props.name, props.total_memory / 2**30)
    return make_plan(cfg, budget_for(vram if gpu else None, gpu))


def _check_writable(run_dir: Path) -> None:
    """Fail before any model loads when the run folder cannot be written (a file in the path, read-only)."""
    import tempfile

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to the output folder {run_dir}: {e.strerror or e}; "
                          "pick another --output (save.output_dir)") from None


def cmd_train(args) -> int:
    import shutil

    from trainer.training.events import EVENTS_FILE
    from trainer.training.loop import train
    from trainer.training.state import STATE_DIR

    from trainer.resources import run_folder

    if args.resume:
        run_dir = run_folder(args.resume)
        if not (run_dir / "config.toml").exists() and not args.config:
            raise ConfigError(f"nothing to resume: {run_dir} has no config.toml; pass the run folder of an earlier run")
        args.config = args.config or str(run_dir / "config.toml")
        args.output = str(run_dir)
    cfg = resolve_train_config(args)
    if not cfg.data.dataset:
        raise ConfigError("no dataset: pass --dataset FOLDER or set data.dataset")
    cfg.save.output_dir = str(run_folder(cfg.save.output_dir))  # a relative one: in the workspace the app lists
    run_dir = Path(cfg.save.output_dir)
    _check_writable(run_dir)
    plan = plan_memory(cfg, args.vram)  # before anything loads: a run that cannot fit is refused here
    if plan.refused:
        raise ConfigError(plan.text())
    if plan.overrides:
        cfg = RunConfig.load(cfg.to_dict(), overrides=plan.overrides)
    if os.environ.get("RANK", "0") == "0":
        print(f"run folder: {run_dir}", flush=True)
        print(plan.text(), flush=True)
    if not args.resume and (run_dir / EVENTS_FILE).exists():
        if not args.force:
            raise ConfigError(f"run folder {run_dir} already holds a run; pass --output NEW_FOLDER, "
                              "or --force to start over in it")
        (run_dir / EVENTS_FILE).unlink()
        shutil.rmtree(run_dir / STATE_DIR, ignore_errors=True)  # the old run's states must not be resumed
    _leave_a_core()
    try:
        result = train(cfg, resume=bool(args.resume), plan=plan.to_dict())
    except Exception as e:
        # The app reads the run folder, not our stderr: leave the reason where it looks.
        from trainer.training.events import Events

        Events(run_dir).emit("error", message=str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise
    if result.is_main:
        print(f"{'stopped' if result.stopped_early else 'done'} after {result.steps} steps: {result.lora_path}")
    return 0


def _leave_a_core() -> None:
    """A run's process on the CPU: torch's threads on all cores but one (memory/cpu_features.training_threads). Set
    here, for the process a run owns, not in the library's train(), which tests and benchmarks call in their own."""
    import torch

    from trainer.memory.cpu_features import training_threads

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return
    threads = training_threads(int(os.environ.get("WORLD_SIZE", "1") or 1))
    if threads:
        torch.set_num_threads(threads)

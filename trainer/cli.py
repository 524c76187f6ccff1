"""`lora-studio` commands: thin wrappers over the library. Errors print one line and exit non-zero."""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from .config import ConfigError, RunConfig, describe


def _settings_help() -> str:
    lines = ["settings for --set section.key=value (and for config files):"]
    for key, help_text, default in describe():
        lines.append(f"  {key} = {default!r}")
        lines.append(textwrap.indent(textwrap.fill(help_text, 90), "      "))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-studio", description="Train and manage Stable Diffusion LoRAs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a LoRA", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a LoRA. Settings layer as: defaults <- --preset <- --config <- --set.",
                       epilog=_settings_help())
    t.add_argument("--config", help="a config.toml (for example runs/x/config.toml to re-run a run)")
    t.add_argument("--model", help="base model: 'tiny', a diffusers folder, a .safetensors file or a Hub id "
                                   "(sets model.source)")
    t.add_argument("--dataset", help="folder of images with .txt captions (sets data.dataset)")
    t.add_argument("--preset", help="preset name (character, style, concept) or a preset .toml file")
    t.add_argument("--output", help="run folder for config.toml, events.jsonl, samples and the LoRA "
                                    "(sets save.output_dir)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting; repeatable (see the list below)")
    t.add_argument("--force", action="store_true", help="start over in a run folder that already holds a run")
    return p


def resolve_train_config(args) -> RunConfig:
    from .presets import preset_path

    overrides = list(args.overrides)
    for flag, key in ((args.model, "model.source"), (args.dataset, "data.dataset"), (args.output, "save.output_dir")):
        if flag is not None:
            overrides.append(f"{key}={_quote(flag)}")
    preset = preset_path(args.preset) if args.preset else None
    return RunConfig.load(preset, args.config, overrides=overrides)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cmd_train(args) -> int:
    from .events import EVENTS_FILE
    from .loop import train

    cfg = resolve_train_config(args)
    if not cfg.data.dataset:
        raise ConfigError("no dataset: pass --dataset FOLDER or set data.dataset")
    run_dir = Path(cfg.save.output_dir)
    if (run_dir / EVENTS_FILE).exists():
        if not args.force:
            raise ConfigError(f"run folder {run_dir} already holds a run; pass --output NEW_FOLDER, "
                              "or --force to start over in it")
        (run_dir / EVENTS_FILE).unlink()
    result = train(cfg)
    if result.is_main:
        print(f"{'stopped' if result.stopped_early else 'done'} after {result.steps} steps: {result.lora_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .data.scan import DatasetError
    from .loop import TrainingError
    from .models import ModelError

    try:
        return {"train": cmd_train}[args.command](args)
    except (ConfigError, ModelError, TrainingError, DatasetError, ValueError) as e:
        print(f"lora-studio: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`lora-studio` commands: thin wrappers over the library, one module per command (train, dataset, lora, bench
and doctor). Errors print one line and exit non-zero."""
from __future__ import annotations

import argparse
import sys

from trainer.cli import bench, dataset, lora, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-studio", description="Train and manage LoRAs for image models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    train.add_parser(sub)
    dataset.add_parser(sub)
    lora.add_parser(sub)
    bench.add_parser(sub)
    bench.add_doctor_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from trainer.errors import ModelError, TrainingError

    try:
        return {"train": train.cmd_train, "dataset": dataset.cmd_dataset, "lora": lora.cmd_lora,
                "bench": bench.cmd_bench, "doctor": bench.cmd_doctor}[args.command](args)
    except (ModelError, TrainingError, ValueError) as e:  # ConfigError, DatasetError, LoraError are ValueErrors
        print(f"lora-studio: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is a file, read-only or gone: name it instead of a traceback
        import errno

        where = f" {e.filename}" if e.filename else ""
        fix = " (free disk space there, or write to another folder)" if e.errno == errno.ENOSPC else ""
        print(f"lora-studio: error: {e.strerror or e}:{where}{fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

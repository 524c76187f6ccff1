"""`lora-studio bench` (figures; the last line is one JSON object) and `lora-studio doctor`."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.config import ConfigError


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks that print figures; the last line is one JSON object")
    bsub = b.add_subparsers(dest="bench_command", metavar="NAME", required=True)
    bl = bsub.add_parser("learn", help="train each preset on its sample dataset with the embedded model; "
                                       "print base score, LoRA score, drift, steps and seconds")
    bl.add_argument("--kind", action="append", choices=["character", "style", "concept"],
                    help="only these presets (repeatable); default all three")
    bl.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a training setting for every preset")
    bl.add_argument("--fp8", action="store_true", help="the fp8 quality guard: each preset in bf16 at two seeds "
                                                      "and with fp8 frozen weights; prints both and the seed noise")
    bl.add_argument("--networks", action="store_true", help="LoRA, LoHa and LoKr on each preset at about the same "
                                                           "parameter count: score, drift and file size")
    bl.add_argument("--network", action="append", choices=["lora", "loha", "lokr"],
                    help="with --networks: only these networks (repeatable); default all three")
    bs = bsub.add_parser("speed", help="time and measure the training step on full-size SD1.5 / SDXL / SD3.5 "
                                       "Medium architectures "
                                       "(random weights) against a bare UNet floor; writes bench/results.md")
    bs.add_argument("--quick", action="store_true", help="only the target settings (a few minutes on a CPU)")
    bs.add_argument("--out", type=Path, default=Path("bench/results.md"), help="the results table to write")
    bs.add_argument("--measurements", type=Path, default=Path("bench/speed-measurements.json"),
                    help="where the raw measurements are saved")
    bs.add_argument("--from", dest="replay", type=Path, metavar="JSON",
                    help="measure nothing: rebuild the table from saved measurements with the current estimator")
    bs.add_argument("--only", choices=["tiny", "sd15", "sdxl", "sd35m"],
                    help="measure only this model's rows and keep every other row of the saved measurements")
    bc = bsub.add_parser("checkpoints", help="overfit the character preset on the embedded model, score every "
                                             "checkpoint, and check the recommended one against the best")
    bc.add_argument("--steps", type=int, default=1500, help="training steps (long enough to overfit)")
    bc.add_argument("--every", type=int, default=150, help="a checkpoint every this many steps")
    bc.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a training setting")
    bd = bsub.add_parser("data", help="import, check, scan and first step on generated datasets of 100, 1,000 and "
                                      "10,000 images; growth per operation; writes bench/results.md's Data path")
    bd.add_argument("--sizes", default="100,1000,10000", help="dataset sizes, comma-separated")
    bd.add_argument("--no-results", action="store_true", help="print only; leave bench/results.md alone")
    bq = bsub.add_parser("qlora", help="int8/nf4 frozen weights: stored bytes of Flux.1 and Z-Image blocks scaled to "
                         "full depth, a full-size SD1.5 64 px step's peak RSS and time per storage, and each preset "
                         "trained on an nf4 and an int8 base against fp32 (scored on the full-precision base)")
    bq.add_argument("--part", action="append", choices=["weights", "step", "quality"],
                    help="only this part (repeatable; default: all three)")
    bq.add_argument("--kind", action="append", choices=["character", "style", "concept"],
                    help="quality: only this preset (repeatable)")
    bq.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="quality: a setting for every training run")
    bq.add_argument("--no-results", action="store_true", help="print only; leave bench/results.md alone")
    bq.add_argument("--report", metavar="JSON", type=Path,
                    help="measure nothing: write bench/results.md's QLoRA sections again from this measurements file "
                         "(bench/qlora-measurements.json, which each run updates)")
    bm = bsub.add_parser("modern", help="one block of Flux.1 and of Z-Image at full width: the activations it keeps "
                                        "with and without checkpointing at 512 and 1024 px, scaled to the published "
                                        "depths; writes bench/results.md's Modern families")
    bm.add_argument("--sizes", default="512,1024", help="image sizes in pixels, comma-separated")
    bm.add_argument("--no-results", action="store_true", help="print only; leave bench/results.md alone")


def add_doctor_parser(sub) -> None:
    dr = sub.add_parser("doctor", help="versions, device, free disk and known-bad combinations, each with a fix; "
                                       "exits 1 when something would stop a run")
    dr.add_argument("--json", action="store_true", help="print one JSON object")
    dr.add_argument("--vram", type=float, metavar="GB", help="plan for a GPU of this much memory (or at most this "
                                                             "much of this machine's GPU)")


def _sizes(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--sizes {text!r} must be whole numbers separated by commas") from None


def cmd_bench(args) -> int:
    if args.bench_command == "data":
        from trainer.bench.data import main as bench_data

        bench_data(_sizes(args.sizes), None if args.no_results else Path("bench/results.md"))
    elif args.bench_command == "modern":
        from trainer.bench.modern import main as bench_modern

        bench_modern(_sizes(args.sizes), None if args.no_results else Path("bench/results.md"))
    elif args.bench_command == "qlora":
        if args.report:
            import json

            from trainer.bench.qlora_report import render

            try:
                saved = json.loads(args.report.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"--report {args.report}: cannot read it as bench qlora's measurements ({e})") \
                    from None
            print(f"wrote {', '.join(render(saved, Path('bench/results.md'))) or 'nothing'} of bench/results.md")
            return 0
        from trainer.bench.qlora import main as bench_qlora

        bench_qlora(tuple(args.part or ("weights", "step", "quality")),
                    tuple(args.kind or ("character", "style", "concept")), args.overrides,
                    None if args.no_results else Path("bench/results.md"))
    elif args.bench_command == "checkpoints":
        from trainer.bench.checkpoints import main as bench_checkpoints

        bench_checkpoints(args.steps, args.every, args.overrides)
    elif args.bench_command == "learn":
        from trainer.bench.learn import main as bench_learn

        bench_learn(tuple(args.kind or ("character", "style", "concept")), args.overrides, fp8=args.fp8,
                    networks=tuple(args.network or ("lora", "loha", "lokr")) if args.networks else ())
    elif args.bench_command == "speed":
        from trainer.bench.speed import main as bench_speed

        bench_speed(args.quick, args.out, args.measurements, args.replay, args.only)
    return 0


def cmd_doctor(args) -> int:
    from trainer.doctor import check

    report = check(vram=args.vram)
    print(json.dumps(report.to_dict()) if args.json else report.text())
    return 1 if report.blocking else 0

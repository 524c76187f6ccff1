"""`lora-studio lora`: inspect, merge, resize, analyze, bake, card."""
from __future__ import annotations

import sys
from pathlib import Path

from trainer.config import ConfigError
from trainer.cli.common import _Said, _emit


def add_parser(sub) -> None:
    lo = sub.add_parser("lora", help="inspect, merge, bake, resize, analyze LoRA files and write model cards")
    lsub = lo.add_subparsers(dest="lora_command", metavar="TOOL", required=True)
    li = lsub.add_parser("inspect", help="family, ranks, alpha, trigger words, hash and metadata")
    li.add_argument("file")
    li.add_argument("--json", action="store_true", help="print one JSON object")
    lm = lsub.add_parser("merge", help="merge LoRAs at weights: exact (rank concatenation) or SVD to --rank")
    lm.add_argument("files", nargs="+", help="FILE[:WEIGHT] ..., weight 1 when omitted")
    lm.add_argument("--out", required=True, help="output .safetensors")
    lm.add_argument("--rank", type=int, help="compress to this rank by SVD (reports the energy lost)")
    lr = lsub.add_parser("resize", help="change a LoRA's rank by SVD")
    lr.add_argument("file")
    lr.add_argument("--out", required=True, help="output .safetensors")
    how = lr.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="fixed new rank")
    how.add_argument("--sv-ratio", type=float, help="per module, keep singular values >= largest / RATIO")
    how.add_argument("--sv-fro", type=float, help="per module, keep this fraction of the energy (e.g. 0.95)")
    la = lsub.add_parser("analyze", help="singular-value spectrum and the rank this LoRA needs")
    la.add_argument("file")
    la.add_argument("--json", action="store_true", help="print one JSON object")
    lb = lsub.add_parser("bake", help="fuse LoRAs at weights into a copy of a base model")
    lb.add_argument("files", nargs="+", help="FILE[:WEIGHT] ...")
    lb.add_argument("--model", required=True, help="base model: folder, .safetensors or Hub id")
    lb.add_argument("--out", required=True, help="output folder (diffusers layout, .safetensors weights)")
    lc = lsub.add_parser("card", help="write <name>.README.md beside the LoRA")
    lc.add_argument("file")
    for tool in (lm, lr, lb, lc):
        tool.add_argument("--force", action="store_true", help="overwrite an existing output")
    for tool in (lm, lr):
        tool.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="saved tensor dtype")


def _weighted(items: list[str]) -> tuple[list[str], list[float]]:
    """FILE[:WEIGHT] items. A colon is a weight separator only after a file name (so C:\\x.safetensors is a path)."""
    import math

    files, weights = [], []
    for item in items:
        path, sep, w = item.rpartition(":")
        if not sep or not (path.lower().endswith(".safetensors") or Path(path).is_file()):
            path, w = item, "1"
        try:
            weight = float(w)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ConfigError(f"bad weight {w!r} in {item!r}; use FILE:WEIGHT with a number, such as "
                              "style.safetensors:0.6") from None
        files.append(path)
        weights.append(weight)
    return files, weights


def cmd_lora(args) -> int:
    from trainer.lora import tools

    c = args.lora_command
    if c == "inspect":
        from trainer.file_hashes import describe as describe_hashes

        info = tools.inspect(args.file)
        lines = [f"{info['file']}: {info['family'] or 'unknown family'} ({info['family_source']}), {info['kind']}, "
                 f"{info['layout']} layout", f"  rank {info['rank']} (all: {info['ranks']}), alpha {tools.alpha_text(info['alpha'])}, "
                 f"{info['modules']} modules",
                 *([f"  {info['network']} factors: " + "; ".join(f"{k} ({v} modules)" for k, v in
                                                               info["factors"].items()),
                    f"  effective rank of each update: {info['effective_ranks']}"] if "network" in info else []),
                 f"  trigger words: {', '.join(info['trigger_words']) or '(none)'}",
                 *[f"  loads in: {line}" for line in info["loads_in"]],
                 *[f"  {line}" for line in describe_hashes(info)]]
        lines += [f"  {k} = {v}" for k, v in sorted(info["metadata"].items()) if k != "lora_studio.config"]
        _emit(args, info, lines)
        for problem in info["defects"] + info["warnings"]:  # on stderr, so --json output stays one object
            print(f"lora-studio: warning: {Path(args.file).name}: {problem}", file=sys.stderr)
    elif c == "merge":
        files, weights = _weighted(args.files)
        r = tools.merge(files, weights, args.out, rank=args.rank, dtype=args.dtype, force=args.force)
        print(f"wrote {r['file']}: {r['modules']} modules, rank {r['rank']}, "
              + ("exact" if r["exact"] else f"{r['energy_lost']:.2%} of the energy lost (mean per module)")
              + (f"; the {'/'.join(r['converted_from'])} input(s) became a plain LoRA (their ΔW, by SVD)"
                 if r["converted_from"] else ""))
    elif c == "resize":
        r = tools.resize(args.file, args.out, rank=args.rank, sv_ratio=args.sv_ratio, sv_fro=args.sv_fro,
                         dtype=args.dtype, force=args.force)
        print(f"wrote {r['file']}: ranks {r['ranks']}, energy lost mean {r['energy_lost_mean']:.2%}, "
              f"max {r['energy_lost_max']:.2%}"
              + (f"; a plain LoRA now (the {r['converted_from']}'s ΔW, by SVD)" if r["converted_from"] else ""))
    elif c == "analyze":
        a = tools.analyze(args.file)
        lines = [f"rank for 90/95/99% of the energy: {a['rank_for_90']}/{a['rank_for_95']}/{a['rank_for_99']}",
                 a["suggestion"]]
        _emit(args, a, lines)
    elif c == "bake":
        files, weights = _weighted(args.files)
        with _Said("baking") as said:
            r = tools.bake(args.model, files, weights, args.out, force=args.force, progress=said)
        print(f"wrote {r['folder']}: {r['modules_changed']} layers changed")
    elif c == "card":
        print(f"wrote {tools.card(args.file, force=args.force)}")
    return 0

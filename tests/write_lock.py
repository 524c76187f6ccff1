"""Write requirements.lock: one set of pins for every target LoRA Studio supports, by uv's universal resolver.

    python tests/write_lock.py [--upgrade] [--out FILE]

Every Python that pyproject.toml accepts (requires-python) and every platform (Windows x86-64, Linux x86-64 and
aarch64, macOS arm64) gets its pins, with environment markers where they differ (numpy for 3.11 and for 3.12+,
colorama on Windows). Without --upgrade the pins already in the output file are kept where they still fit (uv reads
them as preferences), so only what must change changes. Every extra is pinned too (the launcher installs `cuda` and
`window` where they apply). The CUDA runtime packages a torch build brings (nvidia-*, cuda-*) are left out: each
build (cu130, cu128, cu126, ROCm, CPU) names its own, and pinning PyPI's would fight the others. pip reads the
markers as constraints: `pip install -c requirements.lock ...`."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEFT_TO_TORCH = re.compile(r"^(nvidia-[\w-]+|cuda-[\w-]+)==", re.M)


def uv() -> list[str]:
    found = shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def floor() -> str:
    """The lowest Python pyproject.toml accepts: the resolution covers it and every newer one it allows."""
    m = re.search(r'^requires-python\s*=\s*"[^"]*>=\s*(\d+\.\d+)', (ROOT / "pyproject.toml").read_text(), re.M)
    return m.group(1)


def compile_lock(out: Path, upgrade: bool, left_out: list[str]) -> str:
    cmd = [*uv(), "pip", "compile", str(ROOT / "pyproject.toml"), "--all-extras", "--universal", "--python-version",
           floor(), "--no-header", "--no-annotate", "--quiet", "-o", str(out), *(["--upgrade"] if upgrade else [])]
    for name in left_out:
        cmd += ["--no-emit-package", name]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out.read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upgrade", action="store_true", help="the newest versions pyproject's ranges allow")
    p.add_argument("--out", type=Path, default=ROOT / "requirements.lock")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "lock.txt"
        if args.out.exists():
            shutil.copyfile(args.out, work)  # its pins are the preferences
        text = compile_lock(work, args.upgrade, [])
        left_out = sorted(set(m.group(1) for m in LEFT_TO_TORCH.finditer(text)))
        if left_out:
            text = compile_lock(work, args.upgrade, left_out)
    torch = re.search(r"^torch==(\S+)", text, re.M).group(1)
    header = ("# LoRA Studio's tested versions for every supported target: Python " + floor() + " to what "
              "pyproject.toml's requires-python allows, on Windows x86-64, Linux x86-64 and aarch64 and macOS 14+ arm64 "
              "(environment markers where the pins differ). pip constraints: pip install -c requirements.lock ...\n"
              f"# Written by 'python tests/write_lock.py' (uv pip compile --universal) on {date.today()}; torch {torch}'s "
              "CUDA packages are the chosen build's own and not pinned here. tests/test_install.py resolves it for each "
              "target.\n")
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(header + text, encoding="utf-8")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out} ({len(re.findall(r'^[A-Za-z0-9].*==', text, re.M))} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

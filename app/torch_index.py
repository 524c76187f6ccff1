"""Does the torch index the launcher chose serve the locked torch for this Python and platform? Asked once, with a
short timeout, before anything installs: a missing build falls back to the next one the GPU and driver run (cu130 ->
cu128 -> cu126 -> cpu; rocm -> cpu) with the reason said, and an unreachable index to the user's own configured
index, said before pip's retries would spend minutes on it. Standard library only."""
from __future__ import annotations

import re
import urllib.error
import urllib.request
from dataclasses import dataclass

TIMEOUT_S = 6.0
# What each platform's wheel filenames end with (the CPU word of a manylinux tag aside).
PLATFORM_TAGS = {("linux", "x86_64"): ("manylinux", "x86_64"), ("linux", "aarch64"): ("manylinux", "aarch64"),
                 ("windows", "x86_64"): ("win_amd64", ""), ("windows", "arm64"): ("win_arm64", ""),
                 ("macos", "arm64"): ("macosx", "arm64")}


@dataclass
class Served:
    ok: bool  # the index answered and lists a wheel of that torch for this Python and platform
    reachable: bool
    detail: str  # what was asked and found, for the line the user reads


def wheel_matches(name: str, version: str, variant: str | None, py: str, os_name: str, machine: str) -> bool:
    """`torch-2.13.0+cu128-cp312-cp312-manylinux_2_28_x86_64.whl` for version 2.13.0, variant cu128, Python 3.12,
    linux x86_64 (PyPI's builds have no local +variant)."""
    m = re.match(r"torch-([^-]+)-(cp\d+)-(cp\d+t?|abi3|none)-(.+)\.whl$", name)
    if not m:
        return False
    public, _, local = m.group(1).partition("+")
    if public != version or (variant and local and local != variant):
        return False
    if m.group(2) != "cp" + py.replace(".", "") or m.group(3).endswith("t"):  # no free-threaded builds
        return False
    platform_tag = m.group(4)
    kind, cpu = PLATFORM_TAGS.get((os_name, arch(os_name, machine)), ("", ""))
    return bool(kind) and platform_tag.startswith(kind) and (not cpu or platform_tag.endswith(cpu))


def arch(os_name: str, machine: str) -> str:
    """The CPU as wheel tags name it: x86_64, and aarch64 on Linux or arm64 elsewhere."""
    m = machine.lower()
    if m in ("amd64", "x64", "x86_64"):
        return "x86_64"
    if m in ("arm64", "aarch64"):
        return "aarch64" if os_name == "linux" else "arm64"
    return m


def check(index_url: str, version: str, variant: str | None, py: str, os_name: str, machine: str,
          fetch=None) -> Served:
    """Ask `index_url`/torch/ (PEP 503) whether it serves the build; `fetch(url) -> html` is for tests."""
    url = index_url.rstrip("/") + "/torch/"
    os_machine = arch(os_name, machine)
    try:
        page = (fetch or _fetch)(url)
    except (OSError, urllib.error.URLError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return Served(False, False, f"{index_url} did not answer within {TIMEOUT_S:.0f} s ({reason})")
    names = re.findall(r">\s*(torch-[^<\s]+\.whl)\s*<", page) or re.findall(r"/(torch-[^/\"#?]+\.whl)", page)
    if any(wheel_matches(n, version, variant, py, os_name, os_machine) for n in names):
        return Served(True, True, f"{index_url} serves torch {version} for Python {py} on {os_name} {os_machine}")
    return Served(False, True, f"{index_url} has no torch {version} for Python {py} on {os_name} {os_machine}")


def _fetch(url: str) -> str:
    req = urllib.request.Request(url, headers={"User-Agent": "lora-studio-launcher"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
        return r.read(8 * 2**20).decode("utf-8", errors="replace")

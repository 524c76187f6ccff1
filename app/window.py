"""The UI in a native window, in a process of its own (`python -m app.window URL --runs DIR`): a GUI toolkit that
crashes or aborts (Qt without libxcb-cursor0 aborts the whole process) takes this process down, never the server; the
app then names the cause in one line and opens the browser. Closing the window asks first only while a run trains.

pywebview's backend: Qt from wheels on Linux (the `window` extra; a plain venv cannot import Debian's GTK bindings),
WebView2 on Windows, WebKit on macOS."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

APP_NAME = "LoRA Studio"


def active_runs(runs: Path) -> list[str]:
    """Runs whose trainer is alive now: closing the window does not stop them, and the question says so."""
    from app.jobs import view

    if not runs.is_dir():
        return []
    return [d.name for d in sorted(runs.iterdir()) if d.is_dir() and view(d).state in ("running", "stopping")]


def closing_question(names: list[str]) -> str:
    which = ", ".join(names)
    return (f"{'Run' if len(names) == 1 else 'Runs'} {which} keep{'s' if len(names) == 1 else ''} training in the "
            "background when LoRA Studio closes; open the app again to follow it. Close LoRA Studio?")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.window")
    p.add_argument("url")
    p.add_argument("--runs", type=Path, required=True, help="the workspace's runs folder")
    args = p.parse_args(argv)
    if sys.platform.startswith("linux"):
        missing = missing_libraries(qt_xcb_plugin())
        if missing:  # Qt would print a misleading line (it always names xcb-cursor) and abort
            print(f"missing system libraries: {' '.join(missing)}", file=sys.stderr)
            return 3
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # Chromium (in QtWebEngine) refuses to run as root with its sandbox; the page is our own, on loopback
            os.environ.setdefault("QTWEBENGINE_DISABLE_SANDBOX", "1")
    import webview  # the window extra: python launch.py --window installs it

    window = webview.create_window(APP_NAME, args.url, width=1400, height=950)

    def closing():
        names = active_runs(args.runs)
        return True if not names else window.create_confirmation_dialog(APP_NAME, closing_question(names))

    window.events.closing += closing
    webview.start(gui="qt" if sys.platform.startswith("linux") else None)
    return 0


def qt_xcb_plugin() -> Path | None:
    """Qt's X11 platform plugin in the installed PyQt6 wheel, without importing Qt."""
    import importlib.util

    spec = importlib.util.find_spec("PyQt6")
    if spec is None or not spec.submodule_search_locations:
        return None
    plugin = Path(list(spec.submodule_search_locations)[0]) / "Qt6" / "plugins" / "platforms" / "libqxcb.so"
    return plugin if plugin.is_file() else None


def missing_libraries(binary: Path | None, ldd: str | None = None) -> list[str]:
    """The shared libraries `binary` needs that the system lacks, all of them at once (the loader names only the
    first): what ldd reports as 'not found'."""
    ldd = ldd or shutil.which("ldd")
    if binary is None or ldd is None:
        return []
    try:
        out = subprocess.run([ldd, str(binary)], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({m.group(1) for m in re.finditer(r"^\s*(\S+)\s+=>\s+not found", out, re.M)})


def debian_package(soname: str) -> str:
    """Debian's package for a library: libxcb-icccm.so.4 -> libxcb-icccm4, libxkbcommon-x11.so.0 ->
    libxkbcommon-x11-0 (a hyphen before the number where the name ends in a digit)."""
    m = re.match(r"(lib[\w.+-]+?)\.so\.(\d+)", soname)
    if not m:
        return soname
    name, major = m.groups()
    return f"{name}{'-' if name[-1].isdigit() else ''}{major}"


def _missing_line(found: str) -> str:
    names = found.split()
    return (f"Qt needs the system {'libraries' if len(names) > 1 else 'library'} {', '.join(names)} (Debian/Ubuntu: "
            f"sudo apt install {' '.join(debian_package(n) for n in names)})")


# What a failed window's output says, most telling first: (pattern, the line the user reads).
CAUSES = [
    (r"missing system libraries: (.+)", _missing_line),
    (r"xcb-cursor|libxcb-cursor", "Qt needs the system library libxcb-cursor0 (Debian/Ubuntu: sudo apt install "
                                  "libxcb-cursor0)"),
    (r"error while loading shared libraries: (\S+?):|(lib[\w.+-]+\.so[\d.]*): cannot open shared object file",
     "the system library {0} is missing (install the package that has it, e.g. apt-file search {0})"),
    (r"could not connect to display|cannot open display|no display name|\$DISPLAY", "there is no display to open a "
                                                                                  "window on (a server or an SSH session)"),
    (r"No module named ['\"]?(webview|qtpy|PyQt6)", "pywebview and its Qt backend are not installed: python launch.py "
                                                     "--window installs them"),
    (r"Running as root without --no-sandbox", "Chromium in Qt refused to run as root: set QTWEBENGINE_DISABLE_SANDBOX=1 "
                                              "or run LoRA Studio as a normal user"),
    (r"WebView2", "the Microsoft Edge WebView2 Runtime is missing: install it from microsoft.com/edge/webview2"),
]


def failure(output: str, returncode: int) -> str:
    """One line for a window that could not open, from what its process printed (no backend traceback reaches the
    console)."""
    for pattern, line in CAUSES:
        m = re.search(pattern, output, re.I)
        if m:
            found = next((g for g in m.groups() if g), "") if m.groups() else ""
            return line(found.strip()) if callable(line) else line.format(found)
    last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), "")
    return f"the window's process ended ({'signal ' + str(-returncode) if returncode < 0 else 'exit ' + str(returncode)})" \
           + (f": {last[:200]}" if last else "")


if __name__ == "__main__":
    sys.exit(main())

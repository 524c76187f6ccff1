"""Desktop touches: a shortcut that starts the app, a native window, and what closing the app means for a run.

Standard library only (pywebview is an optional extra). The platform is a parameter everywhere, so each
platform's choice is tested on any machine.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

APP_NAME = "LoRA Studio"


def start_command(launcher: str | None = None, python: str = sys.executable) -> list[str]:
    """What a shortcut runs: the launcher (it re-checks the install first) when the app was started by it, else the
    app from this environment."""
    launcher = launcher if launcher is not None else os.environ.get("LORA_STUDIO_LAUNCHER")
    if launcher and Path(launcher).is_file():
        return [python, str(Path(launcher).resolve())]
    return [python, "-m", "app"]


def _desktop_exec(args: list[str]) -> str:
    """A freedesktop Exec= value: each argument quoted, with the characters the spec reserves escaped."""
    out = []
    for a in args:
        escaped = "".join("\\" + c if c in '"`$\\' else c for c in a).replace("%", "%%")
        out.append(f'"{escaped}"')
    return " ".join(out)


def linux_entry(command: list[str], workdir: Path) -> str:
    return "\n".join([
        "[Desktop Entry]", "Type=Application", f"Name={APP_NAME}",
        "Comment=Train LoRAs for image models on this computer", f"Exec={_desktop_exec(command)}",
        f"Path={workdir}", "Terminal=true", "Categories=Graphics;Development;", ""])


def macos_script(command: list[str], workdir: Path) -> str:
    return f"#!/bin/sh\n# {APP_NAME}: double-click to start it (Terminal shows its log; close it to stop).\n" \
           f"cd {shlex.quote(str(workdir))} && exec {shlex.join(command)}\n"


# Runs in PowerShell with the values in environment variables, so no path needs quoting inside the script.
WINDOWS_SCRIPT = (
    "$s = New-Object -ComObject WScript.Shell; "
    "foreach ($dir in @([Environment]::GetFolderPath('Desktop'), [Environment]::GetFolderPath('Programs'))) { "
    "$path = Join-Path $dir 'LoRA Studio.lnk'; $l = $s.CreateShortcut($path); "
    "$l.TargetPath = $env:LS_TARGET; $l.Arguments = $env:LS_ARGS; $l.WorkingDirectory = $env:LS_WORKDIR; "
    "$l.Description = 'LoRA Studio'; $l.Save(); Write-Output $path }")


def write_shortcut(os_name: str, command: list[str], workdir: Path, home: Path | None = None,
                   run=subprocess.run) -> list[Path]:
    """Write a desktop and start-menu entry that runs `command`; returns the files written."""
    home = home or Path.home()
    if os_name == "windows":
        env = {**os.environ, "LS_TARGET": command[0], "LS_ARGS": subprocess.list2cmdline(command[1:]),
               "LS_WORKDIR": str(workdir)}
        try:
            out = run(["powershell", "-NoProfile", "-NonInteractive", "-Command", WINDOWS_SCRIPT], env=env,
                      capture_output=True, text=True, timeout=60)
            made = [Path(p.strip()) for p in out.stdout.splitlines() if p.strip()] if out.returncode == 0 else []
        except (OSError, subprocess.SubprocessError):
            made = []
        if made:
            return made
        # No PowerShell (or it refused): a .cmd file on the desktop does the same.
        target = home / "Desktop" / f"{APP_NAME}.cmd"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f'@echo off\r\ncd /d "{workdir}"\r\n{subprocess.list2cmdline(command)}\r\n', encoding="utf-8")
        return [target]
    if os_name == "macos":
        paths = [home / "Desktop" / f"{APP_NAME}.command", home / "Applications" / f"{APP_NAME}.command"]
        text = macos_script(command, workdir)
    else:
        data = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
        paths = [data / "applications" / "lora-studio.desktop"]
        if (home / "Desktop").is_dir():
            paths.append(home / "Desktop" / "lora-studio.desktop")
        text = linux_entry(command, workdir)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        path.chmod(0o755)  # launchers and .command files run only when executable
    return paths


def closing_note(active: list[str], runs_dir: Path) -> str | None:
    """What the console says when the app closes while runs train: they keep going (each is its own process)."""
    if not active:
        return None
    names = ", ".join(active)
    return (f"LoRA Studio closed; {'run' if len(active) == 1 else 'runs'} {names} keep{'s' if len(active) == 1 else ''}"
            f" training in the background (its files: {runs_dir}). Start the app again to follow it; to stop it, "
            f"create a file named STOP in its run folder")

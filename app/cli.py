"""`lora-studio`: with no command (or `ui`) it serves the web UI; `train`, `dataset`, `lora`, `bench` and `doctor`
go to the trainer's CLI in a fresh interpreter, so this process never imports torch."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from .desktop import closing_note

TRAINER_COMMANDS = ("train", "dataset", "lora", "bench", "doctor")
COMMANDS = {
    "ui": "the web UI (the default): Datasets, Train, Preview and Library",
    "train": "train a LoRA from a preset, a config file and --set overrides",
    "dataset": "import, check, caption and count a dataset",
    "lora": "inspect, merge, resize, analyze, bake LoRA files; write a model card",
    "bench": "measure speed and memory, learning, checkpoints, and the data path",
    "doctor": "versions, device, disk, known-bad combinations and the memory plan here",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lora-studio", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train and manage LoRAs for image models. With no command, start the web UI on 127.0.0.1.",
        epilog="commands (each has its own --help, e.g. lora-studio train --help):\n" + "\n".join(
            f"  {name:<9} {what}" for name, what in COMMANDS.items()))
    p.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND", help="ui (the default), "
                   + ", ".join(TRAINER_COMMANDS))
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--workspace", type=Path, help="folder for datasets/, runs/ and loras/ "
                   "(default $LORA_STUDIO_HOME or ~/lora-studio)")
    p.add_argument("--listen", nargs="?", const="0.0.0.0", metavar="ADDRESS",
                   help="serve on other interfaces (default all); requires --auth or --auth-file")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="require this login")
    p.add_argument("--auth-file", type=Path, help="file with one USER:PASSWORD per line")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser (scripts, servers, tests)")
    p.add_argument("--window", action="store_true", help="open the UI in a native window (pywebview, the optional "
                   "'window' extra: python launch.py --window installs it); the browser when it is missing")
    p.add_argument("--shortcut", action="store_true", help="add a desktop and start-menu entry that starts LoRA "
                   "Studio, then exit")
    p.add_argument("--allow-path", type=Path, action="append", default=[], metavar="DIR",
                   help="a folder outside the workspace that the UI may read and write (a models folder, datasets "
                        "kept elsewhere); repeatable. Without it the UI stays inside the workspace and the cache")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="answer requests for this host name too (by default only localhost names, against DNS "
                        "rebinding); repeatable")
    p.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="let pages from this origin (e.g. http://myhost:8080) send requests that change things; "
                        "repeatable")
    return p


def read_auth(args) -> list[tuple[str, str]]:
    lines = []
    if args.auth:
        lines.append(args.auth)
    if args.auth_file:
        try:
            lines += [ln.strip() for ln in args.auth_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except OSError as e:
            raise SystemExit(f"lora-studio: error: cannot read auth file {args.auth_file}: {e.strerror}")
    pairs = []
    for line in lines:
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise SystemExit("lora-studio: error: auth must look like USER:PASSWORD (both non-empty)")
        pairs.append((user, password))
    return pairs


def port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # As the server itself binds: connections of a just-stopped app (TIME_WAIT) must not count as in use.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def run_trainer(argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "trainer", *argv]
    if os.name == "posix":
        os.execv(sys.executable, cmd)  # replaces this process: exit codes and Ctrl-C behave as if direct
    return subprocess.call(cmd)


def make_shortcut() -> int:
    from .desktop import start_command, write_shortcut
    from .launcher import detect_os

    command = start_command()
    for path in write_shortcut(detect_os(), command, Path(command[-1]).parent if command[-1].endswith(".py")
                               else Path.cwd()):
        print(f"LoRA Studio: wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TRAINER_COMMANDS:
        return run_trainer(argv)
    args = parser().parse_args(argv)
    if args.shortcut:
        return make_shortcut()
    auth = read_auth(args)
    host = "127.0.0.1"
    if args.listen:
        if not auth:
            print("lora-studio: error: --listen exposes your files and GPU to the network; add --auth USER:PASSWORD "
                  "or --auth-file FILE", file=sys.stderr)
            return 2
        host = args.listen
    if not port_free(host, args.port):
        print(f"lora-studio: error: port {args.port} on {host} is in use (is LoRA Studio already running? open "
              f"http://{host}:{args.port}); start another with --port N", file=sys.stderr)
        return 2
    from .main import serve
    from .workspace import Workspace, default_root

    allowed = []
    for folder in args.allow_path:
        folder = folder.expanduser().resolve()
        if not folder.is_dir():
            print(f"lora-studio: error: --allow-path {folder} is not a folder", file=sys.stderr)
            return 2
        allowed.append(folder)
    from .request_guard import is_loopback

    ws = Workspace((args.workspace or default_root()).expanduser().resolve(), allowed_paths=tuple(allowed),
                   models_anywhere=is_loopback(host))
    print(f"LoRA Studio: workspace {ws.root}; serving on http://{host}:{args.port}"
          + ("; base models are read from any folder, files are written inside the workspace" if ws.models_anywhere
             else "; models and files inside the workspace and --allow-path folders only (listening on a network)"),
          flush=True)
    window = args.window and not args.no_browser
    from .main import StartupError

    try:
        demo, runner = serve(ws, host=host, port=args.port, auth=auth or None,
                             open_browser=not (args.no_browser or window), block=not window,
                             allowed_hosts=tuple(args.allow_host), allowed_origins=tuple(args.allow_origin))
    except StartupError as e:
        print(f"lora-studio: error: {e}", file=sys.stderr)
        return 1
    if window:
        show_window(demo, f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{args.port}/", ws.runs)
    note = closing_note(runner.active_runs(), ws.runs)
    if note:
        print(note, flush=True)
    return 0


def show_window(demo, url: str, runs: Path, run=subprocess.run) -> str | None:
    """The UI in a native window, in a process of its own, until it is closed. When it cannot open or crashes (a GUI
    toolkit that aborts takes only that process), one line says why and the browser opens; the server stays up until
    Ctrl-C. Returns that line (None when the window opened and was closed)."""
    import logging

    from .window import failure

    out = run([sys.executable, "-m", "app.window", url, "--runs", str(runs)], capture_output=True, text=True)
    if out.returncode == 0:  # the user closed the window: the app closes with it
        close = getattr(demo, "close", None)
        if close:
            close()
        return None
    logging.getLogger("lora_studio.details").info("the window's process said:\n%s", (out.stderr or "")[-8000:])
    why = f"the native window could not open: {failure((out.stderr or '') + (out.stdout or ''), out.returncode)}"
    import webbrowser

    print(f"LoRA Studio: {why}; opening the browser instead", flush=True)
    webbrowser.open(url)
    demo.block_thread()
    return why


if __name__ == "__main__":
    sys.exit(main())

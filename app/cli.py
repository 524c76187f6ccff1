"""`lora-studio`: with no command (or `ui`) it serves the web UI; `train`, `dataset`, `lora`, `bench` and `doctor`
go to the trainer's CLI in a fresh interpreter, so this process never imports torch."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

TRAINER_COMMANDS = ("train", "dataset", "lora", "bench", "doctor")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lora-studio", description="Train and manage Stable Diffusion LoRAs. With no command, start the "
        "web UI on 127.0.0.1. Commands: ui, train, dataset, lora, bench, doctor (`lora-studio train --help`).")
    p.add_argument("command", nargs="?", choices=["ui"], help="the web UI (the default)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--workspace", type=Path, help="folder for datasets/, runs/ and loras/ "
                   "(default $LORA_STUDIO_HOME or ~/lora-studio)")
    p.add_argument("--listen", nargs="?", const="0.0.0.0", metavar="ADDRESS",
                   help="serve on other interfaces (default all); requires --auth or --auth-file")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="require this login")
    p.add_argument("--auth-file", type=Path, help="file with one USER:PASSWORD per line")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser (scripts, servers, tests)")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TRAINER_COMMANDS:
        return run_trainer(argv)
    args = parser().parse_args(argv)
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
    ws = Workspace((args.workspace or default_root()).expanduser().resolve(), allowed_paths=tuple(allowed))
    print(f"LoRA Studio: workspace {ws.root}; serving on http://{host}:{args.port}", flush=True)
    serve(ws, host=host, port=args.port, auth=auth or None, open_browser=not args.no_browser,
          allowed_hosts=tuple(args.allow_host), allowed_origins=tuple(args.allow_origin))
    return 0


if __name__ == "__main__":
    sys.exit(main())

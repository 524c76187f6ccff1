"""The desktop install and the platform paths: the launcher's choice of torch for any PC (faked OS and GPU), its
install records and one-line errors, shortcuts, no unguarded POSIX-only call, Windows' VRAM spill seen in a run,
and the launcher itself installing and starting the app from a fresh copy of the checkout (browser test)."""
import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path, PureWindowsPath

import pytest

from app import desktop, launcher
from app.launcher import Gpu, LaunchError, choose_torch

ROOT = Path(__file__).resolve().parent.parent


def dry_run(*args: str, installer: str = "", code: int = 0) -> dict:
    """`python launch.py --dry-run ARGS` as a user runs it; its last line is one JSON object. `installer`: pip to
    describe the installs that fall back to pip."""
    env = {**os.environ, "LORA_STUDIO_INSTALLER": installer}
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--dry-run", *args], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env=env)
    assert out.returncode == code, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    return json.loads(out.stdout.strip().splitlines()[-1])


LOCKED_TORCH = launcher.locked_version(ROOT / "requirements.lock")


@pytest.mark.smoke
def test_dry_run_windows_rtx_4070_driver_566_gets_cuda_12_6():
    got = dry_run("--os", "windows", "--gpu", "NVIDIA GeForce RTX 4070, 12282 MiB, 566.36")
    assert got["torch"]["version"] == LOCKED_TORCH == "2.13.0"
    # 566 is past CUDA 12.6's minimum on Windows (560.76) and short of 12.8's (570.65).
    assert got["torch"]["variant"] == "cu126"
    assert got["torch"]["index_url"] == "https://download.pytorch.org/whl/cu126"
    assert got["gpu"] == {"vendor": "nvidia", "name": "NVIDIA GeForce RTX 4070", "memory_mib": 12282, "driver": "566.36"}
    assert got["venv"].endswith(".venv") and got["lock"].endswith("requirements.lock") and got["installer"] == "uv"
    torch_step = next(s for s in got["steps"] if f"torch=={LOCKED_TORCH}" in s)
    # uv, into Windows' venv layout, under the lock's constraints, torch alone from PyTorch's cu126 index
    assert torch_step[0].replace("\\", "/").endswith(".uv/bin/uv.exe") and torch_step[1:3] == ["pip", "install"]
    python = torch_step[torch_step.index("--python") + 1]
    assert python.replace("\\", "/").endswith(".venv/Scripts/python.exe")
    assert torch_step[torch_step.index("-c") + 1] == str(ROOT / "requirements.lock")
    assert torch_step[-2:] == ["--torch-backend", "cu126"]
    rest = got["steps"][-1]
    assert "-c" in rest and rest[-1].endswith("[cuda]")  # bitsandbytes' 8-bit AdamW, which the VRAM tiers use
    # pip, where uv cannot be had: the same steps, torch under the lock's constraints too
    pip = dry_run("--os", "windows", "--gpu", "NVIDIA GeForce RTX 4070, 12282 MiB, 566.36", installer="pip")
    torch_step = next(s for s in pip["steps"] if f"torch=={LOCKED_TORCH}" in s)
    assert torch_step[0].replace("\\", "/").endswith(".venv/Scripts/python.exe") and "-c" in torch_step
    assert torch_step[-2:] == ["--index-url", "https://download.pytorch.org/whl/cu126"] and pip["installer"] == "pip"


def test_dry_run_linux_rtx_5090_driver_575_gets_cuda_12_8():
    got = dry_run("--os", "linux", "--gpu", "NVIDIA GeForce RTX 5090, 32607 MiB, 575.64.03")
    assert (got["torch"]["variant"], got["torch"]["index_url"]) == ("cu128", "https://download.pytorch.org/whl/cu128")
    assert got["start"][0].endswith("/bin/python") and got["start"][1:3] == ["-m", "app"]


def test_dry_run_windows_without_nvidia_gets_pypis_cpu_build():
    got = dry_run("--os", "windows", "--gpu", "none")
    assert got["torch"]["variant"] == "cpu" and got["torch"]["index_url"] is None  # PyPI's Windows torch is CPU-only
    assert got["gpu"] is None
    assert not got["steps"][-1][-1].endswith("]")  # no CUDA extra


def test_dry_run_macos_gets_pypis_build_with_mps():
    got = dry_run("--os", "macos")
    assert (got["torch"]["variant"], got["torch"]["index_url"]) == ("mps", None)
    assert got["machine"] == "arm64"


def test_app_flags_pass_through_and_overrides_are_said():
    got = dry_run("--os", "linux", "--gpu", "none", "--port", "7999", "--no-browser", "--workspace", "/tmp/ws",
                  "--listen", "--torch-variant", "cu128")
    assert got["start"][3:] == ["--port", "7999", "--no-browser", "--workspace", "/tmp/ws", "--listen"]
    assert got["torch"]["variant"] == "cu128" and "--torch-variant" in got["torch"]["reason"]
    mirror = dry_run("--os", "linux", "--gpu", "none", "--torch-index", "https://mirror.example/torch")
    assert mirror["torch"]["index_url"] == "https://mirror.example/torch"
    assert mirror["steps"][-2][-4:] == ["--index-url", "https://mirror.example/torch", "--index-strategy",
                                        "unsafe-best-match"]
    window = dry_run("--os", "windows", "--gpu", "none", "--window")
    assert window["steps"][-1][-1].endswith("[window]") and window["start"][-1] == "--window"


@pytest.mark.parametrize("os_name,gpu,variant,warns", [
    ("linux", None, "cpu", False),
    ("linux", Gpu("nvidia", "NVIDIA H100 80GB HBM3", 81559, "580.95.05"), "cu130", False),
    ("windows", Gpu("nvidia", "NVIDIA GeForce RTX 3060", 12288, "572.16"), "cu128", False),
    ("linux", Gpu("nvidia", "NVIDIA GeForce RTX 2080 Ti", 11264, "535.183.01"), "cu126", True),  # minor-version compat
    ("windows", Gpu("nvidia", "NVIDIA GeForce GTX 1080", 8192, "581.29"), "cu126", False),  # Pascal: not in cu128+
    ("linux", Gpu("nvidia", "Tesla V100-SXM2-32GB", 32768, "580.65.06"), "cu128", False),  # Volta: not in CUDA 13
    ("windows", Gpu("nvidia", "NVIDIA GeForce RTX 5070", 12227, "566.03"), "cu128", True),  # Blackwell: update driver
    ("linux", Gpu("nvidia", "NVIDIA GeForce GTX 970", 4096, "470.256.02"), "cpu", True),  # too old for CUDA 12
    ("linux", Gpu("amd", "AMD GPU (ROCm)"), "rocm7.2", False),
    ("windows", Gpu("amd", "Radeon RX 7900 XTX"), "cpu", True),
])
def test_torch_choice_for_each_kind_of_pc(os_name, gpu, variant, warns):
    got = choose_torch(os_name, "x86_64", gpu, "2.13.0")
    assert got.variant == variant, got.reason
    assert bool(got.warnings) == warns, got.warnings
    if variant.startswith(("cu", "rocm")):
        assert got.index_url == f"https://download.pytorch.org/whl/{variant}"
    if variant == "cpu":
        assert got.index_url == ("https://download.pytorch.org/whl/cpu" if os_name == "linux" else None)


def test_intel_mac_and_bad_gpu_strings_are_one_clear_line():
    with pytest.raises(LaunchError, match="Intel Mac.*What works: an Apple-silicon Mac"):
        choose_torch("macos", "x86_64", None, "2.13.0")
    with pytest.raises(LaunchError, match="NAME, MEMORY MiB, DRIVER"):
        launcher.parse_gpu_arg("an RTX somewhere")
    assert launcher.parse_gpu_arg("rocm:Radeon RX 7900 XTX") == Gpu("amd", "Radeon RX 7900 XTX")


def test_gpu_detection_reads_nvidia_smi_and_picks_the_largest_card():
    class Out:
        returncode, stdout = 0, "NVIDIA GeForce RTX 3060, 12288 MiB, 572.16\nNVIDIA GeForce RTX 4090, 24564 MiB, 572.16\n"

    seen = []
    gpu = launcher.detect_gpu("windows", run=lambda cmd, **kw: seen.append(cmd) or Out(),
                              which=lambda name: "C:/Windows/System32/nvidia-smi.exe", exists=lambda p: False)
    assert gpu == Gpu("nvidia", "NVIDIA GeForce RTX 4090", 24564, "572.16")
    assert seen[0][1:] == ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    assert launcher.detect_gpu("linux", which=lambda n: None, exists=lambda p: False) is None
    rocm = launcher.detect_gpu("linux", which=lambda n: "/opt/rocm/bin/rocminfo" if n == "rocminfo" else None,
                               exists=lambda p: p == "/dev/kfd")
    assert rocm.vendor == "amd"


def test_install_runs_again_only_when_the_lock_changes(tmp_path):
    root = tmp_path / "checkout"
    root.mkdir()
    (root / "requirements.lock").write_text("torch==2.13.0\nnumpy==2.4.6\n")
    (root / "pyproject.toml").write_text("[project]\nname='x'\n")
    venv = tmp_path / ".venv"
    choice = choose_torch("linux", "x86_64", None, "2.13.0")
    wanted = launcher.wanted_install(root, choice, [])
    assert "first run" in launcher.install_reason(venv, "linux", {}, wanted, False, False)
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    assert "no record" in launcher.install_reason(venv, "linux", {}, wanted, False, False)
    stamp = {**wanted, "python": "3.11.7"}
    assert launcher.install_reason(venv, "linux", stamp, wanted, False, False) is None  # later runs just start
    (root / "requirements.lock").write_text("torch==2.13.0\nnumpy==2.4.7\n")
    changed = launcher.wanted_install(root, choice, [])
    assert launcher.install_reason(venv, "linux", stamp, changed, False, False) == "requirements.lock changed since " \
                                                                                  "the last install"
    assert "window extra" in launcher.install_reason(venv, "linux", stamp, {**wanted, "extras": ["window"]}, False,
                                                     False)
    assert launcher.install_reason(venv, "linux", stamp, wanted, True, False) == "--reinstall"
    cu = launcher.wanted_install(root, launcher.override(choice, "cu128", None, "linux"), [])
    assert "cu128 asked for" in launcher.install_reason(venv, "linux", {**stamp, "lock": cu["lock"]}, cu, False, True)


@pytest.mark.parametrize("stderr,needle", [
    ("ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device", "disk filled up"),
    ("WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError(... Failed to establish a new "
     "connection: [Errno -3] Temporary failure in name resolution')'\nERROR: Could not find a version that satisfies "
     "the requirement torch==2.13.0 (from versions: none)\nERROR: No matching distribution found for torch==2.13.0",
     "cannot reach the package index"),
    ("ERROR: Could not find a version that satisfies the requirement torch==2.13.0 (from versions: 2.9.0, 2.9.1)\n"
     "ERROR: No matching distribution found for torch==2.13.0", "has no build for Python"),
    ("The virtual environment was not created successfully because ensurepip is not available.", "apt install python"),
    ("ERROR: Could not install packages due to an OSError: [Errno 2] No such file or directory: 'C:\\...'\nHINT: This "
     "error might have occurred since this system does not have Windows Long Path support enabled.", "long file path"),
])
def test_a_failed_install_step_is_one_line_with_the_fix(stderr, needle):
    step = launcher.Step("torch 2.13.0 (cu128)", ["pip"], "https://download.pytorch.org/whl/cu128")
    line = launcher.explain(stderr, step, "windows", "3.11")
    assert needle in line and "\n" not in line


def test_not_enough_disk_is_refused_before_installing(tmp_path):
    class Usage:
        free = 3 * 2**30

    with pytest.raises(LaunchError, match="needs about 14 GB .* 3.0 GB is free.*--venv"):
        launcher.check_space(tmp_path / ".venv", 13.7, disk_usage=lambda p: Usage())


def test_too_old_python_gets_a_line_not_a_syntax_error():
    # The first command's file parses in any Python 3 (no annotations or f-strings before the version check).
    tree = ast.parse((ROOT / "launch.py").read_text(), feature_version=(3, 0))
    assert any(isinstance(n, ast.If) and "version_info" in ast.unparse(n.test) for n in tree.body)
    ast.parse((ROOT / "app" / "launcher.py").read_text(), feature_version=(3, 10))


def test_shortcuts_for_each_desktop(tmp_path):
    command = ["/home/u/lora studio/.venv/bin/python", "/home/u/lora studio/launch.py"]
    linux = desktop.write_shortcut("linux", command, Path("/home/u/lora studio"), home=tmp_path / "l")
    entry = linux[0].read_text()
    assert linux[0] == tmp_path / "l" / ".local" / "share" / "applications" / "lora-studio.desktop"
    assert 'Exec="/home/u/lora studio/.venv/bin/python" "/home/u/lora studio/launch.py"' in entry
    assert "Terminal=true" in entry and os.access(linux[0], os.X_OK)

    mac = desktop.write_shortcut("macos", command, Path("/Users/u/lora studio"), home=tmp_path / "m")
    script = mac[0].read_text()
    assert mac[0].name == "LoRA Studio.command" and os.access(mac[0], os.X_OK)
    assert "exec '/home/u/lora studio/.venv/bin/python' '/home/u/lora studio/launch.py'" in script

    win_cmd = [r"C:\Users\u\lora-studio\.venv\Scripts\python.exe", r"C:\Users\u\lora-studio\launch.py"]
    calls = []

    class Done:
        returncode, stdout = 0, "C:\\Users\\u\\Desktop\\LoRA Studio.lnk\nC:\\Users\\u\\AppData\\...\\LoRA Studio.lnk\n"

    made = desktop.write_shortcut("windows", win_cmd, Path(r"C:\Users\u\lora-studio"), home=tmp_path / "w",
                                  run=lambda cmd, **kw: calls.append((cmd, kw["env"])) or Done())
    cmd, env = calls[0]
    assert cmd[0] == "powershell" and "CreateShortcut" in cmd[-1] and "shell" not in cmd
    assert env["LS_TARGET"] == win_cmd[0] and env["LS_ARGS"] == win_cmd[1]
    assert [PureWindowsPath(str(p)).name for p in made] == ["LoRA Studio.lnk", "LoRA Studio.lnk"]
    # No PowerShell: a .cmd on the desktop instead.
    fallback = desktop.write_shortcut("windows", win_cmd, Path(r"C:\Users\u\lora-studio"), home=tmp_path / "w",
                                      run=lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("powershell")))
    assert fallback[0].name == "LoRA Studio.cmd" and win_cmd[0] in fallback[0].read_text()


def test_closing_the_app_says_the_run_keeps_going(tmp_path):
    assert desktop.closing_note([], tmp_path) is None
    note = desktop.closing_note(["run-3"], tmp_path)
    assert "run-3 keeps training" in note and "STOP" in note


FAKE_QT_ABORT = """import os, sys
def create_window(*a, **k):
    sys.stderr.write('qt.qpa.plugin: From 6.5.0, xcb-cursor0 or libxcb-cursor0 is needed to load the Qt xcb platform '
                     'plugin.\\nqt.qpa.plugin: Could not load the Qt platform plugin "xcb" in "" even though it was '
                     'found.\\nThis application failed to start because no Qt platform plugin could be initialized.\\n')
    sys.stderr.flush()
    os.abort()
"""
FAKE_WINDOW = """import json, os
class _Event:
    def __init__(self): self.handlers = []
    def __iadd__(self, f): self.handlers.append(f); return self
class _Window:
    def __init__(self):
        self.events = type("Events", (), {})(); self.events.closing = _Event(); self.asked = []
    def create_confirmation_dialog(self, title, message): self.asked.append(message); return False
_window = None
def create_window(title, url, **kwargs):
    global _window
    _window = _Window(); return _window
def start(gui=None):  # the user closes the window at once
    results = [h() for h in _window.events.closing.handlers]
    open(os.environ["FAKE_WEBVIEW_OUT"], "w").write(json.dumps({"results": results, "asked": _window.asked, "gui": gui}))
"""


def _with_fake_webview(tmp_path, source, **env):
    fake = tmp_path / "fake-webview"
    fake.mkdir(exist_ok=True)
    (fake / "webview.py").write_text(source)
    (fake / "PyQt6").mkdir(exist_ok=True)  # a Qt without its X11 plugin: the system-library check has nothing to read
    (fake / "PyQt6" / "__init__.py").write_text("")
    return lambda cmd, **kw: subprocess.run(cmd, env={**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}", **env},
                                            **kw)


def test_a_window_whose_toolkit_aborts_leaves_the_server_up_and_opens_the_browser(tmp_path, monkeypatch, capsys):
    """Qt without libxcb-cursor0 aborts its process: it was the app's own process, server included. Now the window
    is a process of its own; its cause is one line, and the browser opens."""
    from app import cli

    opened, blocked = [], []
    monkeypatch.setattr("webbrowser.open", opened.append)
    demo = type("Demo", (), {"block_thread": lambda self: blocked.append(True)})()
    why = cli.show_window(demo, "http://127.0.0.1:7860/", tmp_path / "runs", run=_with_fake_webview(tmp_path,
                                                                                                 FAKE_QT_ABORT))
    said = capsys.readouterr().out.strip().splitlines()
    assert "libxcb-cursor0" in why and opened == ["http://127.0.0.1:7860/"] and blocked == [True]
    assert len(said) == 1 and "Traceback" not in said[0] and "sudo apt install libxcb-cursor0" in said[0]


def test_a_qt_missing_system_libraries_names_them_all_with_their_packages(tmp_path, monkeypatch):
    """Qt's own line always blames xcb-cursor, whichever library is missing (on a Debian with libxcb-cursor0 it was
    libxcb-icccm4 and libxcb-keysyms1): the window process asks the loader for every missing one before Qt starts."""
    from app import window

    plugin = tmp_path / "libqxcb.so"
    plugin.write_bytes(b"\x7fELF")
    ldd = tmp_path / "ldd"
    ldd.write_text("#!/bin/sh\necho '\tlibxcb-icccm.so.4 => not found'\necho '\tlibc.so.6 => /lib/libc.so.6 (0x1)'\n"
                   "echo '\tlibxcb-keysyms.so.1 => not found'\necho '\tlibxkbcommon-x11.so.0 => not found'\n")
    ldd.chmod(0o755)
    missing = window.missing_libraries(plugin, ldd=str(ldd))
    assert missing == ["libxcb-icccm.so.4", "libxcb-keysyms.so.1", "libxkbcommon-x11.so.0"]
    assert window.missing_libraries(None, ldd=str(ldd)) == []
    monkeypatch.setattr(window, "qt_xcb_plugin", lambda: plugin)
    monkeypatch.setattr(window, "missing_libraries", lambda binary: missing)
    monkeypatch.setattr(window.sys, "platform", "linux")
    assert window.main(["http://127.0.0.1:1/", "--runs", str(tmp_path)]) == 3  # before webview is imported
    line = window.failure("qt.qpa.plugin: ...xcb-cursor0...\nmissing system libraries: " + " ".join(missing), 3)
    assert line == ("Qt needs the system libraries libxcb-icccm.so.4, libxcb-keysyms.so.1, libxkbcommon-x11.so.0 "
                    "(Debian/Ubuntu: sudo apt install libxcb-icccm4 libxcb-keysyms1 libxkbcommon-x11-0)")
    assert "QTWEBENGINE_DISABLE_SANDBOX=1" in window.failure("ERROR:zygote_host_impl_linux.cc(101)] Running as root "
                                                             "without --no-sandbox is not supported.", 1)


def test_closing_the_window_asks_only_while_a_run_trains(tmp_path):
    from app import cli

    runs, out = tmp_path / "runs", tmp_path / "closing.json"
    (runs / "r1").mkdir(parents=True)
    demo = type("Demo", (), {"block_thread": lambda self: None})()
    run = _with_fake_webview(tmp_path, FAKE_WINDOW, FAKE_WEBVIEW_OUT=str(out))
    assert cli.show_window(demo, "http://127.0.0.1:7860/", runs, run=run) is None  # opened, and closed by the user
    got = json.loads(out.read_text())
    assert got["results"] == [True] and got["asked"] == []  # nothing training: it closes without a question
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(runs / "r1")])
    try:
        (runs / "r1" / "job.json").write_text(json.dumps({"state": "running", "pid": trainer.pid}))
        cli.show_window(demo, "http://127.0.0.1:7860/", runs, run=run)
        got = json.loads(out.read_text())
        assert got["results"] == [False] and "Run r1 keeps training in the background" in got["asked"][0]
        assert got["gui"] == ("qt" if sys.platform.startswith("linux") else None)
    finally:
        trainer.kill()


# ---- no unguarded POSIX-only call -----------------------------------------------------------------------------
POSIX_ONLY_ATTRS = {("os", n) for n in ("killpg", "setsid", "getpgid", "setpgid", "getpgrp", "fork", "forkpty",
                                         "getuid", "geteuid", "getgid", "setuid", "setpriority", "getpriority",
                                         "mkfifo", "getloadavg", "sched_getaffinity", "sched_setaffinity", "chown",
                                         "kill", "wait4", "nice")} | \
                   {("signal", n) for n in ("SIGSTOP", "SIGCONT", "SIGKILL", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGQUIT",
                                            "SIGALRM", "SIGCHLD", "SIGTSTP", "alarm", "pause", "setitimer")}
POSIX_ONLY_MODULES = {"fcntl", "termios", "pwd", "grp", "resource", "pty", "tty", "posix"}
POSIX_ONLY_KEYWORDS = {"start_new_session", "preexec_fn", "pass_fds", "process_group"}
GUARD_WORDS = ("os.name", "sys.platform", "platform.system", "WINDOWS", "POSIX", "hasattr(os", "windows", "os_name")


def posix_only_calls(source: str, filename: str = "<src>") -> list[str]:
    """Each use of a POSIX-only call, module, keyword or /proc path not under an `if` on the platform (or
    hasattr) or a try that catches AttributeError/ImportError."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def guarded(node) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.If, ast.IfExp, ast.While)) and any(w in ast.unparse(node.test) for w in GUARD_WORDS):
                return True
            if isinstance(node, ast.Try):
                caught = " ".join(ast.unparse(h.type) for h in node.handlers if h.type is not None)
                if any(e in caught for e in ("AttributeError", "ImportError", "ModuleNotFoundError")):
                    return True
        return False

    found = []
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                (node.value.id, node.attr) in POSIX_ONLY_ATTRS:
            what = f"{node.value.id}.{node.attr}"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            bad = [n for n in names if n.split(".")[0] in POSIX_ONLY_MODULES]
            what = f"import {bad[0]}" if bad else None
        elif isinstance(node, ast.keyword) and node.arg in POSIX_ONLY_KEYWORDS:
            what = f"{node.arg}="
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(("/proc/", "/dev/")):
            what = f"path {node.value!r}"
        if what and not guarded(node):
            found.append(f"{filename}:{node.lineno}: {what}")
    return found


def test_the_posix_only_check_catches_what_it_claims():
    assert posix_only_calls("import os, signal\nos.killpg(1, signal.SIGSTOP)\n") == ["<src>:2: os.killpg",
                                                                                    "<src>:2: signal.SIGSTOP"]
    assert posix_only_calls("import fcntl\n") == ["<src>:1: import fcntl"]
    assert posix_only_calls("subprocess.Popen(['x'], start_new_session=True)\nopen(f'/proc/{p}/stat')\n")
    assert posix_only_calls("import os\nif os.name == 'posix':\n    os.killpg(1, 9)\n") == []
    assert posix_only_calls("try:\n    import fcntl\nexcept ImportError:\n    fcntl = None\n") == []


def test_no_posix_only_call_is_left_unguarded():
    files = [ROOT / "launch.py", *sorted((ROOT / "app").rglob("*.py")), *sorted((ROOT / "trainer").rglob("*.py"))]
    found = [hit for f in files for hit in posix_only_calls(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert found == [], "POSIX-only calls without a platform guard:\n" + "\n".join(found)


# ---- Windows' VRAM spill --------------------------------------------------------------------------------------
def test_spill_watch_sees_memory_past_the_card_and_a_step_time_jump():
    from trainer.memory.spill import SpillWatch

    held = iter([10.5, 11.0, 11.2, 12.4])
    mem = SpillWatch("NVIDIA GeForce RTX 4070", 12.0, windows=True, held_gb=lambda: next(held))
    assert [mem.observe(1.0) for _ in range(3)] == [None, None, None]
    message, gb = mem.observe(1.0)
    assert gb == 12.4 and "VRAM spill: the run holds 12.4 GB on the 12.0 GB NVIDIA GeForce RTX 4070" in message
    assert "Sysmem Fallback" in message and mem.observe(1.0) is None  # once

    slow = SpillWatch("NVIDIA GeForce RTX 3060", 12.0, windows=True, held_gb=lambda: 11.8)
    times = [9.0, 1.1, 1.0, 1.2, 1.0, 1.1, 1.1, 70.0, 74.0, 80.0]  # warm-up, steady, then 70x
    seen = [slow.observe(t) for t in times]
    assert seen[:-2] == [None] * 8 and seen[-1] is None and "steps went from 1.10 s to 70.00 s (64x)" in seen[-2][0]
    steady = SpillWatch("NVIDIA GeForce RTX 3060", 12.0, windows=True, held_gb=lambda: 8.0)
    assert all(steady.observe(t) is None for t in [9.0, 1.0, 1.3, 0.9, 1.1, 1.0, 1.6, 1.8, 1.5, 2.0])  # noise


def test_a_spilling_run_warns_in_its_events_and_the_train_tab(tmp_path, monkeypatch):
    """A real run on the embedded model whose memory readings say it outgrew a 12 GB card."""
    from app import jobs
    from tests.conftest import make_dataset, tiny_config
    from trainer.training import loop
    from trainer.memory.spill import SpillWatch

    readings = iter([9.0, 9.1, 12.6] + [12.6] * 20)
    monkeypatch.setattr(loop, "_spill_watch", lambda device: SpillWatch(
        "NVIDIA GeForce RTX 4070", 12.0, windows=True, held_gb=lambda: next(readings)))
    cfg = tiny_config("tiny", make_dataset(tmp_path / "data"), tmp_path / "run", **{"train.max_steps": 5,
                                                                                     "sample.at_end": False})
    loop.train(cfg)
    warnings = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()
                if '"vram_spill"' in line]
    assert len(warnings) == 1
    message = warnings[0]["message"]
    assert "12.6 GB on the 12.0 GB NVIDIA GeForce RTX 4070" in message and "Control Panel" in message
    assert "plan" in message.lower()
    jobs.write_job(tmp_path / "run", {"state": "running", "pid": os.getpid()})
    view = jobs.view(tmp_path / "run", alive=lambda pid, d: True)
    assert view.alert == message


# ---- the first command, for real -------------------------------------------------------------------------------
def copy_checkout(dest: Path) -> Path:
    skip = {".venv", ".git", "build", "test-artifacts", "__pycache__", ".pytest_cache", ".venv-latest", ".venv-lock",
            ".uv"}
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [n for n in names if n in skip or n.endswith(".egg-info")])
    return dest


@pytest.mark.skipif(os.name != "posix", reason="the test environment lends its packages through a POSIX venv")
def test_launcher_installs_into_a_fresh_copy_and_a_run_finishes_from_the_train_tab(tmp_path):
    from tests.test_ui_e2e import CHROMIUM, FLAGS, _need_browser, field, free_port, pick, shot, wait_text, wait_until

    _need_browser()
    from playwright.sync_api import sync_playwright

    checkout = copy_checkout(tmp_path / "lora-studio")
    # The environment the launcher fills: made here without pip, with this test run's packages on its path, so the
    # launcher's pip steps run for real (and find torch and the rest installed) instead of downloading gigabytes.
    venv = checkout / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    elsewhere, ws, port = tmp_path / "elsewhere", tmp_path / "workspace", free_port()
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # pip's steps (uv's, for real, are tests/test_install.py's): uv installs by reading the environment's own
    # site-packages, not the test run's lent through a .pth, and would download everything again
    env.update(LORA_STUDIO_HOME=str(tmp_path / "home"), LORA_STUDIO_INSTALLER="pip")
    log = open(tmp_path / "launch.log", "w")
    proc = subprocess.Popen([sys.executable, str(checkout / "launch.py"), "--no-browser", "--port", str(port),
                             "--workspace", str(ws)], cwd=elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        def up():
            import urllib.request
            assert proc.poll() is None, (tmp_path / "launch.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=2)
                return True
            except OSError:
                return False

        wait_until(up, "the launcher to install and start the app", timeout_s=420)
        said = (tmp_path / "launch.log").read_text()
        assert "LoRA Studio setup: [1/3] updating pip" in said and "[3/3] LoRA Studio and its packages" in said
        stamp = json.loads((venv / launcher.STAMP).read_text())
        assert stamp["lock"] == launcher.sha256(checkout / "requirements.lock") and stamp["torch"]["variant"] == "cpu"
        where = subprocess.run([str(venv / "bin" / "python"), "-c", "import app; print(app.__file__)"], cwd=elsewhere,
                               env=env, capture_output=True, text=True, check=True).stdout.strip()
        assert Path(where).is_relative_to(checkout)  # the fresh copy's code, installed into its own environment
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_role("tab", name="Train").click()
            pick(page, "train-dataset", "character")
            field(page, "steps").fill("6")
            field(page, "steps").press("Tab")
            wait_until(lambda: " 6" in page.locator("#summary").first.inner_text(), "6 steps in the summary")
            page.locator("#start").click()
            wait_text(page, "#run-state", "finished", timeout_s=420)
            shot(page, "launcher-run-finished")
            browser.close()
        run = next((ws / "runs").iterdir())
        assert list(run.glob("*.safetensors"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    # A second start installs nothing: the environment is as the lock says.
    again = subprocess.run([sys.executable, str(checkout / "launch.py"), "--dry-run"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=60)
    assert json.loads(again.stdout.strip().splitlines()[-1])["install"] is None
    time.sleep(0.1)


# ---- Windows paths, files held open, pausing through psutil ---------------------------------------------------------
def test_windows_paths_in_settings_keep_their_backslashes(tmp_path):
    from app.train_form import parse_edited
    from trainer.config import ConfigError, RunConfig

    quoted = RunConfig.load(overrides=['data.dataset="D:\\new folder\\pics"', "data.reg_dataset=C:\\Users\\me\\reg"])
    assert quoted.data.dataset == "D:\\new folder\\pics"  # not D:<newline>ew folder
    assert quoted.data.reg_dataset == "C:\\Users\\me\\reg"
    again = RunConfig.load(parse_edited(quoted.to_toml()).to_dict())  # config.toml round trip
    assert again.data.dataset == "D:\\new folder\\pics"
    assert parse_edited("[data]\ndataset = 'C:\\Users\\me\\pics'\n").data.dataset == "C:\\Users\\me\\pics"
    with pytest.raises(ConfigError, match="single quotes"):
        parse_edited('[data]\ndataset = "C:\\Users\\me\\pics"\n')


def test_a_replace_onto_a_file_held_open_is_retried_on_windows(tmp_path, monkeypatch):
    from trainer import atomic

    src, dst = tmp_path / "new.txt", tmp_path / "caption.txt"
    src.write_text("new")
    dst.write_text("old")
    real, calls, naps = os.replace, [], []

    def held_twice(a, b):
        calls.append(b)
        if len(calls) <= 2:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        real(a, b)

    monkeypatch.setattr(atomic.os, "replace", held_twice)
    atomic.replace(src, dst, windows=True, sleep=naps.append)
    assert dst.read_text() == "new" and len(calls) == 3 and naps == [0.05, 0.05]
    src.write_text("newer")
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (_ for _ in ()).throw(PermissionError(13, "in use")))
    with pytest.raises(PermissionError, match="held open by another program"):
        atomic.replace(src, dst, windows=True, sleep=lambda s: None)
    with pytest.raises(PermissionError):  # elsewhere a PermissionError is a real one: no retry
        atomic.replace(src, dst, windows=False, sleep=lambda s: pytest.fail("retried"))


def test_preview_pause_suspends_the_trainer_and_its_children_through_psutil(tmp_path):
    import psutil

    from app import jobs, portable
    from tests.test_ui_e2e import wait_until

    child = tmp_path / "child.py"
    child.write_text("import subprocess, sys, time\n"
                     "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                     "print(p.pid, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(child)], stdout=subprocess.PIPE, text=True, **portable.detached())
    grandchild = int(proc.stdout.readline())
    runner = jobs.JobRunner(tmp_path / "runs")
    runner.procs["r"] = proc
    statuses = lambda: {psutil.Process(p).status() for p in (proc.pid, grandchild)}  # noqa: E731
    try:
        with runner.paused():
            wait_until(lambda: statuses() == {psutil.STATUS_STOPPED}, "both processes stopped", timeout_s=10)
        wait_until(lambda: psutil.STATUS_STOPPED not in statuses(), "both processes running again", timeout_s=10)
        assert portable.running_with(proc.pid, str(child)) and not portable.running_with(proc.pid, "another-run")
    finally:
        for p in (grandchild, proc.pid):
            psutil.Process(p).kill()
        proc.wait(timeout=10)
    assert not portable.running_with(proc.pid, str(child))
    assert portable.detached(windows=True) == {"creationflags": 0x200 | 0x8000000}

"""Install everywhere (issue 38): one lock every supported target resolves, whatever Python starts the launcher, uv
for the installs (pip where uv cannot be had), the torch index asked before anything installs, machines without a
build told what would work, and every odd dry-run input one line."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app import install_tools, interpreters, launcher, torch_index
from app.torch_choice import CUDA_BUILDS, Gpu, LaunchError, TorchChoice, choose_torch, fallbacks, override

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
LOCKED_TORCH = launcher.locked_version(LOCK)
# uv's names for the targets LoRA Studio supports; macOS at 14, torch 2.13's own floor (MACOSX_DEPLOYMENT_TARGET)
TARGETS = {"windows x86-64": "x86_64-pc-windows-msvc", "linux x86-64": "x86_64-unknown-linux-gnu",
           "linux aarch64": "aarch64-unknown-linux-gnu", "macos 14 arm64": "aarch64-apple-darwin"}
PYTHONS = interpreters.preferred(ROOT)


def uv() -> list[str]:
    return [sys.executable, "-m", "uv"]


def test_requires_python_is_the_one_source_of_the_supported_range():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^requires-python = ">=3\.11,<3\.14"$', text, re.M)
    assert interpreters.supported(ROOT) == ((3, 11), (3, 14)) and PYTHONS == ["3.11", "3.12", "3.13"]
    assert interpreters.range_text(ROOT) == "3.11 to 3.13"
    assert "Python 3.11 to what pyproject.toml" in LOCK.read_text().splitlines()[0]  # the lock covers that range
    step = launcher.Step("torch", ["pip"])
    line = launcher.explain("ERROR: No matching distribution found for numpy==9", step, "linux", "3.12",
                            interpreters.range_text(ROOT))
    assert "use Python 3.11 to 3.13" in line


@pytest.fixture(scope="module")
def metadata_cached(tmp_path_factory):
    """One universal resolution online fills uv's cache with every package's metadata (about 10 s); each target is
    then resolved from it offline (half a second each, not ten)."""
    out = subprocess.run([*uv(), "pip", "compile", str(ROOT / "pyproject.toml"), "--all-extras", "--universal",
                          "-c", str(LOCK), "--python-version", PYTHONS[0], "--no-header", "--quiet", "-o",
                          str(tmp_path_factory.mktemp("universal") / "lock.txt")], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-1500:]


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("target", TARGETS)
def test_the_lock_resolves_for_every_supported_target(metadata_cached, target, python, tmp_path):
    """uv's resolver, per platform and Python: every locked pin (the extras' too) has a build there. Python 3.10 got
    ResolutionImpossible after 1 min 41 s of installing; PyQt6 6.11 had no manylinux_2_28 wheel; nothing like it is
    left."""
    env = {**os.environ, "MACOSX_DEPLOYMENT_TARGET": "14.0"}
    cmd = [*uv(), "pip", "compile", str(ROOT / "pyproject.toml"), "--all-extras", "-c", str(LOCK), "--python-platform",
           TARGETS[target], "--python-version", python, "--no-header", "--quiet", "-o", str(tmp_path / "resolved.txt")]
    out = subprocess.run([*cmd, "--offline"], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0 and "offline" in out.stderr.lower():  # a wheel's tags not cached yet: ask the index
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, f"{target}, Python {python}: {out.stderr.strip()[-1500:]}"
    resolved = (tmp_path / "resolved.txt").read_text()
    assert f"\ntorch=={LOCKED_TORCH}\n" in f"\n{resolved}"


def test_our_torch_builds_are_on_uvs_own_list_for_each_driver():
    """uv's --torch-backend=auto (a maintained detector) lists the PyTorch indexes it would try for a driver, in
    order; the launcher's choice must be among them, and of the CUDA major of the newest one torch 2.13 is published
    for. uv starts at the newest CUDA 12 build for any driver that runs CUDA 12 (minor-version compatibility); the
    launcher takes the newest whose own minimum driver is met (cu126 for 560-569), also on uv's list."""
    published = {b[0] for b in CUDA_BUILDS}
    for os_name, platform_name, driver in (("linux", "x86_64-unknown-linux-gnu", "580.95.05"),
                                           ("linux", "x86_64-unknown-linux-gnu", "570.26"),
                                           ("linux", "x86_64-unknown-linux-gnu", "560.28.03"),
                                           ("linux", "x86_64-unknown-linux-gnu", "535.183.01"),
                                           ("linux", "x86_64-unknown-linux-gnu", "520.61.05"),
                                           ("windows", "x86_64-pc-windows-msvc", "581.29"),
                                           ("windows", "x86_64-pc-windows-msvc", "566.36")):
        env = {**os.environ, "UV_CUDA_DRIVER_VERSION": driver, "UV_HTTP_TIMEOUT": "3", "UV_HTTP_RETRIES": "0",
               "UV_CACHE_DIR": str(Path(os.environ.get("TMPDIR", "/tmp")) / f"uv-probe-{os.getpid()}-{driver}")}
        try:
            out = subprocess.run([*uv(), "pip", "compile", "-", "--torch-backend", "auto", "--python-version", "3.12",
                                  "--python-platform", platform_name, "-v"], input=f"torch=={LOCKED_TORCH}\n",
                                 capture_output=True, text=True, env=env, timeout=30)
            log = out.stderr
        except subprocess.TimeoutExpired as e:  # no network: the list is logged before the first request fails
            log = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        listed = list(dict.fromkeys(re.findall(r"download\.pytorch\.org/whl/([a-z0-9.]+)/torch/", log)))
        assert listed, log[-1500:]
        ours = choose_torch(os_name, "x86_64", Gpu("nvidia", "NVIDIA GeForce RTX 4090", 24564, driver),
                            LOCKED_TORCH).variant
        offered = sorted(set(listed) & published)  # uv asks its indexes at once: their order in the log is not its own
        if not offered:
            assert ours == "cpu", (driver, listed)  # uv offers only builds torch 2.13 does not publish
        else:
            assert ours in listed and ours[2:4] == offered[-1][2:4], (driver, ours, listed)


# ---- whatever Python starts it --------------------------------------------------------------------------------
def info(version, bits=64, machine="x86_64", translated=False):
    return {"version": list(version), "bits": bits, "machine": machine, "translated": translated,
            "executable": "/usr/bin/python"}


@pytest.mark.parametrize("version,bits,translated,why", [
    ((3, 8, 18), 64, False, "Python 3.8 is outside the 3.11 to 3.13"),
    ((3, 9, 18), 64, False, "Python 3.9 is outside"),
    ((3, 10, 6), 64, False, "Python 3.10 is outside"),
    ((3, 14, 0), 64, False, "Python 3.14 is outside"),
    ((3, 12, 1), 32, False, "32-bit build"),
    ((3, 12, 1), 64, True, "Intel (x86-64) build running under Rosetta"),
])
def test_an_unsupported_python_is_replaced_by_a_supported_one_said_in_one_line(version, bits, translated, why,
                                                                                monkeypatch, capsys):
    assert why in interpreters.why_not(info(version, bits, translated=translated), ROOT)
    monkeypatch.setattr(interpreters, "find", lambda root, os_name: ("/opt/py312/bin/python3.12",
                                                                      info((3, 12, 7), machine="arm64")))
    called = {}
    monkeypatch.setattr(launcher.subprocess, "call", lambda cmd, env: called.update(cmd=cmd, env=env) or 0)

    def execve(path, cmd, env):  # POSIX: the supported Python replaces this process (no orphaned app on a signal)
        called.update(cmd=cmd, env=env, path=path)
        raise SystemExit(0)

    monkeypatch.setattr(launcher.os, "execve", execve)
    with pytest.raises(SystemExit) as done:
        launcher.supported_python(ROOT, "linux", info(version, bits, translated=translated), ["--port", "9"], False)
    assert done.value.code == 0
    assert called["cmd"] == ["/opt/py312/bin/python3.12", str(ROOT / "launch.py"), "--port", "9"]
    assert called["env"][launcher.RELAUNCHED] == "1"
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and why in said[0] and "using Python 3.12.7 at /opt/py312/bin/python3.12" in said[0]
    assert launcher.supported_python(ROOT, "linux", info((3, 11, 7)), [], False) == sys.executable


def test_with_no_python_to_be_found_or_fetched_it_says_what_to_install(monkeypatch):
    monkeypatch.setattr(interpreters, "find", lambda root, os_name: None)
    monkeypatch.setattr(launcher, "get_uv", lambda *a, **k: None)
    monkeypatch.setattr(install_tools, "find_uv", lambda *a: None)
    with pytest.raises(LaunchError, match="Python 3.9 is outside .* install Python 3.12 from python.org"):
        launcher.supported_python(ROOT, "linux", info((3, 9, 1)), [], False)
    monkeypatch.setenv(launcher.RELAUNCHED, "1")  # never a loop of launchers
    with pytest.raises(LaunchError, match="started with again"):
        launcher.supported_python(ROOT, "linux", info((3, 9, 1)), [], False)


def test_rosetta_is_read_from_sysctl_and_a_candidate_python_is_probed(monkeypatch):
    class Out:
        returncode, stdout = 0, "1\n"

    real = interpreters.probe(sys.executable)
    assert real["version"][:2] == list(sys.version_info[:2]) and real["bits"] == 64
    monkeypatch.setattr(interpreters.sys, "platform", "darwin")
    monkeypatch.setattr(interpreters.subprocess, "run", lambda cmd, **k: Out() if cmd[0] == "sysctl" else None)
    assert interpreters.translated()
    monkeypatch.setattr(interpreters.sys, "platform", "linux")
    assert not interpreters.translated()


def test_the_launcher_runs_on_old_pythons_to_rescue_them():
    """launch.py and the modules it imports parse and import on Python 3.8 (a 3.8 found here runs a dry run)."""
    for name in ("launch.py", "app/launcher.py", "app/environment.py", "app/interpreters.py", "app/torch_choice.py",
                 "app/torch_index.py", "app/install_tools.py"):
        ast.parse((ROOT / name).read_text(), feature_version=(3, 8))
    old = next((p for p in (Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions").glob("3.8.*/bin/python3.8")),
               None) if (Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions").is_dir() else None
    if old is None:
        return  # no Python 3.8 on this machine: the syntax check above stands
    out = subprocess.run([str(old), str(ROOT / "launch.py"), "--dry-run"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, "LORA_STUDIO_INSTALLER": "pip"})
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:]
    assert "Python 3.8 is outside the 3.11 to 3.13 LoRA Studio runs on: using Python 3.1" in out.stdout, out.stdout
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert re.search(r"python3?\.?1[123]", got["python"]) and got["torch"]["version"] == LOCKED_TORCH


# ---- uv, pip, and the user's own index --------------------------------------------------------------------------
def test_uv_is_fetched_with_pip_and_pip_installs_when_it_cannot_be(tmp_path, monkeypatch, capsys):
    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution found for uv==0.13.10"

    seen = []
    got, why = install_tools.fetch_uv(sys.executable, tmp_path / ".uv", "0.13.10", "linux",
                                      run=lambda cmd, **k: seen.append(cmd) or Failed())
    assert got is None and "No matching distribution" in why
    assert seen[0][1:5] == ["-m", "pip", "install", "--disable-pip-version-check"] and "uv==0.13.10" in seen[0]
    monkeypatch.setattr(install_tools, "fetch_uv", lambda *a: (None, "no network"))
    assert launcher.get_uv(sys.executable, ROOT, "linux") is None
    assert "installing with pip instead" in capsys.readouterr().out
    monkeypatch.setenv("LORA_STUDIO_INSTALLER", "pip")
    assert install_tools.find_uv(tmp_path, "linux") is None  # asked for pip: pip it is


def test_the_users_pip_configuration_is_handed_to_uv(tmp_path, monkeypatch):
    """uv reads no pip.conf: a mirror or a folder of wheels the user's pip knows must still serve (this machine's
    torch comes from a local wheel folder)."""
    class Listed:
        stdout = ("global.index-url='https://mirror.example/simple'\n:env:.find-links='/opt/wheels'\n"
                  f"global.extra-index-url='https://extra.example/simple file://{tmp_path}'\n")

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    settings = install_tools.pip_settings(sys.executable, run=lambda *a, **k: Listed())
    assert settings["index-url"] == ["https://mirror.example/simple"]
    args = install_tools.uv_index_args(settings)
    assert args[:2] == ["--default-index", "https://mirror.example/simple"]
    assert ["--index", "https://extra.example/simple"] == args[2:4] and f"file://{tmp_path}" in args
    assert ["--find-links", str(wheels)] == args[args.index(str(wheels)) - 1:args.index(str(wheels)) + 1]
    assert args[-2:] == ["--index-strategy", "unsafe-best-match"]
    assert "/opt/wheels" not in args or Path("/opt/wheels").is_dir()  # a folder that is not there is left out


# ---- the torch index, asked first ---------------------------------------------------------------------------------
def page(*wheels):
    return "<html><body>" + "".join(f'<a href="/whl/{w}#sha256=0">{w}</a><br/>' for w in wheels) + "</body></html>"


def test_the_index_is_asked_and_a_missing_build_falls_back_to_the_next_the_driver_runs(monkeypatch, capsys):
    served = {"cu130": page("torch-2.13.0+cu130-cp311-cp311-manylinux_2_28_x86_64.whl"),
              "cu128": page("torch-2.13.0+cu128-cp312-cp312-manylinux_2_28_x86_64.whl",
                            "torch-2.13.0+cu128-cp312-cp312-win_amd64.whl")}

    real = torch_index.check

    def check(index, version, variant, py, os_name, machine, fetch=None):
        return real(index, version, variant, py, os_name, machine,
                    fetch=lambda url: served.get(index.rstrip("/").rsplit("/", 1)[-1], page()))

    monkeypatch.setattr(torch_index, "check", check)
    gpu = Gpu("nvidia", "NVIDIA GeForce RTX 4090", 24564, "580.95.05")
    choice = choose_torch("linux", "x86_64", gpu, LOCKED_TORCH)
    assert choice.variant == "cu130" and fallbacks(choice, gpu, "linux") == ["cu128", "cu126", "cpu"]
    got = launcher.served(choice, gpu, "linux", "x86_64", _python("3.12", monkeypatch))
    said = capsys.readouterr().out
    assert got.variant == "cu128" and got.index_url.endswith("/cu128")
    assert "has no torch 2.13.0 for Python 3.12 on linux x86_64: installing the cu128 build instead" in said
    assert fallbacks(choose_torch("linux", "x86_64", Gpu("amd", "AMD GPU"), LOCKED_TORCH), None, "linux") == ["cpu"]
    pascal = Gpu("nvidia", "NVIDIA GeForce GTX 1080", 8192, "581.29")
    assert fallbacks(choose_torch("windows", "x86_64", pascal, LOCKED_TORCH), pascal, "windows") == ["cpu"]
    served.clear()  # no build at all: one line, not a traceback after pip's retries
    with pytest.raises(LaunchError, match="no build of torch 2.13.0 this machine runs is served"):
        launcher.served(choice, gpu, "linux", "x86_64", _python("3.12", monkeypatch))


def _python(version, monkeypatch):
    """A Python the launcher asks its version of: answers `version`."""
    class Out:
        stdout = version + "\n"

    monkeypatch.setattr(launcher.subprocess, "run", lambda *a, **k: Out())
    return "/fake/python"


def test_an_index_that_cannot_be_reached_is_said_once_and_your_index_is_used(monkeypatch, capsys):
    def unreachable(url):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch_index, "_fetch", unreachable)
    choice = choose_torch("linux", "x86_64", None, LOCKED_TORCH)
    got = launcher.served(choice, None, "linux", "x86_64", _python("3.11", monkeypatch))
    said = capsys.readouterr().out.strip().splitlines()
    assert got.index_url is None and len(said) == 1
    assert "https://download.pytorch.org/whl/cpu did not answer within 6 s" in said[0]
    assert "comes from your configured package index instead" in said[0]


def test_wheel_names_are_read_for_this_python_and_platform():
    assert torch_index.wheel_matches("torch-2.13.0+cu128-cp312-cp312-manylinux_2_28_x86_64.whl", "2.13.0", "cu128",
                                     "3.12", "linux", "x86_64")
    assert torch_index.wheel_matches("torch-2.13.0-cp312-cp312-macosx_14_0_arm64.whl", "2.13.0", None, "3.12",
                                     "macos", "arm64")
    assert torch_index.wheel_matches("torch-2.13.0+cu128-cp311-cp311-win_amd64.whl", "2.13.0", "cu128", "3.11",
                                     "windows", "AMD64")
    assert not torch_index.wheel_matches("torch-2.13.0+cu128-cp313-cp313t-manylinux_2_28_x86_64.whl", "2.13.0",
                                         "cu128", "3.13", "linux", "x86_64")  # free-threaded: not ours
    assert not torch_index.wheel_matches("torch-2.13.0+cu128-cp312-cp312-manylinux_2_28_aarch64.whl", "2.13.0",
                                         "cu128", "3.12", "linux", "x86_64")


# ---- machines without a build, and odd dry-run input ----------------------------------------------------------------
def dry(*args, code=0):
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--dry-run", *args], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == code, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    return out, json.loads(out.stdout.strip().splitlines()[-1])


def test_an_intel_mac_and_macos_13_are_told_what_would_work():
    out, got = dry("--os", "macos", "--arch", "x86_64", "--gpu", "none", code=1)
    assert "Intel Mac" in got["refused"] and "What works: an Apple-silicon Mac" in got["refused"]
    assert out.stderr.count("\n") == 1  # one line
    _, old = dry("--os", "macos", "--arch", "arm64", "--macos", "13.6", code=1)
    assert "needs macOS 14 (Sonoma) or newer" in old["refused"] and "this Mac runs macOS 13.6" in old["refused"]
    _, new = dry("--os", "macos", "--arch", "arm64", "--macos", "14.5")
    assert new["torch"]["variant"] == "mps" and new["machine"] == "arm64"


@pytest.mark.parametrize("args,words", [
    (["--torch-variant", "bogus"], "--torch-variant bogus is not a torch build; accepted: cu130, cu128, cu126"),
    (["--os", "macos", "--torch-variant", "cu130"], "has no macOS build"),
    (["--os", "windows", "--torch-variant", "rocm7.2"], "ROCm builds for Linux only"),
    (["--torch-index", "mirror.example/torch"], "is not a URL"),
    (["--gpu", "NVIDIA GeForce RTX 4070, 12282 MiB, abc"], 'driver "abc" is not a driver version like 566.36'),
    (["--gpu", "NVIDIA GeForce RTX 4090, -24564 MiB, 572.16"], 'memory "-24564 MiB" is not a size'),
    (["--arch", "x86_64"], None),  # describes another machine: fine in a dry run
])
def test_bad_dry_run_inputs_are_one_line_saying_what_is_accepted(args, words):
    if words is None:
        dry("--os", "linux", *args)
        return
    out, got = dry(*args, code=1)
    assert words in got["refused"] and out.stderr.strip().count("\n") == 0, out.stderr


def test_zero_mib_is_noted_and_an_amd_card_is_named(tmp_path):
    _, zero = dry("--os", "linux", "--gpu", "NVIDIA GeForce RTX 4070, 0 MiB, 572.16")
    assert any("reports 0 MiB" in w for w in zero["torch"]["warnings"])
    _, amd = dry("--os", "linux", "--gpu", "AMD Radeon RX 7900 XTX")
    assert amd["gpu"]["vendor"] == "amd" and amd["gpu"]["name"] == "AMD Radeon RX 7900 XTX"
    assert amd["torch"]["variant"] == "rocm7.2"


def test_an_environment_holding_another_torch_build_is_installed_again(tmp_path):
    """A dry run on a machine whose .venv holds CPU torch where ROCm is wanted said 'nothing to install'."""
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / "lib" / "python3.12" / "site-packages" / "torch-2.13.0+cpu.dist-info").mkdir(parents=True)
    rocm = choose_torch("linux", "x86_64", Gpu("amd", "AMD GPU"), LOCKED_TORCH)
    wanted = launcher.wanted_install(ROOT, rocm, [])
    stamp = {**launcher.wanted_install(ROOT, choose_torch("linux", "x86_64", None, LOCKED_TORCH), []), "python": "3.12"}
    assert launcher.install_reason(venv, "linux", stamp, wanted, False, False) == \
        "the environment holds torch 2.13.0+cpu (cpu), and this machine wants the rocm7.2 build"
    same = launcher.wanted_install(ROOT, choose_torch("linux", "x86_64", None, LOCKED_TORCH), [])
    assert launcher.install_reason(venv, "linux", stamp, same, False, False) is None


# ---- from a fresh copy, for real ------------------------------------------------------------------------------------
def test_python_3_10_reaches_the_page_through_uv(tmp_path):
    """`python3.10 launch.py` from a fresh copy: another Python found, uv fetched from the package index, the
    environment made and filled by uv (torch from wherever this machine's pip finds it), the app up. It failed after
    1 min 41 s of installing with ResolutionImpossible."""
    import urllib.request

    from tests.test_desktop import copy_checkout
    from tests.test_ui_e2e import free_port, wait_until

    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    old = next(iter(sorted(pyenv.glob("3.10.*/bin/python3.10"))), None) if pyenv.is_dir() else None
    if old is None:
        pytest.skip("no Python 3.10 on this machine")
    checkout = copy_checkout(tmp_path / "lora-studio")
    port, log_path = free_port(), tmp_path / "launch.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "LORA_STUDIO_INSTALLER")}
    # as a new user's shell: the test's own environment (with its uv and Python 3.11) is not on PATH
    here = str(Path(sys.executable).parent)
    env.update(LORA_STUDIO_HOME=str(tmp_path / "home"),
               PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != here))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(old), str(checkout / "launch.py"), "--no-browser", "--port", str(port),
                                 "--workspace", str(tmp_path / "ws")], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            def up():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status == 200
                except OSError:
                    return False

            wait_until(up, "the page, after installing with uv", timeout_s=600)
        finally:
            proc.terminate()  # the launcher became the app (exec): nothing is left behind
            proc.wait(timeout=30)
    with pytest.raises(OSError):  # the app went with it (a relaunch by subprocess left it running, orphaned)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
    said = log_path.read_text()
    assert "Python 3.10 is outside the 3.11 to 3.13 LoRA Studio runs on: using Python 3.1" in said, said[-2000:]
    assert "getting uv" in said and "[1/3] making the environment" in said and "installing with pip instead" not in said
    stamp = json.loads((checkout / ".venv" / launcher.STAMP).read_text())
    assert stamp["python"][:4] in ("3.11", "3.12", "3.13") and stamp["installed_torch"].startswith(LOCKED_TORCH)

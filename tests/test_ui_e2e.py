"""The whole Datasets -> Train flow in real headless Chromium against a real `lora-studio` process:
upload sample images through the page, edit a caption (checked on disk), train on the embedded
model, wait for the finished state and a sample image. Screenshots go to test-artifacts/ui/."""
import contextlib
import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from trainer.models.info import EMBEDDED_DIR
from trainer.resources import SAMPLE_DATASETS

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-artifacts" / "ui"
CHROMIUM = os.environ.get("LORA_STUDIO_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _need_browser():
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append("playwright (pip install playwright)")
    if not Path(CHROMIUM).exists():
        missing.append(f"chromium at {CHROMIUM} (apt-get install -y chromium)")
    if missing:
        if os.environ.get("LORA_STUDIO_REQUIRE_BROWSER"):
            pytest.fail("browser tests need " + " and ".join(missing))
        pytest.skip("browser tests need " + " and ".join(missing))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_app(tmp_path, *args: str):
    """A real `lora-studio` process on a free port over a new workspace; yields (url, workspace)."""
    port, ws = free_port(), tmp_path / "workspace"
    env = {**os.environ, "LORA_STUDIO_HOME": str(tmp_path / "home")}
    log = open(tmp_path / "app.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "app", "--no-browser", "--port", str(port), "--workspace", str(ws),
                             *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError((tmp_path / "app.log").read_text())
                time.sleep(0.5)
        yield url, ws
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        stop_trainers(ws)


def stop_trainers(ws: Path) -> None:
    """Runs outlive the app by design (a UI crash must not end a training); a test's must not outlive it."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(ws) in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                os.kill(int(cmdline.parent.name), 9)
        except (OSError, ValueError):
            pass


@pytest.fixture
def app_server(tmp_path):
    _need_browser()
    with served_app(tmp_path) as served:
        yield served


def shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def text_of(page, selector) -> str:
    return page.locator(selector).first.inner_text()


# What a person sees: innerText keeps text drawn at opacity 0, which is how gradio hides an event's status
# tracker (show_progress="hidden" still writes "queue: 1/1 | 0.1/0.1s" into the DOM, transparent).
_SEEN_TEXT = """el => { const out = []; const walk = n => {
    if (n.nodeType === 3) { out.push(n.textContent); return; }
    if (n.nodeType !== 1) return;
    const s = getComputedStyle(n);
    if (s.display === 'none' || s.visibility === 'hidden' || parseFloat(s.opacity) === 0) return;
    n.childNodes.forEach(walk); };
  walk(el); return out.join(' '); }"""


def seen_text(page, selector) -> str:
    return page.locator(selector).first.evaluate(_SEEN_TEXT)


def drawn_lines(page) -> list[str]:
    """The loss plot's lines that have a colour (vega draws each series as an SVG path; one the chart's colour
    scale does not know gets no stroke and is invisible): their series names."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('#loss-plot .mark-line path'))
        .filter(e => (e.getAttribute('stroke') || 'none') !== 'none' && (e.getAttribute('d') || '').includes('L'))
        .map(e => (e.getAttribute('aria-label') || '').replace(/.*series: /, ''))""")


def wait_text(page, selector, needle, timeout_s=60):
    end = time.time() + timeout_s
    while time.time() < end:
        if needle in text_of(page, selector):
            return
        time.sleep(0.25)
    raise AssertionError(f"{selector} never showed {needle!r}: {text_of(page, selector)[:500]!r}")


def wait_until(predicate, what, timeout_s=60):
    end = time.time() + timeout_s
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def field(page, elem_id):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def pick(page, elem_id, value):
    box = field(page, elem_id)
    box.click()
    box.fill(value)
    page.get_by_role("option", name=value, exact=True).first.click()


TABS = ["Datasets", "Train", "Preview", "Library"]


def visible_tabs(page) -> list[str]:
    return [t.inner_text().strip() for t in page.get_by_role("tab").all() if t.is_visible()]


def switch_every_tab(page):
    """After every switch the bar shows each tab exactly once (it once drew Preview twice and lost Library)."""
    for name in ["Train", "Preview", "Library", "Datasets", "Preview", "Train", "Library", "Datasets"]:
        page.get_by_role("tab", name=name).first.click()
        wait_until(lambda: visible_tabs(page) == TABS, f"the four tabs after switching to {name}: {visible_tabs(page)}",
                   timeout_s=10)


def run_flow(page, url, ws: Path, model: str | None = None, steps: int = 12, network: str | None = None):
    page.goto(url)
    switch_every_tab(page)
    page.get_by_role("tab", name="Datasets").click()
    # A new workspace opens on a sample dataset: its images show without picking it again.
    wait_until(lambda: page.locator("#gallery img").count() >= 10, "the pre-selected sample dataset's images")
    field(page, "new-dataset").fill("mychar")
    page.locator("#create-dataset").click()
    wait_text(page, "#dataset-message", "created dataset")

    images = sorted((SAMPLE_DATASETS / "character").glob("*.png"))[:6]
    page.locator("#upload input[type=file]").set_input_files([str(p) for p in images])
    time.sleep(1.0)
    page.locator("#import").click()
    wait_text(page, "#dataset-message", "imported 6 of 6")
    shot(page, "1-imported")

    page.locator("#gallery img").first.click()
    wait_until(lambda: field(page, "image-name").input_value(), "the clicked image's name")
    name = field(page, "image-name").input_value()
    assert name.endswith(".png")
    field(page, "caption").fill("zorb, a large figure on a blue background")
    page.locator("#save-caption").click()
    wait_text(page, "#caption-message", "saved")
    caption = (ws / "datasets" / "mychar" / name).with_suffix(".txt")
    assert caption.read_text() == "zorb, a large figure on a blue background\n"
    shot(page, "2-caption-saved")

    page.get_by_role("tab", name="Train").click()
    if model:
        field(page, "model").fill(model)  # a custom value: a path typed into the model box
        field(page, "model").press("Enter")
    pick(page, "train-dataset", "mychar")
    if network:
        pick(page, "network", network)
        wait_text(page, "#summary", network.split(" ")[0])
    steps_box = field(page, "steps")
    steps_box.fill(str(steps))
    steps_box.press("Tab")
    wait_text(page, "#summary", "mychar")
    # The summary and the Advanced box (the config Start submits) are updated together.
    wait_until(lambda: re.search(rf"\bsteps\s+{steps}\b", text_of(page, "#summary")), "steps in the summary")
    shot(page, "3-settings")
    page.locator("#start").click()
    wait_text(page, "#start-message", "run", timeout_s=30)
    wait_text(page, "#run-state", "finished", timeout_s=420)
    wait_until(lambda: page.locator("#samples img").count() >= 1, "a sample image")
    # The page was open before the run existed: its loss curve and moving average are still drawn in colour.
    wait_until(lambda: {"loss", "smoothed"} <= set(drawn_lines(page)), "the loss curve drawn", 30)
    assert "lora-studio train --config" in field(page, "cli-command").input_value()
    shot(page, "4-finished")
    runs = list((ws / "runs").iterdir())
    assert len(runs) == 1 and list(runs[0].glob("*.safetensors"))
    return runs[0]


@pytest.mark.skipif(not (EMBEDDED_DIR / "model_index.json").exists(), reason="the embedded model is not built")
def test_import_caption_train_in_the_browser(app_server):
    from playwright.sync_api import sync_playwright

    url, ws = app_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            run_dir = run_flow(page, url, ws)
            losses = [line for line in (run_dir / "events.jsonl").read_text().splitlines() if '"step"' in line]
            assert len(losses) >= 10
        finally:
            browser.close()


def train_sample_lora(kind: str, out: Path, steps: int = 30) -> Path:
    from trainer import presets
    from trainer.config import RunConfig
    from trainer.training.loop import train

    dataset = SAMPLE_DATASETS / kind
    layer = presets.resolve(kind, family="tiny", n_images=len(list(dataset.glob("*.png"))))
    cfg = RunConfig.load(layer, {"data": {"dataset": str(dataset)}, "save": {"output_dir": str(out / kind), "name": kind},
                                 "train": {"max_steps": steps}})
    return train(cfg).lora_path


def set_slider(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


@pytest.mark.skipif(not (EMBEDDED_DIR / "model_index.json").exists(), reason="the embedded model is not built")
def test_preview_mixes_two_loras_in_the_browser(tmp_path_factory):
    _need_browser()
    from playwright.sync_api import sync_playwright

    work = tmp_path_factory.mktemp("preview")
    ws = work / "workspace"
    (ws / "loras").mkdir(parents=True)
    for kind in ("character", "style"):
        src = train_sample_lora(kind, work / "runs")
        (ws / "loras" / src.name).write_bytes(src.read_bytes())
    port = free_port()
    log = open(work / "app.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "app", "--no-browser", "--port", str(port), "--workspace", str(ws)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "LORA_STUDIO_HOME": str(work / "home")})
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until(lambda: _up(url), "the app to serve", timeout_s=90)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            page.get_by_role("tab", name="Library").click()
            wait_text(page, "#library-table", "character")
            wait_text(page, "#library-table", "style")
            shot(page, "5-library")
            page.get_by_role("tab", name="Preview").click()
            pick(page, "slot0-file", "character (library)")
            pick(page, "slot1-file", "style (library)")
            set_slider(page, "slot0-weight", 0.8)
            set_slider(page, "slot1-weight", 0.6)
            field(page, "preview-prompt").fill("zorb, hatched, a large figure on a blue background")
            page.locator("#generate").click()
            wait_until(lambda: '"weight": 0.6' in text_of(page, "#preview-settings"), "the settings used", 180)
            settings = text_of(page, "#preview-settings")
            assert '"weight": 0.8' in settings and "character.safetensors" in settings
            assert page.locator("#preview-image img").count() == 1
            page.locator("#compare").click()
            # The grid fills in cell by cell: base, each LoRA, the mix.
            wait_until(lambda: list((ws / "preview" / "grids").glob("*-4-of-4.png")), "the whole compare grid", 240)
            wait_until(lambda: page.locator("#compare-grid img").count() == 1, "the compare grid on the page")
            time.sleep(1.0)
            shot(page, "6-preview-compare")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def train_another(page, model, name: str, ready) -> None:
    """On the Train tab after a run: another base model typed in, `ready()` (what the form must show first),
    a run name, Start, and that run followed until it finishes."""
    field(page, "model").fill(str(model))
    field(page, "model").press("Enter")
    ready()
    field(page, "run-name").fill(name)
    field(page, "run-name").press("Tab")
    time.sleep(1.5)
    page.locator("#start").click()
    wait_text(page, "#start-message", name, timeout_s=30)
    pick(page, "run-pick", name)
    wait_text(page, "#run-state", "finished", timeout_s=420)


def _up(url) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


def test_a_tiny_flux_and_a_tiny_zimage_train_from_the_train_tab(tmp_path):
    """The Train tab with a model folder typed in: the family is read from it (its T5 shows for Flux), the preset's
    Flux and Z-Image overlays apply, Start trains, samples render, and the LoRA is the family's."""
    from playwright.sync_api import sync_playwright
    from safetensors import safe_open

    from trainer.models import tiny

    _need_browser()
    models = tmp_path / "workspace" / "models"
    folders = {fam: tiny.build_pipeline(fam, models / fam, seed=0) for fam in ("flux", "zimage")}
    with served_app(tmp_path) as (url, ws), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            run_dir = run_flow(page, url, ws, model=str(folders["flux"]), steps=6)
            cfg = (run_dir / "config.toml").read_text()
            assert 'family = "flux"' in cfg and "guidance_scale = 3.5" in cfg
            with safe_open(str(next(run_dir.glob("*.safetensors"))), "pt") as f:
                assert f.metadata()["modelspec.architecture"] == "flux-1-dev/lora"
            shot(page, "5-flux-finished")
            # the same dataset on Z-Image: the form re-reads the family from the new folder
            train_another(page, folders["zimage"], "zrun", lambda: wait_until(
                lambda: "T5-XXL" not in text_of(page, "#summary"), "the summary without Flux's T5", 60))
            wait_until(lambda: page.locator("#samples img").count() >= 1, "a Z-Image sample")
            shot(page, "6-zimage-finished")
            with safe_open(str(next((ws / "runs" / "zrun").glob("*.safetensors"))), "pt") as f:
                assert f.metadata()["modelspec.architecture"] == "z-image/lora"
        finally:
            browser.close()


def test_loha_and_lokr_train_from_the_train_tab(tmp_path):
    """The Network choice: LoKr on a tiny SDXL, then LoHa on a tiny SD1, each a LyCORIS file of its kind."""
    from playwright.sync_api import sync_playwright

    from trainer.lora.read import read_lora
    from trainer.models import tiny

    _need_browser()
    models = tmp_path / "workspace" / "models"
    folders = {fam: tiny.build_pipeline(fam, models / fam, seed=0) for fam in ("sdxl", "sd1")}
    with served_app(tmp_path) as (url, ws), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            run_dir = run_flow(page, url, ws, model=str(folders["sdxl"]), steps=4, network="LoKr (LyCORIS)")
            lokr = read_lora(next(run_dir.glob("*.safetensors")))
            assert lokr.network == "lokr" and lokr.family == "sdxl"
            shot(page, "7-lokr-finished")
            train_another(page, folders["sd1"], "loha-run",
                          lambda: (pick(page, "network", "LoHa (LyCORIS)"), wait_text(page, "#summary", "LoHa")))
            loha = read_lora(next((ws / "runs" / "loha-run").glob("*.safetensors")))
            assert loha.network == "loha" and loha.family == "sd1"
            shot(page, "8-loha-finished")
        finally:
            browser.close()

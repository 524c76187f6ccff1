"""A new user's first hour, in real headless Chromium against a real `lora-studio` process on the embedded
model: create a dataset; drop images with a corrupt and a tiny one; edit a caption; set a trigger of their
own; check the dataset; switch tabs; train with that trigger; watch loss and samples; reload mid-run; Stop;
Resume; finish; Preview two LoRAs at weights with a compare grid and an X/Y grid; rename a LoRA in the
Library and export it. Each step checks a defect a newcomer once hit (issue 18) and leaves a screenshot in
test-artifacts/journey/ (the path is printed)."""
import io
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from trainer.models.info import EMBEDDED_DIR
from trainer.resources import SAMPLE_DATASETS

from .test_ui_e2e import (CHROMIUM, FLAGS, ROOT, TABS, _need_browser, drawn_lines, field, pick, seen_text, served_app,
                          set_slider, switch_every_tab, text_of, train_sample_lora, visible_tabs, wait_text, wait_until)

SHOTS = ROOT / "test-artifacts" / "journey"
STEPS = 600  # ~45 s here; samples every 100 steps (the character preset on the embedded model)


class Journey:
    def __init__(self, page):
        self.page, self.n, self.started = page, 0, time.monotonic()

    def shot(self, what: str) -> None:
        self.n += 1
        self.page.screenshot(path=str(SHOTS / f"{self.n:02d}-{what}.png"), full_page=True)
        print(f"journey {self.n:02d} {what}: {time.monotonic() - self.started:.0f} s")

    def tab(self, name: str) -> None:
        self.page.get_by_role("tab", name=name).first.click()
        wait_until(lambda: visible_tabs(self.page) == TABS, f"the four tabs on {name}", 10)


def user_files(folder: Path) -> list[Path]:
    """Eight character pictures, a JPEG cut in half, a 20 px thumbnail, and the caption of one picture dropped with
    them (the browser uploads each file to a folder of its own: the app pairs them by name)."""
    folder.mkdir(parents=True)
    files = sorted((SAMPLE_DATASETS / "character").glob("*.png"))[:8]
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "orange").save(buf, format="JPEG")
    (folder / "broken.jpg").write_bytes(buf.getvalue()[:300])
    Image.new("RGB", (20, 20), "purple").save(folder / "thumb.png")
    (folder / "character_01.txt").write_text("my own words for picture one", encoding="utf-8")
    return files + [folder / "broken.jpg", folder / "thumb.png", folder / "character_01.txt"]


def step_of(page) -> int:
    m = re.search(r"(\d+) / \d+ steps", text_of(page, "#progress"))
    return int(m.group(1)) if m else 0


def x_tick_labels(page) -> list[str]:
    """The loss plot's x-axis (step) labels."""
    return [t.strip() for t in page.locator("#loss-plot g.role-axis[aria-label^='X-axis'] g.role-axis-label text")
            .all_text_contents() if t.strip()]


def y_tick_labels(page) -> list[str]:
    """The loss plot's y-axis labels (vega draws an SVG); every one must read as a short number."""
    return [t.strip() for t in page.locator("#loss-plot g.role-axis-label text").all_text_contents()
            if t.strip()] if page.locator("#loss-plot g.role-axis-label").count() else []


@pytest.mark.skipif(not (EMBEDDED_DIR / "model_index.json").exists(), reason="the embedded model is not built")
def test_a_new_users_first_hour(tmp_path):
    from playwright.sync_api import sync_playwright

    _need_browser()
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    print(f"\njourney screenshots: {SHOTS}")
    shared = train_sample_lora("style", tmp_path / "shared", steps=30)  # a LoRA someone gave the user
    files = user_files(tmp_path / "my-pictures")
    with served_app(tmp_path) as (url, ws), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        j = Journey(page)
        page.goto(url)
        j.tab("Datasets")

        # A dataset of their own, from pictures that include a corrupt and a tiny one.
        field(page, "new-dataset").fill("glorp")
        page.locator("#create-dataset").click()
        wait_text(page, "#dataset-message", "created dataset")
        page.locator("#create-dataset").click()  # an empty name (the box was cleared) is refused by name
        # gradio drops a click while the button's last event is still running (trigger_mode "once"): under load the
        # next click was lost and the message stayed on the empty-name refusal (seen once in 16 runs)
        wait_text(page, "#dataset-message", "may use letters")
        # the same name again is refused, not silently reused
        field(page, "new-dataset").fill("glorp")
        page.locator("#create-dataset").click()
        wait_text(page, "#dataset-message", "dataset glorp already exists")
        page.locator("#upload input[type=file]").set_input_files([str(f) for f in files])
        time.sleep(1.0)
        page.locator("#import").click()
        wait_text(page, "#dataset-message", "imported 9 of 10")
        report = text_of(page, "#import-report")
        assert "broken.jpg" in report and "corrupt or truncated" in report
        assert "Only image" not in text_of(page, "body") and "with its caption" in report  # the .txt was paired
        assert (ws / "datasets" / "glorp" / "character_01.txt").read_text(encoding="utf-8").startswith("my own words")
        assert report.count("character_00.png") == 1, report  # the detail column no longer repeats the name
        j.shot("imported-with-a-corrupt-file-reported")

        # The report belongs to its dataset: another dataset does not show it.
        pick(page, "dataset-pick", "character")
        wait_until(lambda: "broken.jpg" not in text_of(page, "#import-report"), "the report to clear")
        pick(page, "dataset-pick", "glorp")
        wait_until(lambda: page.locator("#gallery img").count() == 9, "the nine imported images")

        # Saving with no image picked is said beside the Save button, not at the top of the page
        page.locator("#save-caption").click()
        wait_text(page, "#caption-message", "click an image first")
        assert "click an image" not in text_of(page, "#dataset-message")
        page.locator("#gallery img").first.click()
        wait_until(lambda: field(page, "image-name").input_value(), "the clicked image")
        name = field(page, "image-name").input_value()
        field(page, "caption").fill("a large figure on a blue background")
        page.locator("#save-caption").click()
        wait_text(page, "#caption-message", "saved")
        assert (ws / "datasets" / "glorp" / name).with_suffix(".txt").read_text() == \
            "a large figure on a blue background\n"
        field(page, "trigger").fill("glorp")
        page.locator("#save-settings").click()
        wait_text(page, "#settings-message", "trigger glorp")
        # A bulk tag edit shows in the caption being edited (saving the old text would have undone it).
        page.locator("#tags-accordion").get_by_text("Tags").first.click()
        field(page, "bulk-tag").fill("smiling")
        page.locator("#bulk-apply").click()
        wait_text(page, "#tags-message", "caption")
        wait_until(lambda: "smiling" in field(page, "caption").input_value(), "the open caption after a bulk edit")
        j.shot("caption-and-trigger-saved")

        # Checked at the resolution the embedded model trains at (64 px), not 512: no image is blown up.
        page.get_by_text("Validation and buckets").click()
        wait_until(lambda: field(page, "check-resolution").input_value() == "64", "the training resolution")
        page.locator("#check-dataset").click()
        wait_text(page, "#check-summary", "1 excluded", timeout_s=60)
        assert "too small" in text_of(page, "#check-files") and "upscaled" not in text_of(page, "#check-files")
        # Captions without the trigger are normal (training puts it first): one note, not a warning per file.
        assert "no trigger" not in text_of(page, "#check-files")
        assert "do not start with the trigger 'glorp'" in text_of(page, "#check-summary")
        j.shot("checked-at-64-px")

        switch_every_tab(page)
        j.shot("tabs-all-there")

        # Train with their trigger: the sample prompts say glorp, not the demo's zorb.
        j.tab("Train")
        # the dataset just made and captioned is the one the Train tab starts on (it stayed on the sample set)
        wait_until(lambda: field(page, "train-dataset").input_value() == "glorp", "glorp on the Train tab", 30)
        wait_text(page, "#summary", "glorp, ")
        assert "zorb" not in text_of(page, "#summary")
        steps = field(page, "steps")
        steps.fill(str(STEPS))
        steps.press("Tab")
        wait_until(lambda: re.search(rf"\bsteps\s+{STEPS}\b", text_of(page, "#summary")), "steps in the summary")
        field(page, "run-name").fill("glorp-run")
        field(page, "run-name").press("Tab")
        time.sleep(1.0)
        wait_text(page, "#summary", "glorp, ")  # recomputed for the new run name
        j.shot("settings-with-glorp-prompts")
        page.locator("#start").click()
        wait_text(page, "#start-message", "started", timeout_s=30)
        assert field(page, "run-name").input_value() == "glorp-run-2"  # the next name follows this one, not "run"
        wait_until(lambda: step_of(page) >= 20, "the first steps", 120)
        wait_until(lambda: len(y_tick_labels(page)) >= 2, "the loss plot's axis", 30)
        assert all(re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", t) and len(t) <= 8 for t in y_tick_labels(page)), \
            y_tick_labels(page)  # numbers, not a pile of 10-digit category labels
        assert all(re.fullmatch(r"\d+", t) for t in x_tick_labels(page)), x_tick_labels(page)  # steps: 100, not 1e+2
        assert "ETA" in text_of(page, "#progress")
        wait_until(lambda: {"loss", "smoothed"} <= set(drawn_lines(page)), "the loss curve drawn in colour", 30)
        for _ in range(6):  # the timer's ticks: no gradio queue text ("queue: 1/1 | 1.3/0.6s") in the run's state
            assert "queue" not in seen_text(page, "#run-state").lower()
            time.sleep(0.5)
        j.shot("training-loss-plot")

        # A reload mid-run lands on the Train tab, keeps the form, proposes a free run name, shows the run going.
        page.reload()
        wait_until(lambda: page.get_by_role("tab", name="Train", selected=True).count() == 1,
                   "the Train tab after a reload mid-run", 30)
        wait_until(lambda: visible_tabs(page) == TABS, "the four tabs after the reload", 10)
        wait_until(lambda: field(page, "train-dataset").input_value() == "glorp", "the dataset kept over a reload")
        wait_until(lambda: field(page, "steps").input_value() == str(STEPS), "the steps kept over a reload")
        assert field(page, "run-name").input_value() not in ("", "glorp-run")
        wait_until(lambda: field(page, "run-pick").input_value() == "glorp-run", "the run after the reload")
        wait_until(lambda: page.locator("#samples img").count() >= 2, "samples rendered mid-run", 180)
        assert re.search(r"step \d+: glorp", text_of(page, "#samples")), text_of(page, "#samples")[:300]  # labelled
        j.shot("reloaded-mid-run-with-samples")

        # Stop is stopped within seconds; Resume continues to the end.
        clicked = time.monotonic()
        page.locator("#stop").click()
        wait_text(page, "#run-state", "stopped", timeout_s=60)
        stopped_s = time.monotonic() - clicked
        print(f"journey: Stop took {stopped_s:.1f} s from the click to 'stopped' (at step {step_of(page)})")
        assert stopped_s < 30 and step_of(page) < STEPS
        j.shot("stopped")
        page.locator("#resume").click()
        wait_text(page, "#start-message", "resuming", timeout_s=30)
        wait_text(page, "#run-state", "finished", timeout_s=300)
        assert step_of(page) == STEPS
        # "resuming glorp-run: ..." does not stay once the run has ended
        wait_until(lambda: "resuming" not in text_of(page, "#start-message"), "the start line cleared", 30)
        lora = ws / "runs" / "glorp-run" / "glorp-run.safetensors"
        assert lora.exists()
        # The run timed its steps: the estimate is a range measured here as soon as it ends, with no form change.
        wait_text(page, "#estimate", "measured here on cpu", timeout_s=30)
        j.shot("finished-and-estimate-measured")

        # Preview: the shared LoRA dropped in, their own beside it, at chosen weights.
        j.tab("Preview")
        dropped = time.monotonic()
        page.locator("#preview-drop input[type=file]").set_input_files(str(shared))
        wait_until(lambda: "style" in field(page, "slot0-file").input_value(), "the dropped LoRA in slot 1", 30)
        print(f"journey: a dropped LoRA was in slot 1 after {time.monotonic() - dropped:.1f} s (read torch-free)")
        pick(page, "slot1-file", "glorp-run (run)")  # not "glorp-run (run glorp-run)"
        set_slider(page, "slot0-weight", 0.6)
        set_slider(page, "slot1-weight", 0.8)
        field(page, "preview-prompt").fill("glorp, a large figure on a blue background")
        page.locator("#generate").click()
        wait_until(lambda: '"weight": 0.8' in text_of(page, "#preview-settings"), "the generated image", 180)
        j.shot("preview-two-loras")
        page.locator("#compare").click()
        wait_until(lambda: len(list((ws / "preview" / "grids").glob("*-4-of-4.png"))) == 1, "the compare grid", 240)
        wait_until(lambda: page.locator("#compare-grid img").count() == 1, "the grid on the page")
        j.shot("compare-grid")
        page.get_by_text("X/Y over LoRA 1 and 2 weights").click()
        field(page, "xy-x").fill("0, 1")
        field(page, "xy-y").fill("0, 1")
        page.locator("#compare").click()
        wait_until(lambda: len(list((ws / "preview" / "grids").glob("*-4-of-4.png"))) == 2, "the X/Y grid", 240)
        j.shot("xy-grid")

        # Library: listed by file name, renamed, exported with its card.
        j.tab("Library")
        page.locator("#library-refresh").click()
        wait_text(page, "#library-table", "glorp-run")
        page.locator("#library-table").get_by_role("gridcell", name="glorp-run", exact=True).first.click()
        wait_until(lambda: field(page, "library-selected").input_value().endswith("glorp-run.safetensors"),
                   "the picked LoRA")
        field(page, "library-new-name").fill("glorp-final")
        # Two named hashes: the whole file's (AutoV2) and the tensors' (AutoV3, kohya's sshs_model_hash).
        details = text_of(page, "#library-details")
        assert '"autov2"' in details and '"autov3"' in details and "AutoV2 (file)" in text_of(page, "#library-table")
        page.locator("#library-rename").click()
        wait_text(page, "#library-message", "renamed to glorp-final.safetensors")
        wait_until(lambda: field(page, "library-selected").input_value().endswith("glorp-final.safetensors"),
                   "the selection to follow the renamed file")
        # Listed by file name: the run's own file and the renamed copy are both there under their names.
        wait_text(page, "#library-table", "glorp-final")
        assert "glorp-run" in text_of(page, "#library-table")
        page.locator("#library-export").click()
        wait_until(lambda: page.locator("#library-download a").count() >= 2, "the download links", 60)
        wait_text(page, "#library-message", "exported glorp-final")
        links = text_of(page, "#library-download").replace("\n", "")
        assert "glorp-final.safetensors" in links and "glorp-final.README.md" in links
        j.shot("library-renamed-and-exported")
        browser.close()
    console = (tmp_path / "app.log").read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in console, console[-3000:]
    worker = (ws / "preview" / "worker.log").read_text(encoding="utf-8", errors="replace")
    assert "requires torchvision" not in worker, worker[-2000:]  # no notes about image processors nothing uses

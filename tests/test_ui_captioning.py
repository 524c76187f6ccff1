"""Captioning in the browser: pick the WD tagger (a tiny one in the workspace), preview the first images without
writing anything, apply to all with the trigger first and the old captions kept, undo, and read the caption
lint of the check. Screenshots go to test-artifacts/ui/."""
import time

from PIL import Image

from tests.captioner_models import build_wd_tagger
from tests.test_ui_e2e import FLAGS, CHROMIUM, _need_browser, field, served_app, shot, wait_text


def test_preview_apply_undo_and_lint(tmp_path):
    _need_browser()
    from playwright.sync_api import sync_playwright

    with served_app(tmp_path) as (url, ws):
        ds = ws / "datasets" / "colours"
        ds.mkdir(parents=True)
        for i, c in enumerate(["red", "blue", "red"]):
            Image.new("RGB", (64 + 16 * i, 64), c).save(ds / f"c{i}.png")
        (ds / "c1.txt").write_text("blue thing by hand, blue thing by hand")
        tagger = build_wd_tagger(ws / "models" / "tiny-tagger")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(url)
            page.get_by_role("tab", name="Datasets").first.click()
            box = field(page, "dataset-pick")
            box.click()
            box.fill("colours")
            page.get_by_role("option", name="colours", exact=True).first.click()
            page.locator("#captioning").get_by_text("Caption images").first.click()
            box = field(page, "captioner-model")
            box.wait_for(state="visible")
            for _ in range(20):  # on a busy machine the box can still be settling right after the accordion opens
                box.fill(str(tagger))
                time.sleep(0.5)
                if box.input_value() == str(tagger):
                    break
            assert box.input_value() == str(tagger)
            field(page, "trigger").fill("glorp") if page.locator("#trigger").count() else None
            page.locator("#caption-preview").click()
            wait_text(page, "#caption-status", "previewed 2 image(s)")
            table = page.locator("#caption-preview-table").inner_text()
            assert "red background" in table and "c0.png" in table and "c1.png" not in table  # c1 has a caption
            assert not (ds / "c0.txt").exists()  # a preview writes nothing
            shot(page, "caption-preview")
            page.locator("#captioner-overwrite input").check()
            page.locator("#caption-apply").click()
            wait_text(page, "#caption-status", "captioned 3 image(s)", timeout_s=60)
            assert "red background" in (ds / "c0.txt").read_text()
            assert "blue background" in (ds / "c1.txt").read_text()
            shot(page, "caption-applied")
            page.locator("#caption-undo").click()
            wait_text(page, "#dataset-message", "put back 1 caption(s) and took away 2 new one(s)")
            assert (ds / "c1.txt").read_text() == "blue thing by hand, blue thing by hand"
            assert not (ds / "c0.txt").exists() and not (ds / "c2.txt").exists()
            page.get_by_text("Validation and buckets").first.click()
            page.locator("#check-dataset").click()
            wait_text(page, "#check-summary", "captions counted with")
            files = page.locator("#check-files").inner_text()
            assert "duplicate tag(s): blue thing by hand" in files
            shot(page, "caption-lint")
            time.sleep(0.2)
            browser.close()

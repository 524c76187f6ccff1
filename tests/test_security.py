"""Through the real HTTP API of a real `lora-studio` process: what a request may name on disk stays inside
the workspace and the folders allowed at launch, and a page on another site cannot drive the app (a foreign
Host is not answered; a foreign Origin cannot change anything)."""
import time
import urllib.error
import urllib.request

import pytest

from trainer.config import RunConfig
from trainer.models.info import EMBEDDED_DIR

from .conftest import make_dataset
from .test_ui_e2e import served_app

pytestmark = pytest.mark.skipif(not (EMBEDDED_DIR / "model_index.json").exists(), reason="no embedded model")


def start_toml(dataset, **sections) -> str:
    """What the Advanced box would hold: a one-step run on the embedded model, plus the edits under test."""
    layer = {"model": {"source": "tiny"}, "data": {"dataset": str(dataset), "resolution": 64},
             "train": {"max_steps": 1}, "sample": {"at_end": False}}
    for section, values in sections.items():
        layer.setdefault(section, {}).update(values)
    return RunConfig.load(layer).to_toml()


def client(url, **headers):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False, ssl_verify=False, analytics_enabled=False,
                  headers=headers or None)


def status(url, method="GET", headers=None, body=None) -> int:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_start_refuses_every_path_outside_the_workspace(tmp_path):
    outside = make_dataset(tmp_path / "elsewhere" / "photos", n=2, size=(64, 64))
    allowed = make_dataset(tmp_path / "models-and-data" / "photos", n=2, size=(64, 64))
    with served_app(tmp_path, "--allow-path", str(allowed.parent)) as (url, ws):
        (ws / "datasets" / "sneaky").symlink_to(outside, target_is_directory=True)
        inside = ws / "datasets" / "character"
        refused = {
            "data.dataset": start_toml(outside),
            "data.cache_dir": start_toml(inside, data={"cache_dir": str(tmp_path / "elsewhere" / "cache")}),
            "data.reg_dataset": start_toml(inside, data={"reg_dataset": str(outside)}),
            "data.dataset ": start_toml("../../elsewhere/photos"),  # relative: resolved against the workspace
            "data.dataset  ": start_toml(ws / "datasets" / "sneaky"),  # a symlink inside, pointing out
        }
        c = client(url)
        for i, (key, toml) in enumerate(refused.items()):
            message = c.predict(toml, f"escape{i}", api_name="/do_start")[0]
            assert message.startswith("**Not started:**") and key.strip() in message and "--allow-path" in message, \
                (key, message)
            assert not (ws / "runs" / f"escape{i}").exists()
        assert not (tmp_path / "elsewhere" / "cache").exists()
        # Reading a base model writes nothing: on this loopback-only app a model folder may be anywhere; one that is
        # not there is named as such, not as outside the workspace
        message = c.predict(start_toml(inside, model={"source": str(tmp_path / "elsewhere" / "no-model")}), "m",
                            api_name="/do_start")[0]
        assert "does not exist" in message and "--allow-path" not in message, message

        # A folder allowed at launch trains like one in the workspace.
        message, _, _ = c.predict(start_toml(allowed), "allowed", api_name="/do_start")
        assert "started" in message
        deadline = time.time() + 180
        while time.time() < deadline:
            state = c.predict("allowed", api_name="/run_state")[0]
            if "finished" in state or "failed" in state:
                break
            time.sleep(1)
        assert "finished" in state, (state, (ws / "runs" / "allowed" / "trainer.log").read_text())
        assert (ws / "runs" / "allowed" / "allowed.safetensors").exists()


def test_foreign_host_and_origin_are_refused(tmp_path):
    with served_app(tmp_path, "--allow-origin", "http://ok.example") as (url, ws):
        port = url.rstrip("/").rsplit(":", 1)[1]
        # DNS rebinding: the page's own name, pointed at 127.0.0.1, is not answered.
        assert status(url, headers={"Host": "evil.example"}) == 403
        assert status(url, headers={"Host": f"evil.example:{port}"}) == 403
        assert status(url, headers={"Host": f"localhost:{port}"}) == 200

        # A cross-site page can send, but not change anything: queue/join and uploads are refused.
        with pytest.raises(Exception):
            client(url, Origin="http://evil.example").predict("evil", api_name="/do_create")
        assert not (ws / "datasets" / "evil").exists()
        boundary = "x1x2x3"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
                f"Content-Type: image/png\r\n\r\nnot really\r\n--{boundary}--\r\n").encode()
        upload = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        assert status(f"{url}gradio_api/upload", "POST", {**upload, "Origin": "http://evil.example"}, body) == 403
        assert status(f"{url}gradio_api/upload", "POST", {**upload, "Origin": "null"}, body) == 403

        # The app's own page, a script without an Origin, and an origin allowed at launch all work.
        assert status(f"{url}gradio_api/upload", "POST", {**upload, "Origin": url.rstrip("/")}, body) == 200
        for name, headers in (("mine", {"Origin": url.rstrip("/")}), ("script", {}),
                              ("allowed", {"Origin": "http://ok.example"})):
            client(url, **headers).predict(name, api_name="/do_create")
            assert (ws / "datasets" / name).is_dir(), name

"""`lora-studio doctor`: each check on faked versions (the transformers/peft break that stopped every run
included), and the real command on this environment."""
import json
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from trainer import doctor

REQS = [Requirement(r) for r in ("torch>=2.4,<2.14", "transformers>=4.45,<5.24", "peft>=0.17,<1", "gradio>=5,<7")]
GOOD = {"torch": "2.13.0+cpu", "transformers": "5.23.0", "peft": "0.21.2", "gradio": "6.31.0"}


def report(tmp_path, **versions):
    return doctor.check(device=False, versions={**GOOD, **versions}, reqs=REQS, places={"workspace": tmp_path})


def test_a_good_environment_has_no_findings(tmp_path):
    r = report(tmp_path)
    assert r.findings == [] and "no problems found" in r.text()


def test_transformers_that_demands_a_missing_peft_is_named_with_its_fix(tmp_path):
    r = report(tmp_path, transformers="5.24.0")
    lines = [f.line() for f in r.findings]
    rule = next(f for f in r.findings if "peft >= 0.22" in f.message)
    assert "transformers 5.24.0" in rule.message and "peft 0.21.2" in rule.message
    assert rule.note and not rule.blocking  # LoRA Studio itself trains with it: peft's own API
    line = rule.line()  # a note, whose advice never breaks the lock it fires on
    assert line.startswith("note:") and 'pip install "transformers<5.24"' not in line and "another environment" in line
    assert any("outside the tested range" in line for line in lines)  # and the cap says it is untested
    fixed = report(tmp_path, transformers="5.24.0", peft="0.22.0")
    assert not any("peft >= 0.22" in f.message for f in fixed.findings)


def test_missing_or_too_old_blocks_and_too_new_warns(tmp_path):
    missing = report(tmp_path, peft=None)
    assert [f.blocking for f in missing.findings] == [True] and "peft is not installed" in missing.findings[0].message
    old = report(tmp_path, gradio="4.44.1")
    assert old.blocking and "older than LoRA Studio supports" in old.blocking[0].message
    assert 'pip install -c requirements.lock "gradio<7,>=5"' == old.blocking[0].fix
    new = report(tmp_path, gradio="7.0.0")
    assert new.findings and not new.blocking


def test_old_peft_and_mismatched_torchvision(tmp_path):
    r = doctor.check(device=False, versions={**GOOD, "peft": "0.16.0"}, reqs=[], places={"workspace": tmp_path})
    assert r.blocking and "predates" in r.blocking[0].message
    tv = report(tmp_path, torchvision="0.29.1")
    assert "built for torch 2.14" in tv.findings[0].message and not tv.blocking
    assert report(tmp_path, torchvision="0.28.0").findings == []


def test_low_disk_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "LOW_DISK_GB", 1e9)  # every real disk is "low" against this
    r = report(tmp_path)
    assert "GB free for the workspace" in r.findings[0].message and "--workspace DIR" in r.findings[0].fix


@pytest.mark.smoke
def test_doctor_command_reports_this_environment():
    out = subprocess.run([sys.executable, "-m", "trainer", "doctor", "--json"], capture_output=True, text=True,
                         timeout=120)
    data = json.loads(out.stdout)
    assert data["versions"]["torch"] and data["versions"]["peft"] and data["device"]["kind"] in ("cpu", "cuda", "mps")
    assert set(data["disk"]) == {"workspace", "cache"}
    assert out.returncode == (0 if data["ok"] else 1)
    assert data["ok"], [f["message"] for f in data["findings"] if f["blocking"]]  # the locked set must pass


def test_blocking_findings_check_the_workspace_the_app_was_given(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "disk_info", lambda places: ({}, [doctor.Finding(True, str(places["workspace"]), "")]))
    assert doctor.blocking_findings(tmp_path / "ws")[0].message == str(tmp_path / "ws")

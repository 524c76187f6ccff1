import pytest

from trainer.config import ConfigError, RunConfig, describe


def test_layers_apply_in_order(tmp_path):
    preset = tmp_path / "preset.toml"
    preset.write_text("[lora]\nrank = 8\nalpha = 4.0\n[train]\nmax_steps = 100\n")
    user = tmp_path / "user.toml"
    user.write_text("[lora]\nrank = 32\n")
    cfg = RunConfig.load(preset, user, overrides=["train.max_steps=7", "lora.train_text_encoder=false"])
    assert cfg.lora.rank == 32          # user file beats preset
    assert cfg.lora.alpha == 4.0        # preset beats default
    assert cfg.train.max_steps == 7     # override beats everything
    assert cfg.lora.train_text_encoder is False
    assert cfg.optim.lr == RunConfig().optim.lr


def test_resolved_config_round_trips(tmp_path):
    cfg = RunConfig.load(overrides=["data.resolution=768", "sample.prompts=[\"a cat\", \"a dog\"]",
                                    "lora.unet_extra=[\"conv\"]"])
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    again = RunConfig.load(path)
    assert again == cfg
    assert 'prediction_type = "auto"' in cfg.to_toml()  # every key written, auto included


@pytest.mark.parametrize("override, words", [
    ("lora.rank=0", ["lora.rank", "0", "1 to 1024"]),
    ("lora.rank=abc", ["lora.rank", "'abc'", "whole number"]),
    ("train.mixed_precision=fp8", ["train.mixed_precision", "'fp8'", "no, fp16, bf16"]),
    ("lora.nope=1", ["lora.nope", "rank"]),
    ("nosection.key=1", ["nosection", "lora"]),
    ("train.gradient_checkpointing=maybe", ["train.gradient_checkpointing", "true or false"]),
    ("lora.unet_extra=[\"conv\", \"zz\"]", ["lora.unet_extra", "proj, ff, conv"]),
    ("data.resolution", ["section.key=value"]),
])
def test_bad_values_name_key_value_and_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        RunConfig.load(overrides=[override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_unknown_key_in_file_names_it(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmax_step = 5\n")
    with pytest.raises(ConfigError, match="train.max_step"):
        RunConfig.load(bad)


def test_invalid_toml_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.load(bad)


def test_every_field_has_help():
    rows = describe()
    assert len(rows) > 40
    assert all(help_text for _, help_text, _ in rows)
    keys = {k for k, _, _ in rows}
    for needed in ["train.max_steps", "train.seed", "train.mixed_precision", "train.gradient_checkpointing",
                   "lora.rank", "lora.alpha", "lora.train_text_encoder", "data.resolution", "save.every_n_steps",
                   "save.state_every_n_steps"]:
        assert needed in keys

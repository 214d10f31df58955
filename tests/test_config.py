import json

import pytest

from vqmae.config import Config, ConfigError, load_config, valid_keys


def test_presets_differ_and_roundtrip():
    paper, tiny = load_config("paper"), load_config("tiny")
    assert paper.audio.n_bins == 513 and paper.audio.frame_rate == 50.0
    clips = lambda c: c.synth.n_speakers * (c.synth.clips_per_speaker + c.synth.audio_only_per_speaker)  # noqa: E731
    assert tiny.preset == "tiny" and clips(tiny) < clips(paper) and tiny.synth.max_seconds < paper.synth.max_seconds
    for cfg in (paper, tiny):
        assert Config.from_dict(json.loads(cfg.to_json())) == cfg


def test_overrides_are_typed():
    cfg = load_config("tiny", ["audio.n_fft=512", "face.mode=haar", "audio.peak_normalize=false",
                               "face.box_scale=2", "synth.emotions=happy,sad"])
    assert cfg.audio.n_fft == 512 and cfg.face.mode == "haar" and cfg.audio.peak_normalize is False
    assert cfg.face.box_scale == 2.0 and isinstance(cfg.face.box_scale, float)
    assert cfg.synth.emotions == ("happy", "sad")


@pytest.mark.parametrize("item, message", [
    ("audio.n_fft=1.5", "audio.n_fft=1.5: expected an integer"),
    ("face.mode=dlib", "face.mode='dlib': expected one of ['auto', 'fan', 'haar', 'none']"),
    ("audio.peak_normalize=maybe", "audio.peak_normalize='maybe': expected bool"),
    ("audio=3", "'audio' is a section"),
    ("n_fft", "not of the form key=value"),
])
def test_bad_overrides(item, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [item])
    assert message in str(e.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config("paper", ["audio.nfft=512"])
    assert "unknown config key 'audio.nfft'" in str(e.value) and "audio.n_fft" in str(e.value)
    assert "audio.n_fft" in valid_keys()


def test_unknown_preset_and_stored_keys():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config("huge")
    data = load_config("tiny").to_dict()
    data["audio"]["future_field"] = 1
    with pytest.raises(ConfigError, match="audio.future_field"):
        Config.from_dict(data)


def test_unknown_key_suggests_the_close_ones_not_all():
    from vqmae.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"'mae.widht'; did you mean 'mae.width'") as e:
        load_config("tiny", ["mae.widht=3"])
    assert len(str(e.value)) < 200
    with pytest.raises(ConfigError, match=r"'nosuch.key'; valid keys: audio, audio_vq"):
        load_config("tiny", ["nosuch.key=1"])


def test_config_show_lists_keys_types_preset_values_and_paper_defaults():
    from typer.testing import CliRunner

    from vqmae_cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["config", "show", "mae.head_dim", "--preset", "tiny"], terminal_width=200)
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "mae.head_dim" in x)
    assert [c.strip() for c in line.strip("│┃ ").split("│")] == ["mae.head_dim", "int", "16", "-1"]
    r = runner.invoke(app, ["config", "show", "finetune.pooling", "--preset", "tiny", "--set",
                            "finetune.pooling=stats"], terminal_width=200)
    line = next(x for x in r.output.splitlines() if "finetune.pooling" in x)
    assert "'stats'" in line and "'position'" in line and "mean" in line
    from vqmae_cli.config import rows
    from vqmae.config import load_config, valid_keys
    listed = rows(load_config("tiny"), load_config("paper"))
    assert [k for k, *_ in listed] == valid_keys()  # every key --set accepts, in order
    assert ("synth.n_speakers", "int", 12, load_config("paper").synth.n_speakers) in listed
    r = runner.invoke(app, ["config", "show", "mae.hed"], terminal_width=200)
    assert r.exit_code == 2 and "mae.head_dim" in r.output

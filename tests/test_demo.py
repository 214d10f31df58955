"""Acceptance path of the foundation: `vqmae synth` then `vqmae ingest --face haar` on its output."""

import json

from typer.testing import CliRunner

from vqmae_cli.main import app


def test_synth_then_ingest_finds_faces(tmp_path):
    corpus, run = tmp_path / "corpus", tmp_path / "ingest"
    runner = CliRunner()
    res = runner.invoke(app, ["synth", str(corpus), "--preset", "tiny", "--workers", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["ingest", str(corpus), "--face", "haar", "--preset", "tiny",
                              "--workers", "2", "--run-dir", str(run)])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["ok"] == summary["clips"] == 120  # 12 speakers × (8 + 2)
    assert summary["face_rate_frames"] >= 0.95 and summary["clips_face_rate_below_0.5"] == 0
    rows = [json.loads(line) for line in (run / "clips.jsonl").read_text().splitlines()]
    video = [r for r in rows if r["video_frames"]]
    assert len(video) == 96 and all(r["audio_frames"] == 2 * r["video_frames"] for r in video)


def test_a_second_demo_in_the_same_run_directory_stops_without_deleting(tmp_path):
    """`make demo` holds a lock on RUN: a second one with the same RUN exits at once, saying which
    directory is taken, and the first one's files are left alone (another RUN runs side by side)."""
    import fcntl
    import shutil
    import subprocess
    from pathlib import Path

    import pytest

    if shutil.which("make") is None or shutil.which("flock") is None:
        pytest.skip("make and flock are needed")
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    store = run / "data" / "tokens.zarr"
    store.mkdir(parents=True)
    (store / "zarr.json").write_text("{}")
    for target, var in (("demo", "RUN"), ("speech-demo", "SPEECH_RUN")):
        with open(run / ".lock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first run, still going
            res = subprocess.run(["make", "-C", str(root), target, f"{var}={run}"],
                                 capture_output=True, text=True, timeout=60)
        assert res.returncode != 0
        assert f"{run} is in use by another run" in res.stderr and f"{var}={run}-2" in res.stderr
        assert (store / "zarr.json").read_text() == "{}"

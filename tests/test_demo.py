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

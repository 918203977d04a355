import shutil

import pytest

from ssamba import demo

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install -y espeak-ng)")


@needs_espeak
def test_demo_writes_a_truthful_report_and_reuses_finished_stages(tmp_path, monkeypatch, capsys):
    report = demo.run_demo(tmp_path, scale="tiny").read_text()
    assert "| Offline demo corpus | done |" in report and "| Features | done |" in report
    assert "| kws |" in report and "fbank mean" in report
    assert (tmp_path / "corpus" / "manifests" / "kws_train.json").exists()
    assert "## Not run yet" in report  # says what it does not do instead of pretending

    # A rerun reuses the finished stages; a failing stage is reported while the others still run.
    def broken(ctx):
        raise RuntimeError("stage exploded")

    stages = [demo.Stage("boom", "Broken stage", broken), *demo.STAGES]
    monkeypatch.setattr(demo, "STAGES", stages)
    report = demo.run_demo(tmp_path, scale="tiny").read_text()
    out = capsys.readouterr().out
    assert "Offline demo corpus: reused" in out
    assert "| Broken stage | failed |" in report and "stage exploded" in report
    assert "| Features | done |" in report


def test_synth_without_espeak_says_what_to_install(tmp_path, monkeypatch, capsys):
    from ssamba.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng here
    assert main(["data", "synth", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "apt-get install -y espeak-ng" in capsys.readouterr().err

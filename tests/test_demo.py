"""`ssamba demo` end to end at a test-sized budget: every stage runs, the report's tables hold the numbers this
run produced, a rerun reuses finished stages, and a failing stage is reported while the others still run."""

import json
import re
import shutil

import pytest

from ssamba import demo

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install -y espeak-ng)")


def _section(report: str, title: str) -> str:
    return report.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.slow
@needs_espeak
def test_demo_end_to_end_at_a_tiny_budget(tmp_path, monkeypatch, capsys):
    report = demo.run_demo(tmp_path, scale="tiny", budget_minutes=1).read_text()
    for stage in demo.STAGES:
        assert f"| {stage.title} | done |" in report, _section(report, stage.title)

    # pretraining: the table's last validation accuracy and MSE are the run's own
    pre = _section(report, "Self-supervised pretraining")
    for model in demo.PRETRAIN_MODELS:
        valid = [e for e in demo._jsonl(tmp_path / "pretrain" / model / "metrics.jsonl") if e.get("split") == "valid"]
        row = next(line for line in pre.splitlines() if line.startswith(f"| {model} |"))
        assert f"**{valid[-1]['acc']:.3f}**" in row and f"{valid[-1]['mse']:.3f}" in row
    assert (tmp_path / "pretrain_curves.png").stat().st_size > 0

    # fine-tuning: every cell of the comparison, pretrained and scratch, in the table
    rows = json.loads((tmp_path / "finetune" / "compare.json").read_text())["rows"]
    assert {(r["task"], r["model"], r["init"], r["mode"]) for r in rows} == {
        (t, m, i, mode) for t in ("kws", "sid", "sounds") for m in demo.PRETRAIN_MODELS
        for i in ("pretrained", "scratch") for mode in ("probe", "finetune")}
    table = _section(report, "Fine-tuning and linear probes")
    for r in rows:
        assert f"| {r['task']} | {r['model']} | {r['mode']} |" in table and f"{r['test']:.3f}" in table

    # efficiency: a timed row per model and length, and the ratios
    bench = _section(report, "Efficiency: SSAMBA vs SSAST inference")
    assert re.search(r"\| 64 \| 128 \| ssamba_tiny \| bimamba_v2 \| cpu \| [\d.]+ ms", bench)
    assert re.search(r"\| 128 \| ssamba_tiny\[cpu\] \| ssast_tiny\[explicit\] \| [\d.]+x", bench)

    # MI: one curve per model and panel, numbers as mean±std
    mi = json.loads((tmp_path / "mi" / "mi.json").read_text())
    section = _section(report, "Layer-wise mutual information")
    assert re.search(r"\| ssamba_tiny \| pretrained \| -?[\d.]+±[\d.]+", section)
    assert len(mi["panels"]) == len(demo.PRETRAIN_MODELS) + 1  # + Mamba-HuBERT: CTC alone vs + Conformer
    assert re.search(r"\| Mamba-HuBERT \| CTC \+ Conformer \| -?[\d.]+±[\d.]+", section)

    # HuBERT: the table's CER is the CTC run's
    hub = _section(report, "Mamba-HuBERT")
    result = json.loads((tmp_path / "hubert" / "ctc_pretrained" / "metrics.json").read_text())
    assert f"| {result['test']:.3f} | {result['test_wer']:.3f} |" in hub
    assert "ssamba hubert pretrain --encoder extbimamba" in hub  # the command that produced it

    # A rerun reuses every finished stage; a failing stage is reported while the others still run.
    def broken(ctx):
        raise RuntimeError("stage exploded")

    monkeypatch.setattr(demo, "STAGES", [demo.Stage("boom", "Broken stage", broken), *demo.STAGES])
    capsys.readouterr()
    report = demo.run_demo(tmp_path, scale="tiny", budget_minutes=1).read_text()
    out = capsys.readouterr().out
    assert all(f"{s.title}: reused" in out for s in demo.STAGES[1:])
    assert "| Broken stage | failed |" in report and "stage exploded" in report
    assert "| Mamba-HuBERT | done |" in report


def test_budget_plan():
    assert demo.make_plan(20).model_overrides == {}  # the default budget runs the published tiny presets
    assert demo.make_plan(1).shrunk
    with pytest.raises(ValueError, match="budget"):
        demo.make_plan(0)


def test_synth_without_espeak_says_what_to_install(tmp_path, monkeypatch, capsys):
    from ssamba.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng here
    assert main(["data", "synth", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "apt-get install -y espeak-ng" in capsys.readouterr().err

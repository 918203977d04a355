"""`ssamba bench gemm`: the table's content and the CLI's handling of bad options (timings are not checked)."""

from __future__ import annotations

import json

from ssamba.bench.gemm import format_table, run
from ssamba.cli import main


def test_every_product_is_timed_both_ways_at_the_given_tokens():
    result = run(tokens=24, threads=1, repeats=2)
    assert [(r["model"], r["product"]) for r in result["rows"]][:3] == [
        ("ssamba_tiny", "in_proj"), ("ssamba_tiny", "x_proj"), ("ssamba_tiny", "out_proj")]  # fmt: skip
    for r in result["rows"]:
        assert 24 in (r["shape"][0], r["shape"][2])
        assert r["torch_mm_s"] > 0 and r["fast_path_s"] > 0
        assert abs(r["speedup"] - r["torch_mm_s"] / r["fast_path_s"]) < 1e-9
    table = format_table(result)
    assert "| ssast_tiny | fc2 | 24 x 768 x 192 |" in table and result["machine"]["cpu"] in table


def test_cli_prints_json_and_rejects_bad_options(capsys):
    assert main(["bench", "gemm", "--tokens", "16", "--repeats", "1", "--threads", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) == 7
    assert main(["bench", "gemm", "--tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tokens" in err

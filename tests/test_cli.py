"""The command line on the embedded default model."""
from __future__ import annotations

import pytest

from cotrt import cli


def test_generate_streams_and_reports(capsys):
    assert cli.main(["generate", "What is 2+3?", "--max-new-tokens", "12", "--max-len", "256"]) == 0
    out, err = capsys.readouterr()
    assert "5" in out
    assert "tokens in" in err and ("exit eos" in err or "exit max_new_tokens" in err)


def test_generate_think_budget_forces_the_answer_cue(capsys):
    args = ["generate", "Explain step by step: what is 12 * 13?", "--max-new-tokens", "40",
            "--think-budget", "10", "--answer-budget", "8", "--max-len", "256"]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert "Final answer:" in out and "think end think_budget" in err


def test_generate_rejects_bad_arguments(capsys):
    assert cli.main(["generate", "hi", "--think-budget", "-3"]) == 2
    assert "think_budget" in capsys.readouterr().err


def test_demo_prints_the_table(capsys):
    assert cli.main(["demo", "--max-new-tokens", "24", "--max-len", "256", "--no-testbed"]) == 0
    out = capsys.readouterr().out
    assert "control" in out and "think_budget=16" in out and "tok/s" in out


def test_demo_testbed_part(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COTRT_CACHE", str(tmp_path))  # not built there: the demo says how
    cli._demo_testbed(5)
    assert "bench_testbed.py" in capsys.readouterr().out

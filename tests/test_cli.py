"""The command line on the embedded default model."""
from __future__ import annotations

import pytest

from cotrt import cli


@pytest.mark.slow
def test_generate_streams_and_reports(capsys):
    assert cli.main(["generate", "What is 2+3?", "--max-new-tokens", "12", "--max-len", "256"]) == 0
    out, err = capsys.readouterr()
    assert "5" in out
    assert "tokens in" in err and ("exit eos" in err or "exit max_new_tokens" in err)


@pytest.mark.slow
def test_generate_think_budget_forces_the_answer_cue(capsys):
    args = ["generate", "Explain step by step: what is 12 * 13?", "--max-new-tokens", "40",
            "--think-budget", "10", "--answer-budget", "8", "--max-len", "256"]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert "Final answer:" in out and "think end think_budget" in err


def test_think_budget_cut_reaches_the_params(capsys):
    args = cli.build_parser().parse_args(["generate", "hi", "--think-budget", "32", "--think-budget-cut", "step"])
    p = cli._params(args)
    assert p.think_budget == 32 and p.think_budget_cut == "step"
    assert cli._params(cli.build_parser().parse_args(["generate", "hi"])).think_budget_cut == "token"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "hi", "--think-budget-cut", "line"])
    assert "think-budget-cut" in capsys.readouterr().err


def test_generate_rejects_bad_arguments(capsys):
    assert cli.main(["generate", "hi", "--think-budget", "-3"]) == 2
    assert "think_budget" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_prints_the_table(capsys):
    assert cli.main(["demo", "--max-new-tokens", "24", "--max-len", "256", "--no-testbed"]) == 0
    out, err = capsys.readouterr()
    assert "control" in out and "think_budget=16" in out and "tok/s" in out
    assert "demo:" in err  # progress


def test_demo_testbed_part(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COTRT_CACHE", str(tmp_path))  # not built there: the demo says how
    cli._demo_testbed(5)
    assert "bench_testbed.py" in capsys.readouterr().out


# -- bad input: one line, exit 2, before the model loads where it can be -------------------------

def _no_model_load(monkeypatch):
    import cotrt.models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cotrt.models, "load_model", refuse)


def _one_line_exit_2(capsys, argv, match, loaded=False):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    if loaded:  # the model loaded (a prompt's length needs its tokenizer): its ready line first
        assert err.startswith("[cotrt] ready in ")
        err = err.split("\n", 1)[1]
    assert err.count("\n") == 1 and "Traceback" not in err and match in err, err
    assert err.startswith(f"cotrt {argv[0]}: ")


@pytest.mark.parametrize("argv,match", [
    (["generate", "hi", "--model", "/nonexistent/model"], "model: '/nonexistent/model' is not a local directory"),
    (["generate", "  "], "prompt: empty"),
    (["generate", "hi", "--max-len", "1"], "--max-len must be >= 2"),
    (["demo", "--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["demo", "--model", "/nonexistent/model"], "is not a local directory"),
    (["serve", "--model", "/nonexistent/model", "--port", "0"], "is not a local directory"),
    (["serve", "--port", "70000"], "--port must be in 0..65535, got 70000"),
    (["serve", "--host", "no-such-host.invalid"], "--host 'no-such-host.invalid': not an address"),
    (["serve", "--max-batch", "0"], "--max-batch must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, monkeypatch, argv, match):
    _no_model_load(monkeypatch)
    _one_line_exit_2(capsys, argv, match)


def test_serve_refuses_a_busy_port_before_loading(capsys, monkeypatch):
    import socket

    _no_model_load(monkeypatch)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _one_line_exit_2(capsys, ["serve", "--port", str(port)], f"127.0.0.1:{port}: cannot listen there")


def test_serve_names_the_extra_when_uvicorn_is_missing(capsys, monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else find(name, *a))
    _no_model_load(monkeypatch)
    _one_line_exit_2(capsys, ["serve"], "needs uvicorn: pip install 'cotrt[serve]'")


@pytest.mark.slow
def test_generate_prompt_over_max_len_is_one_line(capsys):
    _one_line_exit_2(capsys, ["generate", "word " * 200, "--max-len", "64"], "within max_len=64",
                     loaded=True)


def test_no_traceback_from_the_command(tmp_path):
    """The installed entry point (a subprocess, as a user runs it)."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "cotrt", "generate", "hi", "--model", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=120, env={**os.environ})
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_version_and_help(capsys):
    import argparse

    import cotrt

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"cotrt {cotrt.__version__}"
    ap = cli.build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for a in p._actions:
            if not isinstance(a, argparse._HelpAction):
                assert a.help, f"{name} {a.option_strings or a.dest}: no help"
    text = sub.choices["generate"].format_help()
    assert "(default: 256)" in text and "(default: default)" in text
    serve = sub.choices["serve"].format_help()
    assert "{critical,error,warning,info,debug,trace}" in serve and "(default: 8000)" in serve


# -- demo: progress on stderr, a --quick testbed marked as such -----------------------------------

@pytest.fixture(scope="module")
def tiny_rt(smol_tokenizer):
    import cotrt
    from cotrt.testing import tiny_model

    return cotrt.wrap(tiny_model("llama", len(smol_tokenizer), seed=4), smol_tokenizer, max_batch=2, max_len=128)


@pytest.mark.parametrize("with_tqdm", [True, False])
def test_demo_progress_on_stderr(capsys, monkeypatch, tiny_rt, with_tqdm):
    import sys

    import cotrt

    if not with_tqdm:
        monkeypatch.setitem(sys.modules, "tqdm", None)  # import fails: the plain counter
    convs = [[{"role": "user", "content": q}] for q in cli.DEMO_QUESTIONS[:3]]
    params = cotrt.Params(max_new_tokens=5, ignore_eos=True)
    bar = cli._Progress(3, "demo")
    outs = cli._chat(tiny_rt, convs, params, bar)
    bar.close()
    assert [o.token_ids for o in outs] == [o.token_ids for o in tiny_rt.chat(convs, params)]
    out, err = capsys.readouterr()
    assert out == "" and (bar.done, bar.tokens) == (3, 15)
    assert ("demo:" in err and "req" in err) if with_tqdm else "[cotrt] demo: 3/3 requests, 15 tokens" in err


def test_demo_marks_a_quick_testbed(capsys, monkeypatch, tmp_path):
    import json

    import cotrt.testbed.evaluate as ev

    seed0 = tmp_path / "testbed" / "seed0"  # bench_testbed.py's layout: one folder a training seed
    (seed0 / "base").mkdir(parents=True)
    (seed0 / "base" / "config.json").write_text("{}")
    monkeypatch.setenv("COTRT_CACHE", str(tmp_path))
    row = {"control": "plain", "setting": "-", "accuracy": 0.0, "think_tokens": 3.0, "wall_s": 0.1}
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: [row])
    for quick in (True, False):
        (seed0 / "train_log.json").write_text(json.dumps({"quick": quick}))
        cli._demo_testbed(5)
        out = capsys.readouterr().out
        assert ("a --quick build" in out) == quick and "plain" in out

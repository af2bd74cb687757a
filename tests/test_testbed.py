"""The testbed pipeline end to end, reduced: task, tokenizer, --quick training (seeded),
reload with from_pretrained, and generation through cotrt (budget, valve, latent, probes)."""
from __future__ import annotations

import math

import pytest
import torch

import cotrt
from cotrt.control.automaton import token_bytes
from cotrt.testbed import task


def _recompute(p: task.Problem) -> int:
    x = p.start
    for _var, _src, op, k, value in p.steps:
        x = x + k if op == "+" else x - k if op == "-" else x * k
        assert value == x
        assert 0 <= x <= task.MAX_VALUE
    return x


def test_problems_seeded_exact_and_held_out():
    a, b = task.held_out(0, 200), task.held_out(0, 200)
    assert a == b and len({p.question for p in a}) == 200
    assert task.held_out(1, 20) != a[:20]
    for p in a:
        assert _recompute(p) == p.answer
        assert task.MIN_STEPS <= len(p.steps) + 1 <= task.MAX_STEPS
    stream = task.train_stream(0, exclude=a)
    test_q = {p.question for p in a}
    assert not any(next(stream).question in test_q for _ in range(3000))


def test_chains_tokenize_and_parse():
    tok = task.build_tokenizer()
    task.check_tokenizer(tok)
    for p in task.held_out(0, 50):
        long, short = p.completion("long"), p.completion("short")
        assert task.parse_answer(long.split(task.END)[1]) == p.answer
        assert task.parse_answer(short.split(task.END)[1]) == p.answer
        assert long.startswith(p.first_pass()) and short.startswith(p.first_pass())
        assert long.count("Wait") == 2 and "Wait" not in short
        n_long = len(tok.encode(p.think("long"), add_special_tokens=False))
        n_short = len(tok.encode(p.think("short"), add_special_tokens=False))
        assert n_long > 2 * n_short  # the re-checks are most of a LONG chain
    # cotrt matches cues and markers on each token's bytes: they must be the text itself.
    tb = token_bytes(tok)
    for text in ("Wait", "\n", " ", task.THINK, task.END):
        (i,) = tok.encode(text, add_special_tokens=False)
        assert tb[i] == text.encode()
    assert task.parse_answer("no number") is None


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from cotrt.testbed import train

    out = tmp_path_factory.mktemp("testbed")
    torch.manual_seed(0)
    log = train.main(["--out", str(out), "--quick", "--seed", "0"])
    return out, log


def _mean(xs):
    return sum(xs) / len(xs)


def test_quick_training_loss_falls(quick):
    out, log = quick
    base = log["base"]["losses"]
    assert _mean(base[-10:]) < 0.6 * _mean(base[:5]), (base[:5], base[-10:])
    valve = log["valve"]["losses"]
    assert _mean(valve[-5:]) < _mean(valve[:3])  # the short chains' "</think>" is learned
    for losses in log["coconut"]["losses"].values():
        assert all(math.isfinite(x) and x < 10 for x in losses)  # finite through the fed-back states
    budget = log["budget"]["losses"]
    assert len(budget) == log["config"]["budget_steps"] and all(math.isfinite(x) for x in budget)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / "base" / name).exists() and (out / "budget" / name).exists()
    assert (out / "valve" / "adapter_config.json").exists()


@pytest.fixture(scope="module")
def runtime(quick):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = quick
    model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out / "base")
    rt = cotrt.wrap(model, tok, max_batch=4, max_len=512)
    assert rt.think_format.start == task.THINK and rt.think_format.end == task.END
    return rt


def test_reloaded_checkpoint_runs_through_cotrt(runtime):
    problems = task.held_out(0, 4)
    outs = runtime.generate([p.prompt for p in problems], cotrt.Params(max_new_tokens=96, think_budget=24))
    for o in outs:
        assert o.finish_reason in ("stop", "length") and o.error is None
        assert 0 < o.stats["think_sampled"] <= 24
        assert task.END in o.text  # thinking closed, by the model or by the budget
    # The quick model is undertrained; it has learned the format: an answer line parses.
    assert sum(task.parse_answer(o.answer) is not None for o in outs) >= 2, [o.text for o in outs]


def test_line_end_budget_ends_thinking_after_a_whole_line(runtime):
    """The testbed's soft_budget setting: past b think tokens, thinking ends at the next
    line's end (or naturally before), so the model answers from whole lines."""
    from cotrt.testbed.evaluate import settings

    s = next(s for s in settings(budgets=(8,)) if s.control.startswith("soft_budget"))
    problems = task.held_out(0, 4)
    outs = runtime.generate([p.prompt for p in problems], s.params)
    for o in outs:
        assert o.error is None and o.stats["think_end"] in ("soft_budget", "natural", "soft_budget_grace"), o.stats
        if o.stats["think_end"] == "soft_budget":
            assert o.stats["think_sampled"] >= 8 and o.text.split(task.END)[0].endswith("\n"), o.text
            assert o.stats["answer_tokens"] <= 8
    assert any(o.stats["think_end"] == "soft_budget" for o in outs), [o.stats for o in outs]


def test_exit_policies_probe_the_testbed_format(runtime):
    from cotrt.control.policies import DEER, EAT
    from cotrt.testbed.evaluate import PROFILE

    p = task.held_out(0, 1)[0]
    params = cotrt.Params(max_new_tokens=160, exit=[DEER(profile=PROFILE, cues=("Wait",)),
                                                    EAT(every=8, end_text=task.INDUCER + " ")])
    (o,) = runtime.generate([p.prompt], params)
    assert o.error is None
    assert o.stats["probe_tokens"] > 0  # the EAT probes at least ran


def test_valve_and_latent_load(quick, runtime):
    out, _ = quick
    problems = task.held_out(0, 2)
    rt = runtime
    rt.load_valve(str(out / "valve"), name="short")
    outs = rt.generate([p.prompt for p in problems], [cotrt.Params(max_new_tokens=64, valve={"short": a})
                                                       for a in (0.0, 1.0)])
    assert all(o.error is None for o in outs)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cotrt.loaders import load_coconut

    model, tok, latent = load_coconut(AutoModelForCausalLM.from_pretrained(out / "base"),
                                      AutoTokenizer.from_pretrained(out / "base"),
                                      str(out / "coconut" / "stage_2.pt"), steps=2)
    lrt = cotrt.wrap(model, tok, max_batch=2, max_len=512)
    outs = lrt.generate([p.prompt for p in problems], cotrt.Params(max_new_tokens=64, latent=latent))
    assert [o.stats["latent_steps"] for o in outs] == [2, 2]


def test_run_setting_grades_the_first_answer_line_and_averages():
    """The table's numbers from known outputs: the first "Answer:" line after thinking is
    graded (a model that goes on writing is not re-graded), means are per problem."""
    from cotrt.testbed import evaluate

    problems = task.held_out(0, 4)
    a = [p.answer for p in problems]
    answers = [f"Answer: {a[0]}\n", f"Answer: {a[1]}\nAnswer: {a[1] + 1}\n", f"Answer: {a[2] + 1}\nAnswer: {a[2]}",
               "no answer"]

    class Scripted:
        def generate(self, prompts, params):
            assert prompts == [p.prompt for p in problems]
            return [cotrt.Output(i, [], [], ans, "", ans, "stop",
                                 {"think_tokens": 10 * (i + 1), "probe_tokens": i, "answer_tokens": 5})
                    for i, ans in enumerate(answers)]

    r = evaluate.run_setting(Scripted(), problems, evaluate.Setting("plain", "-", cotrt.Params()))
    assert (r["accuracy"], r["think_tokens"], r["probe_tokens"], r["n"], r["errors"]) == (0.5, 25.0, 1.5, 4, 0)


def test_evaluate_writes_a_table(quick, monkeypatch):
    """evaluate() end to end on the quick model, on a reduced list of settings and tokens
    (the full list ran 302 s on a busy 2-core machine): every setting gives a row, a think
    budget holds, and the markdown has a line per row."""
    from cotrt.testbed import evaluate

    full = evaluate.settings
    monkeypatch.setattr(evaluate, "settings", lambda: full(budgets=(8,), alphas=(0.0, 1.0)))
    monkeypatch.setattr(evaluate, "MAX_NEW", 40)  # the quick model's chains run on to 256 tokens
    out, _ = quick
    rows = evaluate.evaluate(out, n=3, max_batch=3, only={"plain", "think_budget", "valve"}, log=False)
    assert [(r["control"], r["setting"]) for r in rows] == [("plain", "-"), ("think_budget", "8"),
                                                          ("valve", "alpha 0"), ("valve", "alpha 1")]
    assert all(r["errors"] == 0 and r["n"] == 3 for r in rows)
    by = {(r["control"], r["setting"]): r for r in rows}
    assert 0 < by["think_budget", "8"]["think_tokens"] <= 8 < by["plain", "-"]["think_tokens"]
    # alpha 0 is the base model exactly: the same answers and think tokens as plain.
    assert by["valve", "alpha 0"]["think_tokens"] == by["plain", "-"]["think_tokens"]
    assert by["valve", "alpha 0"]["accuracy"] == by["plain", "-"]["accuracy"]
    md = evaluate.markdown(rows, {"n": 3, "seed": 0, "max_batch": 3, "device": "cpu", "model": "quick"})
    assert md.count("\n| ") == len(rows) + 1


def test_evaluate_runs_budget_model_settings_on_the_budget_model(quick, tmp_path, monkeypatch):
    """Settings with model "budget" run on DIR/budget, the others on DIR/base: with the
    budget model swapped for a copy of the base, its rows equal the base's; without it,
    evaluate names the missing checkpoint before running anything."""
    import shutil

    from cotrt.testbed import evaluate

    monkeypatch.setattr(evaluate, "MAX_NEW", 40)
    out, _ = quick
    todo = [s for s in evaluate.settings(budgets=(8,), alphas=(), exits=[])
            if s.control in ("plain", "think_budget", "plain, budget model",
                             f"think_budget + answer_budget {evaluate.ANSWER_BUDGET}, budget model")]
    assert [s.model for s in todo] == ["base", "base", "budget", "budget"]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("control", "wall_s")}

    rows = evaluate.evaluate(out, n=3, max_batch=3, todo=todo, only={s.control for s in todo}, log=False)
    assert [r["control"] for r in rows] == [s.control for s in todo]
    assert rows[3]["think_tokens"] <= 8 and all(r["errors"] == 0 for r in rows)

    twin = tmp_path / "twin"
    shutil.copytree(out / "base", twin / "base")
    shutil.copytree(out / "base", twin / "budget")
    rows = evaluate.evaluate(twin, n=3, max_batch=3, todo=todo[:3], only={s.control for s in todo}, log=False)
    assert strip(rows[2]) == strip(rows[0])  # plain on a budget model that is the base
    shutil.rmtree(twin / "budget")
    with pytest.raises(FileNotFoundError, match="no budget model.*--budget-only"):
        evaluate.evaluate(twin, n=3, max_batch=3, todo=todo, only={s.control for s in todo}, log=False)


def test_svg_plot_gives_every_token_control_its_own_colour(tmp_path):
    """The token table's controls (13 with the budget model's) each get a colour of their own."""
    import re

    from cotrt.testbed.evaluate import settings, svg_plot

    controls = list(dict.fromkeys(s.control for s in settings()))
    assert len(controls) >= 13
    svg_plot([_row(c, "-", 0.5, 10 + i) for i, c in enumerate(controls)], tmp_path / "p.svg")
    colours = re.findall(r'<rect x="[^"]+" y="[^"]+" width="10" height="10" fill="(#[0-9a-f]{6})"/>',
                         (tmp_path / "p.svg").read_text())
    assert len(colours) == len(controls) == len(set(colours))


def test_svg_plot_draws_one_curve_per_control(tmp_path):
    import xml.etree.ElementTree as ET

    from cotrt.testbed.evaluate import svg_plot

    rows = [{"control": c, "think_tokens": t, "accuracy": a}
            for c, t, a in [("plain", 120, 0.99), ("budget", 16, 0.7), ("budget", 64, 0.5), ("valve", 44, 1.0)]]
    svg_plot(rows, tmp_path / "p.svg")
    root = ET.parse(tmp_path / "p.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f"{ns}polyline")
    assert len(lines) == 3 and len(root.findall(f"{ns}circle")) == 4
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert {"plain", "budget", "valve", "accuracy"} <= set(texts)


# -- issue 18: determinism, splits, truncated chains, MixChain styles, choosing and pooling ---------------


def test_training_is_deterministic(tmp_path):
    """Two runs from one seed give equal weights (base, valve and budget model); another seed
    does not; the budget model trained apart (``--budget-only``, from the saved base) is the
    one a whole run trains."""
    from safetensors.torch import load_file

    from cotrt.testbed import train

    def weights(seed, name, budget_only=False):
        out = tmp_path / name
        common = ["--out", str(out), "--quick", "--seed", str(seed), "--budget-steps", "3"]
        if budget_only:
            train.main(common + ["--steps", "6", "--valve-steps", "3", "--no-coconut", "--no-budget"])
            assert not (out / "budget").exists()
            train.main(common + ["--budget-only"])
        else:
            train.main(common + ["--steps", "6", "--valve-steps", "3", "--no-coconut"])
        return (load_file(out / "base" / "model.safetensors"),
                load_file(out / "valve" / "adapter_model.safetensors"),
                load_file(out / "budget" / "model.safetensors"))

    a, b, c, d = weights(5, "a"), weights(5, "b"), weights(6, "c"), weights(5, "d", budget_only=True)
    for other in (b, d):
        for x, y in zip(a, other):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not all(torch.equal(a[0][k], c[0][k]) for k in a[0])
    assert not all(torch.equal(a[0][k], a[2][k]) for k in a[0])  # the budget stage trained
    with pytest.raises(SystemExit, match="--seed 5, not 6"):
        train.main(["--out", str(tmp_path / "a"), "--quick", "--seed", "6", "--budget-only"])
    with pytest.raises(SystemExit, match="trained with --quick"):
        train.main(["--out", str(tmp_path / "a"), "--seed", "5", "--budget-only"])
    with pytest.raises(SystemExit, match="no trained base"):
        train.main(["--out", str(tmp_path / "none"), "--quick", "--budget-only"])


def test_budget_stage_cuts_mostly_inside_the_first_pass():
    """train_budget's rows: ~30% whole chains, ~50% cut inside the first pass, the rest at a
    uniform token of the LONG chain; the base's uniform cuts land in the first pass far
    less often (its first pass is about a third of the chain)."""
    import random

    from cotrt.testbed.train import budget_cuts, first_pass_tokens, long_think_tokens, uniform_cuts

    tok = task.build_tokenizer()
    problems = task.held_out(0, 200) * 10
    cut = budget_cuts(tok, 0.3, 0.5, random.Random(0))
    cuts = [(p, cut(p)) for p in problems]
    whole = sum(c is None for _, c in cuts) / len(cuts)
    early = sum(c is not None and c <= first_pass_tokens(p, tok) for p, c in cuts) / len(cuts)
    assert abs(whole - 0.3) < 0.03 and 0.5 < early < 0.6, (whole, early)
    assert all(c is None or 0 <= c <= long_think_tokens(p, tok) for p, c in cuts)
    base = uniform_cuts(tok, 0.3, random.Random(0))
    base_early = sum((c := base(p)) is not None and c <= first_pass_tokens(p, tok) for p in problems) / len(problems)
    assert base_early < 0.15, base_early
    assert all(uniform_cuts(tok, 0.0, random.Random(0))(p) is None for p in problems[:50])


def test_splits_are_disjoint_and_excluded_from_training():
    test, val = task.held_out(0, task.TEST_SIZE), task.validation(0, task.VAL_SIZE)
    assert len({p.question for p in val}) == task.VAL_SIZE
    assert not {p.question for p in test} & {p.question for p in val}
    banned = {p.question for p in task.excluded(0)}
    assert banned == {p.question for p in test + val}
    stream = task.train_stream(7, exclude=task.excluded(0))
    assert not any(next(stream).question in banned for _ in range(3000))


def test_mixchain_styles_shorten_in_order():
    tok = task.build_tokenizer()
    for p in task.held_out(0, 30):
        n = [len(tok.encode(p.think(s), add_special_tokens=False)) for s in task.STYLES]
        assert n == sorted(n, reverse=True) and len(set(n)) == 4, n
        for s in task.STYLES:
            assert task.parse_answer(p.completion(s).split(task.END)[1]) == p.answer
    assert set(task.VALVE_LEVELS) == set(task.STYLES[1:]) and max(task.VALVE_LEVELS.values()) == 1.0
    with pytest.raises(ValueError, match="style"):
        p.think("medium")


def test_truncated_chains_mask_the_forced_end():
    from cotrt.testbed.train import make_batch

    tok = task.build_tokenizer()
    p = task.held_out(0, 1)[0]
    n_think = len(tok.encode(p.think("long"), add_special_tokens=False))
    ids, at = p.truncated_completion(7, tok)
    assert tok.decode(ids) == tok.decode(tok.encode(p.think("long"), add_special_tokens=False)[:7]) + \
        f"{task.END}\nAnswer: {p.answer}\n"
    assert tok.convert_ids_to_tokens(ids[at]) == task.END
    with pytest.raises(ValueError, match="cut"):
        p.truncated_completion(n_think + 1, tok)
    x, labels, attn = make_batch([p, p], tok, "long", cuts=[None, 7])
    n_prompt = len(tok.encode(p.prompt, add_special_tokens=False))
    end_id = tok.convert_tokens_to_ids(task.END)
    assert x[1, n_prompt + 7] == end_id and labels[1, n_prompt + 7] == -100  # forced: no target
    assert labels[1, n_prompt + 8] == x[1, n_prompt + 8]  # the answer after it is one
    assert (labels[0] == end_id).sum() == 1  # a whole chain's own end marker is learned
    assert labels[1, n_prompt - 1] == -100 and int(attn[1].sum()) == n_prompt + len(ids) + 1


def _row(control, setting, acc, think, n=200):
    return {"control": control, "setting": setting, "n": n, "accuracy": acc, "think_tokens": think,
            "probe_tokens": 0.0, "answer_tokens": 8.0, "latent_steps": 0.0, "wall_s": 1.0}


def test_aggregate_pools_seeds_with_spread_and_binomial_error():
    from cotrt.testbed.evaluate import aggregate

    (r,) = aggregate([_row("plain", "-", a, t) for a, t in ((0.9, 100), (0.8, 110), (1.0, 120))])
    assert r["accuracy"] == pytest.approx(0.9) and r["think_tokens"] == pytest.approx(110)
    assert r["accuracy_sd"] == pytest.approx(0.1) and r["think_sd"] == pytest.approx(10)
    assert r["binomial_se"] == pytest.approx(math.sqrt(0.9 * 0.1 / 200)) and r["per_seed"] == [0.9, 0.8, 1.0]
    with pytest.raises(ValueError, match="sizes"):
        aggregate([_row("plain", "-", 0.9, 100), _row("plain", "-", 0.9, 100, n=50)])


def test_choose_takes_the_cheapest_setting_that_holds_accuracy():
    from cotrt.testbed.evaluate import choose

    rows = []
    for seed_acc in (0.99, 0.97):  # plain: mean 0.98
        rows += [_row("plain", "-", seed_acc, 120), _row("DEER", "t 0.9", seed_acc - 0.05, 40),
                 _row("DEER", "t 0.95", seed_acc - 0.005, 50), _row("DEER", "t 0.99", seed_acc, 80),
                 _row("EAT", "e 4", 0.5, 30), _row("EAT", "e 8", 0.6, 60)]
    assert choose(rows) == {"DEER": "t 0.95", "EAT": "e 8"}  # EAT: none holds, the most accurate
    assert choose(rows, tolerance=0.06)["DEER"] == "t 0.9"
    with pytest.raises(ValueError, match="plain"):
        choose([r for r in rows if r["control"] != "plain"])
    with pytest.raises(ValueError, match="tolerance"):
        choose(rows, tolerance=-0.1)


def test_make_meta_pads_a_short_row_past_the_longest_end(runtime):
    """A 1-token row at the latest position beside a multi-token row (a DEER probe start
    grouped with another row's step) pads past every row's end; its padded positions must
    not index pages beyond the table (this raised "index out of bounds" and ended DEER rows
    with finish_reason "error" on the testbed)."""
    runner = runtime.runner
    ps = runner.page_size
    tables = [[1, 2, 3, 4], [5, 6]]
    meta = runner.make_meta(tables, [1, 4], starts=[4 * ps - 1, ps])  # row 0 pads to 4 * ps + 2
    assert meta is not None
    p = task.held_out(0, 8)
    outs = runtime.generate([q.prompt for q in p], cotrt.Params(max_new_tokens=80, exit=evaluate_deer()))
    assert all(o.error is None for o in outs), [o.error for o in outs]


def evaluate_deer():
    from cotrt.testbed.evaluate import deer

    return deer(0.5).params.exit


def test_exit_grid_settings_carry_their_knobs():
    """Every grid label is distinct (choose and the caches key rows by it) and the EAT and
    Dynasor labels match the policy each setting runs, warm-up and EMA timescale included."""
    from cotrt.control.policies import EAT, Dynasor
    from cotrt.testbed.evaluate import exit_grid

    grid = exit_grid()
    labels = [(s.control, s.setting) for s in grid]
    assert len(set(labels)) == len(labels)
    for s in grid:
        (pol,) = s.params.exit
        if isinstance(pol, EAT):
            assert s.setting == (f"every {pol.every}, alpha {pol.alpha:g}, threshold {pol.threshold:g}, "
                                 f"warm-up {pol.min_probes}")
        elif isinstance(pol, Dynasor):
            assert s.setting == f"every {pol.every}, k {pol.k}"
    # Some EAT setting's warm-up ends inside a ~110-token chain, past its ~40-token first pass
    # (the defaults, every 32 and 4 probes, end it at 128 tokens).
    eats = [s.params.exit[0] for s in grid if s.control == "EAT"]
    assert min(e.every * e.min_probes for e in eats) <= 64


def test_bench_cache_runs_only_the_missing_settings(tmp_path, monkeypatch):
    """bench_testbed.run_cached reuses cached rows by (control, setting) and evaluates only
    the settings it lacks; another split or size is not reused."""
    import importlib.util
    from pathlib import Path

    from cotrt.testbed import evaluate

    spec = importlib.util.spec_from_file_location(
        "bench_testbed", Path(__file__).resolve().parents[1] / "bench" / "bench_testbed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []

    def fake_evaluate(path, n, split, todo, only):
        calls.append([s.setting for s in todo])
        return [_row(s.control, s.setting, 0.5, 10, n=n) for s in todo]

    monkeypatch.setattr(evaluate, "evaluate", fake_evaluate)
    a, b, c = evaluate.deer(0.9), evaluate.deer(0.95), evaluate.dynasor(16, 4)
    rows = bench.run_cached(tmp_path, "c.json", [a, b], "validation", 200, reeval=False)
    assert [r["setting"] for r in rows] == [a.setting, b.setting] and calls == [[a.setting, b.setting]]
    rows = bench.run_cached(tmp_path, "c.json", [c, a], "validation", 200, reeval=False)
    assert [r["setting"] for r in rows] == [c.setting, a.setting] and calls[-1] == [c.setting]
    bench.run_cached(tmp_path, "c.json", [a], "validation", 200, reeval=False)
    assert len(calls) == 2  # all cached: nothing run
    bench.run_cached(tmp_path, "c.json", [a], "test", 200, reeval=False)
    bench.run_cached(tmp_path, "c.json", [a], "test", 200, reeval=True)
    assert calls[-2:] == [[a.setting], [a.setting]]


def test_bench_trains_only_what_a_seed_lacks(tmp_path, monkeypatch):
    """bench_testbed.ensure_trained: a seed with no models is trained whole; one trained
    before the budget model existed gets the budget model alone; a complete one nothing."""
    import importlib.util
    from pathlib import Path

    from cotrt.testbed import train

    spec = importlib.util.spec_from_file_location(
        "bench_testbed", Path(__file__).resolve().parents[1] / "bench" / "bench_testbed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    monkeypatch.setattr(train, "main", lambda argv: calls.append(argv))
    d = tmp_path / "seed1"
    bench.ensure_trained(d, 1, retrain=False, coconut=False)
    assert calls.pop() == ["--out", str(d), "--seed", "1", "--no-coconut"]
    (d / "valve").mkdir(parents=True)
    (d / "valve" / "adapter_config.json").write_text("{}")
    bench.ensure_trained(d, 1, retrain=False, coconut=False)
    assert calls.pop() == ["--out", str(d), "--seed", "1", "--budget-only"]
    (d / "budget").mkdir()
    (d / "budget" / "config.json").write_text("{}")
    bench.ensure_trained(d, 1, retrain=False, coconut=True)
    assert calls == []
    bench.ensure_trained(d, 1, retrain=True, coconut=True)
    assert calls.pop() == ["--out", str(d), "--seed", "1"]

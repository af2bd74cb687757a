"""The testbed end to end: train the tiny models of each seed if needed, choose the exit
settings on the validation split, then evaluate every control on the held-out split.

    python bench/bench_testbed.py [--models DIR] [--seeds 3] [--n 200] [--n-val 200] [--retrain]

Models go to ``DIR/seed{S}`` (``DIR`` defaults to ``$COTRT_CACHE/testbed``, i.e.
``~/.cache/cotrt/testbed``), trained by ``python -m cotrt.testbed.train --out DIR/seed{S}
--seed S --no-coconut`` when absent (``--coconut`` keeps the arithmetic Coconut stages; a
seed trained before the budget model existed gets that alone, ``--budget-only``).
Then, for every seed: DEER, Dynasor and EAT over ``evaluate.exit_grid()`` and plain decoding
on the validation split; per policy the setting with the fewest think tokens whose mean
accuracy over seeds is within ``--tolerance`` of plain's (``evaluate.choose``); and every
control of ``evaluate.settings`` with those settings on the held-out split. Writes the
table (means, spread over seeds, binomial error) to bench/testbed_results.md, the plot to
bench/testbed_results.svg and the rows to bench/testbed_results.json. Per-seed evaluation
rows are cached beside each model, per setting (``--reeval`` redoes them).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cotrt.models import cache_dir  # noqa: E402
from cotrt.testbed import evaluate, train  # noqa: E402


def seed_dirs(models: Path, seeds) -> dict:
    return {s: models / f"seed{s}" for s in seeds}


def ensure_trained(path: Path, seed: int, retrain: bool, coconut: bool) -> None:
    """Train what ``path`` lacks: everything (or with ``retrain``), or, for a seed trained
    before the budget model existed, the budget model alone from its saved base."""
    if retrain or not (path / "valve" / "adapter_config.json").exists():
        train.main(["--out", str(path), "--seed", str(seed)] + ([] if coconut else ["--no-coconut"]))
    elif not (path / "budget" / "config.json").exists():
        train.main(["--out", str(path), "--seed", str(seed), "--budget-only"])


def run_cached(path: Path, name: str, todo, split: str, n: int, reeval: bool, latent: bool = False) -> list[dict]:
    """``evaluate.evaluate`` of ``todo`` on one seed's models, cached in ``path/name`` by
    (control, setting): rows cached on the same split and size are reused and only the
    settings missing are run (a new exit choice re-runs three settings, not all of them)."""
    cache = path / name
    have = {}
    if cache.exists() and not reeval:
        got = json.loads(cache.read_text())
        if got.get("split") == split and got.get("n") == n:
            have = {(r["control"], r["setting"]): r for r in got["rows"]}
    missing = [s for s in todo if (s.control, s.setting) not in have]
    want_latent = latent and (path / "coconut").exists() and not any(c.startswith("latent") for c, _ in have)
    if missing or want_latent:
        only = {s.control for s in missing} | ({"latent"} if want_latent else set())
        for r in evaluate.evaluate(path, n=n, split=split, todo=missing, only=only):
            have[r["control"], r["setting"]] = r
        cache.write_text(json.dumps({"split": split, "n": n, "rows": list(have.values())}, indent=1))
    rows = [have[s.control, s.setting] for s in todo]
    return rows + [r for k, r in have.items() if latent and k[0].startswith("latent")]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=cache_dir() / "testbed")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 (default 3)")
    ap.add_argument("--n", type=int, default=200, help="held-out (test) problems")
    ap.add_argument("--n-val", type=int, default=200, help="validation problems (exit settings are chosen here)")
    ap.add_argument("--tolerance", type=float, default=0.01,
                    help="accuracy an exit setting may lose against plain on validation (default 0.01)")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--reeval", action="store_true", help="ignore cached evaluation rows")
    ap.add_argument("--coconut", action="store_true", help="also train and evaluate the arithmetic Coconut stages")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("testbed_results.md"))
    args = ap.parse_args(argv)
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    torch.set_num_threads(1)
    dirs = seed_dirs(args.models, range(args.seeds))
    for s, d in dirs.items():
        ensure_trained(d, s, args.retrain, args.coconut)

    grid = [evaluate.settings(budgets=(), alphas=(), exits=[])[0]] + evaluate.exit_grid()  # plain + grid
    val_rows = []
    for s, d in dirs.items():
        for r in run_cached(d, "eval_validation_grid.json", grid, "validation", args.n_val, args.reeval):
            val_rows.append({**r, "train_seed": s})
    chosen = evaluate.choose(val_rows, args.tolerance)
    by_label = {(g.control, g.setting): g for g in grid}
    exits = [by_label[c, chosen[c]] for c in evaluate.EXIT_CONTROLS if c in chosen]

    todo = evaluate.settings(exits=exits)
    test_rows = []
    for s, d in dirs.items():
        for r in run_cached(d, "eval_test.json", todo, "test", args.n, args.reeval, latent=args.coconut):
            test_rows.append({**r, "train_seed": s})

    agg = evaluate.aggregate(test_rows)
    val_agg = evaluate.aggregate(val_rows)
    logs = {s: json.loads((d / "train_log.json").read_text()) for s, d in dirs.items()}
    cpu = {s: round(log.get("cpu_seconds", 0)) for s, log in logs.items()}
    meta = {"n": args.n, "seed": 0, "max_batch": 32, "device": evaluate.device_line(),
            "model": f"{evaluate.model_line(dirs[0])}; training seeds {list(dirs)}, training CPU s per seed {cpu}"}
    text = evaluate.markdown(agg, meta)
    text += (f"\nExit settings chosen on the validation split ({args.n_val} problems, split seed 0, disjoint from "
             f"training and test): per policy the fewest mean think tokens within {args.tolerance:g} of plain's "
             f"mean accuracy. Validation rows (mean over seeds):\n\n")
    text += "\n".join(evaluate.markdown(val_agg, meta).splitlines()[5:]) + "\n"
    text += "\nChosen: " + "; ".join(f"{c} {chosen[c]}" for c in evaluate.EXIT_CONTROLS if c in chosen) + "\n"
    args.out.write_text(text)
    evaluate.svg_plot(agg, args.out.with_suffix(".svg"))
    result = {"meta": meta, "chosen": chosen, "test": agg, "validation": val_agg,
              "per_seed_test": test_rows, "train_cpu_seconds": cpu}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(text)
    return result


if __name__ == "__main__":
    main()

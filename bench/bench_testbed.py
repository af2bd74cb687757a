"""The testbed end to end: train the tiny models if needed, then evaluate every control.

    python bench/bench_testbed.py [--models DIR] [--n 200] [--retrain]

Models go to ``$COTRT_CACHE/testbed`` (default ``~/.cache/cotrt/testbed``), trained by
``python -m cotrt.testbed.train`` from seed 0 when absent; the table goes to
bench/testbed_results.md (and a plot beside it when matplotlib is installed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cotrt.models import cache_dir  # noqa: E402
from cotrt.testbed import evaluate, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=cache_dir() / "testbed")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("testbed_results.md"))
    args = ap.parse_args()
    if args.retrain or not (args.models / "valve" / "adapter_config.json").exists():
        train.main(["--out", str(args.models), "--seed", str(args.seed)])
    evaluate.main(["--models", str(args.models), "--n", str(args.n), "--seed", str(args.seed), "--out", str(args.out)])


if __name__ == "__main__":
    main()

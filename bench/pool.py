#!/usr/bin/env python3
"""Pool the cycles of several `interleaved.py` runs: the request-metrics on/off ratios.

    .venv/bin/python bench/pool.py bench/results/A-interleaved.json [B ...]

One run's median settles within the run but not across runs (each starts its servers
afresh; see interleaved.py --restart), so a claim about the code pools the cycles of
every run made of it. For each ratio: each run's median, then the pooled median of all
cycles with a 95% bootstrap interval that resamples whole runs and then cycles within
them, so a run's shared luck is not counted as independent evidence.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from typing import Any

Cycle = dict[str, dict[str, float]]
RATIOS = {  # name: the figure of one cycle, from its servers' results
    "rps on / off": lambda c: c["on"]["rps"] / c["off"]["rps"],
    "throughput at equal CPU, on / off": lambda c: c["off"]["cpu_us"] / c["on"]["cpu_us"],
    "cpu_us on / uvicorn": lambda c: c["on"]["cpu_us"] / c["uvicorn"]["cpu_us"],
}


def bootstrap(runs: list[list[float]], rounds: int = 2000, seed: int = 6) -> tuple[float, float]:
    """95% interval of the pooled median, resampling runs, then cycles within each."""
    rng = random.Random(seed)
    medians = []
    for _ in range(rounds):
        drawn = [rng.choice(runs) for _ in runs]
        medians.append(statistics.median(x for run in drawn for x in rng.choices(run, k=len(run))))
    medians.sort()
    return medians[int(0.025 * rounds)], medians[int(0.975 * rounds) - 1]


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    runs: list[tuple[str, list[Cycle]]] = []
    for path in paths:
        with open(path) as f:
            data: dict[str, Any] = json.load(f)
        if data["options"].get("compare", "metrics") != "metrics":
            print(f"skipped {path}: not a request-metrics run", file=sys.stderr)
            continue
        runs.append((data["command"], data["result"]["cycles"]))
    print(f"{len(runs)} runs, {sum(len(c) for _, c in runs)} cycles")
    for name, ratio in RATIOS.items():
        per_run = [[ratio(c) for c in cycles] for _, cycles in runs]
        each = ", ".join(f"{statistics.median(r):.3f}" for r in per_run)
        pooled = statistics.median(x for r in per_run for x in r)
        low, high = bootstrap(per_run)
        print(f"{name}: pooled {pooled:.3f} [95% {low:.3f}-{high:.3f}]; runs {each}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

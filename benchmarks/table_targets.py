"""Check the calibration issue's targets on a results table (``results.csv`` of ``bayes-polar table``).

Per in-distribution column, on means over seeds (ECE in %, NLL in nats, accuracy as a fraction); a check
between two methods averages both over the seeds they share, so that a grid stopped part way compares
like with like:

- PoLAR-VBLL ECE ≤ 0.5 × lora-mle's and ≤ lora-laplace's; NLL ≤ both; accuracy ≥ lora-mle's − 0.01;
- PoLAR-VBLL's posterior predictive NLL < its own point prediction's (the guide mean);
- PoLAR-MLE accuracy ≥ LoRA-MLE's, PoLAR-VBLL's ≥ LoRA-VBLL's;
- OpenBookQA: every trained method at or above chance (0.25);
- temperature scaling side by side (ECE, NLL): reported, not a target.

A column where a method has no finished cell is ``null`` (not met, not missed). Writes JSON next to
the CSV (``--out``) and prints one line per check.

    python benchmarks/table_targets.py benchmarks/results/smollm2_table/results.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

CHANCE = {"openbookqa": 0.25}


def column_values(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict[int, float]]]:
    """``(method, task) -> {metric: {seed: value}}`` for the in-distribution rows."""
    values = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row["kind"] != "id":
            continue
        for metric in ("acc", "ece", "nll", "point_nll"):
            if row.get(metric) not in (None, ""):
                values[row["method"], row["eval_task"]][metric][int(row["seed"])] = float(row[metric])
    return values


def checks(values: dict, tasks: list[str]) -> list[dict]:
    def per_seed(task, method, metric):
        return values.get((method, task), {}).get(metric, {})

    def check(name, task, left, op, right, scale=1.0, slack=0.0):
        """``left`` and ``right`` are ``(method, metric)`` or a constant; means over their shared seeds."""
        left_seeds = per_seed(task, *left)
        right_seeds = per_seed(task, *right) if isinstance(right, tuple) else None
        seeds = sorted(left_seeds.keys() & right_seeds.keys() if right_seeds is not None else left_seeds)
        if not seeds:
            return {"check": name, "task": task, "value": None, "reference": None, "seeds": [], "met": None}
        lv = statistics.mean(left_seeds[s] for s in seeds)
        rv = statistics.mean(right_seeds[s] for s in seeds) if right_seeds is not None else right
        met = lv <= scale * rv + slack if op == "<=" else lv >= scale * rv - slack if op == ">=" else lv < rv
        return {"check": name, "task": task, "value": lv, "reference": rv, "seeds": seeds, "met": met}

    out = []
    for task in tasks:
        pv = lambda m: ("polar-vbll", m)  # noqa: E731
        out += [
            check("polar-vbll ECE <= 0.5 x lora-mle", task, pv("ece"), "<=", ("lora-mle", "ece"), 0.5),
            check("polar-vbll ECE <= lora-laplace", task, pv("ece"), "<=", ("lora-laplace", "ece")),
            check("polar-vbll NLL <= lora-mle", task, pv("nll"), "<=", ("lora-mle", "nll")),
            check("polar-vbll NLL <= lora-laplace", task, pv("nll"), "<=", ("lora-laplace", "nll")),
            check("polar-vbll ACC within 1 point of lora-mle", task, pv("acc"), ">=", ("lora-mle", "acc"), slack=0.01),
            check("polar-vbll predictive NLL < its point prediction", task, pv("nll"), "<", pv("point_nll")),
            check("polar-mle ACC >= lora-mle", task, ("polar-mle", "acc"), ">=", ("lora-mle", "acc")),
            check("polar-vbll ACC >= lora-vbll", task, pv("acc"), ">=", ("lora-vbll", "acc")),
        ]
        if task in CHANCE:
            out += [check(f"{method} ACC >= chance", task, (method, "acc"), ">=", CHANCE[task])
                    for method, t in sorted(values) if t == task]
    return out


def seed_means(values: dict, method: str, task: str) -> dict:
    metrics = values[method, task]
    return {**{m: statistics.mean(metrics[m].values()) for m in ("acc", "ece", "nll") if metrics.get(m)},
            "seeds": sorted(metrics["acc"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results.csv written by bayes-polar table")
    parser.add_argument("--out", help="JSON output (default: targets.json next to the CSV)")
    args = parser.parse_args(argv)
    path = Path(args.results)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    values = column_values(rows)
    tasks = list(dict.fromkeys(r["eval_task"] for r in rows if r["kind"] == "id"))
    results = checks(values, tasks)
    side = {task: {m: seed_means(values, m, task) for m in ("polar-vbll", "temperature-scaling") if (m, task) in values}
            for task in tasks}
    summary = {"results": str(path), "checks": results, "met": sum(r["met"] is True for r in results),
               "missed": sum(r["met"] is False for r in results), "open": sum(r["met"] is None for r in results),
               "polar_vbll_vs_temperature_scaling": side}
    out = Path(args.out) if args.out else path.with_name("targets.json")
    out.write_text(json.dumps(summary, indent=2) + "\n")
    for r in results:
        mark = {True: "met   ", False: "MISSED", None: "open  "}[r["met"]]
        fmt = lambda x: "–" if x is None else f"{x:.4g}"  # noqa: E731
        seeds = ",".join(map(str, r["seeds"])) or "-"
        print(f"{mark} {r['task']:<14} {r['check']}: {fmt(r['value'])} vs {fmt(r['reference'])} (seeds {seeds})")
    print(f"{summary['met']} met, {summary['missed']} missed, {summary['open']} open -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

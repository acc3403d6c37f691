"""Check the calibration issue's targets on a results table (``results.csv`` of ``bayes-polar table``).

Per in-distribution column, on means over seeds (ECE in %, NLL in nats, accuracy as a fraction):

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


def column_means(rows: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """``(method, task) -> {metric: mean over seeds, "seeds": n}`` for the in-distribution rows."""
    values = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["kind"] != "id":
            continue
        for metric in ("acc", "ece", "nll", "point_nll"):
            if row.get(metric) not in (None, ""):
                values[row["method"], row["eval_task"]][metric].append(float(row[metric]))
    return {key: {**{m: statistics.mean(v) for m, v in metrics.items()}, "seeds": len(metrics["acc"])}
            for key, metrics in values.items()}


def checks(means: dict, tasks: list[str]) -> list[dict]:
    def value(method, task, metric):
        return means.get((method, task), {}).get(metric)

    def check(name, task, left, op, right, scale=1.0, slack=0.0):
        met = None if left is None or right is None else (
            left <= scale * right + slack if op == "<=" else left >= scale * right - slack if op == ">=" else left < right)
        return {"check": name, "task": task, "value": left, "reference": right, "met": met}

    out = []
    for task in tasks:
        pv = lambda m: value("polar-vbll", task, m)  # noqa: E731
        out += [
            check("polar-vbll ECE <= 0.5 x lora-mle", task, pv("ece"), "<=", value("lora-mle", task, "ece"), 0.5),
            check("polar-vbll ECE <= lora-laplace", task, pv("ece"), "<=", value("lora-laplace", task, "ece")),
            check("polar-vbll NLL <= lora-mle", task, pv("nll"), "<=", value("lora-mle", task, "nll")),
            check("polar-vbll NLL <= lora-laplace", task, pv("nll"), "<=", value("lora-laplace", task, "nll")),
            check("polar-vbll ACC within 1 point of lora-mle", task, pv("acc"), ">=", value("lora-mle", task, "acc"),
                  slack=0.01),
            check("polar-vbll predictive NLL < its point prediction", task, pv("nll"), "<", pv("point_nll")),
            check("polar-mle ACC >= lora-mle", task, value("polar-mle", task, "acc"), ">=",
                  value("lora-mle", task, "acc")),
            check("polar-vbll ACC >= lora-vbll", task, pv("acc"), ">=", value("lora-vbll", task, "acc")),
        ]
        if task in CHANCE:
            out += [check(f"{method} ACC >= chance", task, value(method, task, "acc"), ">=", CHANCE[task])
                    for method, t in sorted(means) if t == task]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results.csv written by bayes-polar table")
    parser.add_argument("--out", help="JSON output (default: targets.json next to the CSV)")
    args = parser.parse_args(argv)
    path = Path(args.results)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    means = column_means(rows)
    tasks = list(dict.fromkeys(r["eval_task"] for r in rows if r["kind"] == "id"))
    results = checks(means, tasks)
    side = {task: {m: {k: means[m, task].get(k) for k in ("acc", "ece", "nll", "seeds")}
                   for m in ("polar-vbll", "temperature-scaling") if (m, task) in means} for task in tasks}
    summary = {"results": str(path), "checks": results, "met": sum(r["met"] is True for r in results),
               "missed": sum(r["met"] is False for r in results), "open": sum(r["met"] is None for r in results),
               "polar_vbll_vs_temperature_scaling": side}
    out = Path(args.out) if args.out else path.with_name("targets.json")
    out.write_text(json.dumps(summary, indent=2) + "\n")
    for r in results:
        mark = {True: "met   ", False: "MISSED", None: "open  "}[r["met"]]
        fmt = lambda x: "–" if x is None else f"{x:.4g}"  # noqa: E731
        print(f"{mark} {r['task']:<14} {r['check']}: {fmt(r['value'])} vs {fmt(r['reference'])}")
    print(f"{summary['met']} met, {summary['missed']} missed, {summary['open']} open -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

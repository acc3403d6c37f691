"""Collect every ratio of the committed benchmark results into one summary JSON.

Reads ``results/<name>.json`` (the SmolLM2 runs, and head_cost.json, which needs no backbone;
``*-<model>.json`` of other models are skipped unless ``--model`` names them), keeps each ratio with its target, ``met`` (recomputed from value and target) and the command that measured it, and
writes ``results/summary.json``. Nothing is re-measured: run the scripts first.

    python benchmarks/summary.py
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def target_met(entry: dict) -> bool | None:
    """``value`` against ``target`` ("<= t" / ">= t"), recomputed: a stored ``met`` is never trusted."""
    target = entry.get("target")
    if target is None:
        return None
    sense, _, bound = target.partition(" ")
    if sense not in ("<=", ">="):
        raise ValueError(f"ratio {entry['name']!r}: target {target!r} is not '<= t' or '>= t'")
    value, bound = float(entry["value"]), float(bound)
    return value <= bound if sense == "<=" else value >= bound


def collect(results: Path, model: str = "smollm2-135m") -> dict:
    """``{"model", "ratios": [...], "targets_met", "targets_missed"}`` from the benchmark JSON files."""
    suffix = "" if model == "smollm2-135m" else f"-{model}"
    ratios = []
    for path in sorted(results.glob(f"*{suffix}.json")):
        if path.stem.startswith("summary") or (not suffix and "-" in path.stem):
            continue
        result = json.loads(path.read_text())
        if "ratios" not in result:
            continue  # e.g. stable_rank.json: a study, not a timing
        for entry in result["ratios"]:
            ratios.append({"benchmark": result["benchmark"], **entry, "met": target_met(entry),
                           "command": result["command"], "model": result["model"],
                           "load_average": result["machine"].get("load_average")})
    targeted = [r for r in ratios if r["met"] is not None]
    return {"model": model, "ratios": ratios,
            "targets_met": sum(r["met"] for r in targeted),
            "targets_missed": [r["name"] for r in targeted if not r["met"]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the benchmark JSON files")
    parser.add_argument("--model", default="smollm2-135m", help="whose results to collect")
    args = parser.parse_args(argv)
    summary = collect(args.results, args.model)
    if not summary["ratios"]:
        raise SystemExit(f"No benchmark results for {args.model} in {args.results}: run the scripts first")
    suffix = "" if args.model == "smollm2-135m" else f"-{args.model}"
    path = args.results / f"summary{suffix}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    targeted = summary["targets_met"] + len(summary["targets_missed"])
    missed = ", ".join(summary["targets_missed"]) or "none"
    print(f"summary [{args.model}]: {len(summary['ratios'])} ratios, {summary['targets_met']}/{targeted} targets met "
          f"(missed: {missed}) -> {path.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

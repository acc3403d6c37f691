"""The speed and memory benchmarks parse their options and stop at once when CUDA is absent."""
import importlib

import pytest
import torch

from conftest import REPO

SCRIPTS = ["train_step", "optimizer_step", "predictive", "memory", "head_cost", "prefix_cache", "inference_cost",
           "frozen_pass", "bf16_step", "gpu"]
TINY_RUN = {"frozen_pass": ["--questions", "24"], "bf16_step": ["--fill-questions", "8", "--fill-repeats", "1"],
            "gpu": ["--device", "cpu", "--tiny", "--warmup", "1", "--steps", "1"]}  # gpu.py defaults to CUDA


@pytest.fixture
def benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return lambda name: importlib.import_module(name)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(benchmark, name, capsys):
    with pytest.raises(SystemExit) as done:
        benchmark(name).main(["--help"])
    assert done.value.code == 0
    assert "--device" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: the GPU variant would run")
@pytest.mark.parametrize("name", SCRIPTS)
def test_gpu_variant_fails_fast_without_cuda(benchmark, name):
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as done:
        benchmark(name).main(["--model", "random-llama-1b", "--device", "cuda", "--dtype", "bfloat16"])
    assert "needs a CUDA GPU" in str(done.value.code)
    assert torch.get_num_threads() == threads, "nothing ran before the check"


def test_summary_collects_every_ratio_with_target_and_command(benchmark, tmp_path):
    import json

    timing = {"benchmark": "train_step", "command": "python benchmarks/train_step.py", "model": "smollm2-135m",
              "machine": {"load_average": [1.0]},
              "ratios": [{"name": "a", "value": 1.2, "target": "<= 1.1", "met": True},  # stale: recomputed
                         {"name": "b", "value": 3.0, "target": None, "met": None},
                         {"name": "c", "value": 9.0, "target": ">= 8", "met": False}]}
    (tmp_path / "train_step.json").write_text(json.dumps(timing))
    (tmp_path / "train_step-tiny-random-llama.json").write_text(json.dumps({**timing, "model": "tiny-random-llama"}))
    (tmp_path / "stable_rank.json").write_text(json.dumps({"benchmark": "stable_rank", "results": {}}))
    assert benchmark("summary").main(["--results", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["name"] for r in summary["ratios"]] == ["a", "b", "c"]
    assert [r["met"] for r in summary["ratios"]] == [False, None, True]
    assert summary["targets_met"] == 1 and summary["targets_missed"] == ["a"]
    assert summary["ratios"][0]["command"] == "python benchmarks/train_step.py"


def test_committed_summary_reports_every_issue_target(benchmark):
    """The issue's four targets are all in the committed summary, with their commands."""
    import json

    summary = json.loads((REPO / "benchmarks" / "results" / "summary.json").read_text())
    targeted = {r["name"] for r in summary["ratios"] if r["target"]}
    assert {"polar_vbll_over_lora_mle_train_step", "polar_vbll_S100_over_deterministic",
            "mc_dropout_N10_over_polar_vbll_S100", "polar_vbll_over_lora_mle_peak_rss"} <= targeted
    assert all(r["command"].startswith("python benchmarks/") for r in summary["ratios"])


@pytest.mark.integration
@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_runs_on_the_tiny_llama_and_writes_finite_json(benchmark, name, tmp_path, data_dir):
    """Each script runs end to end (one repeat) so its committed results can be regenerated."""
    import json
    import math

    out = tmp_path / f"{name}.json"
    benchmark(name).main(["--repeats", "1", "--out", str(out), *TINY_RUN.get(name, [])])
    result = json.loads(out.read_text())
    assert result["benchmark"] == name and result["model"] == "tiny-random-llama"
    assert result["ratios"], "every timing benchmark reports at least one ratio"
    for entry in result["ratios"]:
        assert math.isfinite(entry["value"]), entry  # head_cost reports exponents, which may be negative


@pytest.mark.integration
def test_stable_rank_study_runs_on_the_tiny_llama(benchmark, tmp_path, data_dir):
    import json

    out = tmp_path / "stable_rank.json"
    assert benchmark("stable_rank").main(["--backbone", "tiny-random-llama", "--steps", "2", "--top-blocks", "1",
                                          "--data-dir", str(data_dir), "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) >= {"polar", "lora"}
    assert all(r["mean_stable_rank"] >= 1.0 for r in results.values())


def test_table_targets_compares_means_over_shared_seeds_and_leaves_missing_cells_open(benchmark, tmp_path):
    import csv
    import json

    def row(method, task, seed, acc, ece, nll, point_nll=""):
        return {"method": method, "train_task": task, "eval_task": task, "kind": "id", "seed": seed,
                "acc": acc, "ece": ece, "nll": nll, "point_nll": point_nll}

    rows = [row("polar-vbll", "arc_easy", 0, 0.56, 2.0, 1.0, 1.1), row("polar-vbll", "arc_easy", 1, 0.54, 4.0, 1.2, 1.1),
            row("lora-mle", "arc_easy", 0, 0.56, 6.0, 1.2), row("lora-mle", "arc_easy", 1, 0.56, 6.0, 1.2),
            row("lora-laplace", "arc_easy", 0, 0.55, 2.5, 1.05),
            row("polar-mle", "openbookqa", 0, 0.24, 9.0, 1.4), row("polar-vbll", "openbookqa", 0, 0.30, 3.0, 1.3),
            {**row("polar-vbll", "openbookqa", 0, 0.1, 50.0, 9.0), "eval_task": "arc_easy", "kind": "ood"}]
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert benchmark("table_targets").main([str(path)]) == 0
    checks = {(c["task"], c["check"]): c for c in json.loads((tmp_path / "targets.json").read_text())["checks"]}
    easy = lambda name: checks["arc_easy", name]  # noqa: E731
    assert easy("polar-vbll ECE <= 0.5 x lora-mle")["value"] == 3.0 and easy("polar-vbll ECE <= 0.5 x lora-mle")["met"]
    # lora-laplace has seed 0 only: polar-vbll is compared on seed 0 too (2.0 <= 2.5, 1.0 <= 1.05), not on
    # its two-seed mean (3.0, 1.1), which would miss both
    assert easy("polar-vbll ECE <= lora-laplace")["value"] == 2.0 and easy("polar-vbll ECE <= lora-laplace")["met"]
    assert easy("polar-vbll NLL <= lora-laplace")["met"] is True and easy("polar-vbll NLL <= lora-laplace")["seeds"] == [0]
    assert easy("polar-vbll ACC within 1 point of lora-mle")["met"] is True  # 0.55 vs 0.56
    assert easy("polar-vbll predictive NLL < its point prediction")["met"] is False  # 1.1 vs 1.1
    assert easy("polar-vbll ACC >= lora-vbll")["met"] is None, "no lora-vbll cell: open, not missed"
    assert checks["openbookqa", "polar-mle ACC >= chance"]["met"] is False
    assert checks["openbookqa", "polar-vbll ACC >= chance"]["met"] is True


@pytest.mark.integration
def test_frozen_pass_counts_padding_and_keeps_the_states(benchmark, tmp_path, data_dir):
    """40 questions a split: 3 fill batches, so the length-bucketed order can pad less than the loader's."""
    import json

    out = tmp_path / "frozen_pass.json"
    benchmark("frozen_pass").main(["--repeats", "1", "--questions", "40", "--out", str(out)])
    result = json.loads(out.read_text())
    ratios = {r["name"]: r["value"] for r in result["ratios"]}
    assert 0 <= ratios["padding_fraction_length_sorted"] < ratios["padding_fraction_loader_order"] < 1
    m = result["measurements"]
    assert m["passes"]["length_sorted"]["real"] == m["passes"]["loader_order"]["real"], "the same tokens, once each"
    assert m["model_gflops"] < m["executed_gflops"]["length_sorted"] < m["executed_gflops"]["loader_order"]
    assert m["store_agreement"]["same_keys"] and m["store_agreement"]["max_rel_diff"] < 1e-5
    assert 0 <= m["repetition"]["shared_context"]["repeated_tokens"] < m["repetition"]["per_sequence_reference"][
        "repeated_tokens"]


def test_trie_size_counts_each_distinct_prefix_once(benchmark):
    assert benchmark("frozen_pass").trie_size([[1, 2, 3], [1, 2, 4], [5]]) == 5


def test_gpu_prompts_are_cut_or_extended_to_exactly_the_sequence_length(benchmark):
    from bayes_polar.data.formats import EncodedExample, EncodedTask

    items = [EncodedExample([[1, 2, 3]], [0], 0, 4), EncodedExample([list(range(10))], [0], 1, 4)]
    fixed = benchmark("gpu").fixed_length(EncodedTask(None, "letters", items, 5, 512), 7)
    assert [item.sequences[0] for item in fixed.items] == [[3, 1, 2, 3, 1, 2, 3], [3, 4, 5, 6, 7, 8, 9]]
    assert [item.label for item in fixed.items] == [0, 1]


def test_committed_table_records_were_made_with_the_grid_settings():
    """Every committed selection run and cell of a results table matches what its grid file asks for today,
    so a changed default or grid setting cannot leave records of another configuration behind."""
    import json

    from bayes_polar.evaluation import table

    results = REPO / "benchmarks" / "results" / "smollm2_table"
    grid = table.Grid.load(REPO / "benchmarks" / "configs" / "smollm2_table.json")
    grid.selected = json.loads((results / "selected.json").read_text())
    runs = [(c.directory(results), c.config) for c in grid.candidates()]
    runs += [(table.cell_dir(results, t, m, s), config) for t, m, s, config in grid.cells()]
    missing = [str(directory.relative_to(results)) for directory, _ in runs if not (directory / "metrics.json").exists()]
    assert not missing, f"the selection and every cell are committed whole; missing: {missing}"
    for directory, config in runs:
        table._check_finished(directory, config)  # raises ConfigError naming the changed settings
    import csv
    with open(results / "selection.csv") as f:
        rows = list(csv.DictReader(f))
    for method, setting in grid.selected.items():
        best = min((r for r in rows if r["method"] == method), key=lambda r: float(r["dev_nll"]))
        assert grid.search[method][int(best["setting"])] == setting == json.loads(best["values"]), method


def test_table_grid_is_valid_and_keeps_the_protocol_budget():
    """A committed grid loads, passes Grid.check (every setting a valid configuration) and gives every method
    at most MAX_SETTINGS candidates (issue 15 item 8)."""
    from bayes_polar.evaluation import table

    grid = table.Grid.load(REPO / "benchmarks" / "configs" / "smollm2_table.json")
    grid.check()
    counts = {}
    for c in grid.candidates():
        counts[c.method] = counts.get(c.method, 0) + (c.seed == grid.seeds[0])
    assert counts and max(counts.values()) <= table.MAX_SETTINGS


@pytest.mark.integration
def test_ood_epistemic_decomposes_the_logit_variance_into_spread_and_novelty(benchmark, tmp_path, data_dir):
    """novelty = φ̃ᵀΣφ̃ / ‖φ̃‖² is a Rayleigh quotient of the posterior covariance, so it lies within
    Σ's eigenvalues, and a question's mean logit variance lies between spread × λ_min(Σ) and spread × λ_max(Σ)."""
    import json

    from bayes_polar.config import FitConfig
    from bayes_polar.run import load_run, run_fit

    run = tmp_path / "run"
    config = FitConfig(model="tiny-random-llama", task="arc_easy", data_dir=str(data_dir), train_limit=16,
                       eval_limit=8, steps=4, batch_size=4, layers="-1", rank=4, alpha=8, threads=1,
                       checkpoint_every=0, max_length=96, eval_batch_size=8, predictive_samples=16, warmup_steps=1)
    run_fit(config, run, progress=False, log=lambda *_: None)
    module = benchmark("ood_epistemic")
    out = tmp_path / "ood.json"
    result = module.main([str(run), "--ood", "openbookqa", "--limit", "8", "--samples", "16",
                          "--data-dir", str(data_dir), "--out", str(out)])
    assert json.loads(out.read_text()) == result
    ood = next(row for row in result["splits"] if row["split"] == "ood:openbookqa")
    assert ood["questions"] == 8 and all(0 <= ood[f"auroc_{name}"] <= 1 for name in module.SCORES)

    pipe = load_run(run, data_dir=str(data_dir))
    scores = module.question_scores(pipe, "openbookqa", None, str(data_dir), 8, 16)
    eigen = torch.linalg.eigvalsh(pipe.method.head.posterior().covariance().double())
    assert (scores["novelty"] >= eigen.min() * (1 - 1e-6)).all() and (scores["novelty"] <= eigen.max() * (1 + 1e-6)).all()
    assert (scores["spread"] > 0).all() and (scores["logit_variance"] > 0).all()
    assert (scores["logit_variance"] <= scores["spread"] * eigen.max() * (1 + 1e-6)).all()
    assert (scores["logit_variance"] >= scores["spread"] * eigen.min() * (1 - 1e-6)).all()

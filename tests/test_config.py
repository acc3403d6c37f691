"""Run configuration: validation messages, JSON round trip, CLI options and overrides."""
import argparse
import dataclasses
import json
import re

import pytest

from bayes_polar.config import FitConfig, add_config_arguments, config_from_args
from bayes_polar.errors import BayesPolarError, ConfigError
from bayes_polar.typecheck import check_fields


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "vbll"}, "method must be one of"),
    ({"format": "words"}, "format must be one of"),
    ({"steps": 0}, "Expected steps >= 1 but got 0"),
    ({"lr": 0.0}, "Expected lr > 0 but got 0.0"),
    ({"dropout": 1.0}, "Expected 0 <= dropout < 1"),
    ({"prior_args": "{variance: 2}"}, "prior_args must be a JSON object"),
    ({"layers": "top4"}, "layers must be 'all' or comma-separated integers"),
    ({"target_modules": "auto,q_proj"}, "target_modules must be 'auto' or comma-separated module names"),
    ({"target_modules": " , "}, "target_modules must be 'auto' or comma-separated module names"),
    ({"elbo": "exact"}, "elbo must be one of"),
    ({"on_nan": "ignore"}, r"on_nan must be one of \('stop', 'skip'\), got 'ignore'"),
    ({"max_skipped_batches": -1}, "Expected max_skipped_batches >= 0 but got -1"),
    ({"orthogonality_tol": 0.0}, r"Expected orthogonality_tol > 0 \(or None\) but got 0.0"),
    ({"eval_tasks": "arc_easy,nope"}, "Unknown task 'nope'"),
    ({"format": "letters", "task": "winogrande_s", "eval_tasks": "arc_easy"}, "letters heads only transfer"),
    ({"format": "letters", "task": "arc_easy", "eval_tasks": "boolq"}, "letters heads only transfer"),
    ({"train_split": "train-heldout"}, "the held-out slice TASK:train-heldout is for choosing hyperparameters"),
    ({"train_split": ""}, "train_split '': train on train or train-fit"),
])
def test_invalid_values(kwargs, message):
    with pytest.raises(BayesPolarError, match=message):
        FitConfig(**kwargs)


def test_json_round_trip_and_unknown_keys(tmp_path):
    config = FitConfig(task="openbookqa", prior_args='{"variance": 0.5}', layers="all")
    config.save(tmp_path / "config.json")
    again = FitConfig.load(tmp_path / "config.json")
    assert again == config and again.prior_kwargs == {"variance": 0.5} and again.layer_indices is None
    with pytest.raises(ConfigError, match=r"Unknown configuration keys \['learning_rate'\]"):
        FitConfig.from_dict({"learning_rate": 0.1})


def test_python_values_lists_dicts_and_objects(tmp_path):
    from bayes_polar.models import IsotropicPrior

    prior = IsotropicPrior(variance=0.5)
    config = FitConfig(layers=[-2, -1], target_modules=["q_proj", "k_proj"], guide_args={"rank": 2}, prior=prior)
    assert config.layer_indices == [-2, -1] and config.target_module_names == ["q_proj", "k_proj"]
    assert FitConfig().target_modules == "auto" and FitConfig().target_module_names is None  # the family's default
    assert config.guide_kwargs == {"rank": 2} and config.prior is prior
    assert FitConfig(prior_args={"variance": 0.5}).prior_kwargs == {"variance": 0.5}
    config.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["prior"] == "python:" + repr(prior) and saved["layers"] == "-2,-1"
    with pytest.raises(ConfigError, match=r"was a Python object .*load_run\(run_dir, prior=\.\.\.\)"):
        FitConfig.load(tmp_path / "config.json")


@pytest.mark.parametrize("kwargs,message", [
    ({"prior": object()}, "prior must be a prior name, a .py file or a bayes_polar.bll.model.Prior instance"),
    ({"guide": 3}, "guide must be a guide name, a .py file or a callable"),
    ({"layers": 3}, "layers must be a comma-separated string or a list"),
    ({"prior_args": {"f": object()}}, "prior_args must hold JSON values"),
])
def test_bad_python_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FitConfig(**kwargs)


def test_a_letters_head_scores_lettered_tasks_with_no_more_choices():
    FitConfig(format="letters", task="arc_easy", eval_tasks="winogrande_s,openbookqa")  # 5 letters name 2 or 4


def test_a_bad_prior_leaves_nothing_on_disk(tmp_path):
    from bayes_polar.run import run_fit

    with pytest.raises(ConfigError):
        run_fit(FitConfig(prior=object()), tmp_path / "run")
    with pytest.raises(ConfigError, match="rejects the arguments"):  # valid JSON, but the prior refuses it
        run_fit(FitConfig(model="tiny-random-llama", prior="isotropic", prior_args={"nope": 1}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_command_line_overrides_are_type_checked():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--steps", "12", "--prefix-cache", "false", "--kl-weight", "none", "--lr", "3e-4"])
    config = config_from_args(args, {"task": "boolq", "steps": 5})
    assert (config.steps, config.prefix_cache, config.kl_weight, config.lr, config.task) == (12, False, None, 3e-4, "boolq")
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "many"])


def test_fault_options_and_their_defaults():
    config = FitConfig()
    assert (config.on_nan, config.max_skipped_batches, config.trust_remote_code) == ("stop", 10, False)
    assert config.orthogonality_tolerance == 1e-4
    assert FitConfig(adapter_optimizer="landing").orthogonality_tolerance == 0.1
    assert FitConfig(orthogonality_tol=1e-3).orthogonality_tolerance == 1e-3


def test_a_bool_option_alone_means_true():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert config_from_args(parser.parse_args(["--trust-remote-code"])).trust_remote_code is True
    assert config_from_args(parser.parse_args(["--trust-remote-code", "false"])).trust_remote_code is False
    assert config_from_args(parser.parse_args([])).trust_remote_code is False


@pytest.mark.parametrize("values,message", [
    ({"loglik_features": "false"}, r"key 'loglik_features': expected true or false, got str 'false'"),
    ({"steps": "5"}, r"key 'steps': expected an integer, got str '5'"),
    ({"seed": 1e308}, r"key 'seed': expected an integer, got float 1e\+308"),
    ({"seed": 10**30}, r"key 'seed': 1000000000000000000000000000000 is out of range"),
    ({"seed": -1}, r"Expected 0 <= seed"),
    ({"threads": 100000}, r"Expected threads <= 1024 but got 100000"),
    ({"lr": "1e-3"}, r"key 'lr': expected a number, got str '1e-3'"),
    ({"lr": float("nan")}, r"key 'lr': expected a finite number, got nan"),
    ({"kl_weight": True}, r"key 'kl_weight': expected a number or null, got bool True"),
    ({"task": None}, r"key 'task': expected a string, got null"),
    ({"batch_size": 2.0}, r"key 'batch_size': expected an integer, got float 2.0"),
])
def test_values_from_a_file_are_type_checked(tmp_path, values, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ": " + message):
        FitConfig.load(path)


def test_type_checks_follow_the_annotations_of_any_dataclass():
    """Generic: a field added later is checked from its annotation alone."""
    @dataclasses.dataclass
    class Later:
        new_count: int = 1
        new_scale: float | None = None

        def __post_init__(self):
            check_fields(self)

    assert Later(new_scale=2).new_scale == 2.0 and isinstance(Later(new_scale=2).new_scale, float)
    with pytest.raises(ConfigError, match="key 'new_count': expected an integer, got str '3'"):
        Later(new_count="3")
    assert isinstance(FitConfig(alpha=16).alpha, float)  # JSON 16 for a float field is fine


def test_resume_with_a_python_prior_compares_the_recorded_configuration(tmp_path):
    from bayes_polar.models import IsotropicPrior
    from bayes_polar.training.resume import check_resume

    path = tmp_path / "config.json"
    FitConfig(prior=IsotropicPrior(variance=0.5)).save(path)
    saved = json.loads(path.read_text())
    check_resume(FitConfig(prior=IsotropicPrior(variance=0.5)), saved, [], False, path)
    with pytest.raises(ConfigError, match=r"--resume with a different configuration than .*prior"):
        check_resume(FitConfig(prior=IsotropicPrior(variance=2.0)), saved, [], False, path)


def test_resume_of_a_run_from_before_auto_targets_is_the_same_run(tmp_path):
    from bayes_polar.training.resume import check_resume

    saved = dict(FitConfig().to_dict(), target_modules="q_proj,v_proj")  # the former default
    check_resume(FitConfig(), saved, [], False, tmp_path / "config.json")
    with pytest.raises(ConfigError, match=r"target_modules: 'q_proj,k_proj' -> 'auto'"):
        check_resume(FitConfig(), dict(saved, target_modules="q_proj,k_proj"), [], False, tmp_path / "config.json")

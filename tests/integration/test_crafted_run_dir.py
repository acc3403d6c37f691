"""A run directory is data: a crafted one decides no code that runs and no place that is written.

One real tiny run is fitted, then copies of it are edited the way a careless or malicious sender
could: each edit must be refused (or ignored) by ``evaluate`` unless this command's own flags allow it.
"""
import json
import shutil
import warnings

import pytest
from bayes_polar.cli import main
from bayes_polar.errors import BayesPolarWarning
from bayes_polar.training.checkpoint import latest_checkpoint, load_checkpoint
from bayes_polar.training.manifest import write_manifest

pytestmark = pytest.mark.integration
TINY = ["--model", "tiny-random-llama", "--threads", "1", "--quiet", "--layers=-1", "--rank", "2",
        "--train-limit", "16", "--eval-limit", "8", "--batch-size", "4", "--steps", "4", "--checkpoint-every", "2"]
EVIL_PRIOR = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from bayes_polar.models.width_scaled import WidthScaledPrior


class EvilPrior(WidthScaledPrior):
    pass
'''
EVIL_MODEL = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    pass


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["fit", "--out", str(run), "--data-dir", str(data_dir), *TINY]) == 0
    return run


@pytest.fixture
def crafted(finished, tmp_path):
    """A copy of the finished run whose config.json the test edits."""
    run = tmp_path / "crafted"
    shutil.copytree(finished, run)

    def edit(**changes):
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, **changes}))
        return run

    return edit


def _evaluate(capsys, run, *flags) -> tuple[int, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # as outside pytest, which silences BayesPolarWarning
        code = main(["evaluate", str(run), "--task", "arc_easy", "--limit", "4", *flags])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_a_prior_file_named_by_the_run_runs_only_when_this_command_allows_it(capsys, crafted, tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil_prior.py"
    evil.write_text(EVIL_PRIOR.format(marker=str(marker)))
    run = crafted(prior=str(evil))
    code, err = _evaluate(capsys, run)
    assert code == 1 and not marker.exists(), err
    assert f"names the prior file {evil}: Python code runs only if you pass --prior {evil} again or " \
           "--allow-code-from-run" in err
    assert main(["posterior-check", str(run), "--quiet"]) == 1 and not marker.exists()
    assert "--allow-code-from-run" in capsys.readouterr().err
    for flags in (["--allow-code-from-run"], ["--prior", str(evil)]):
        code, err = _evaluate(capsys, run, *flags)
        assert code == 0 and marker.exists(), err
        assert f"bayes-polar: warning: the prior file {evil} executes (Python code)" in err
        marker.unlink()


def test_remote_code_named_by_the_run_needs_trust_remote_code_on_this_command(capsys, crafted, tmp_path):
    from bayes_polar.data.backbone import tiny_random_llama

    marker, folder = tmp_path / "marker", tmp_path / "model"
    model, tokenizer = tiny_random_llama()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL_MODEL.format(marker=str(marker)))
    run = crafted(model=str(folder), trust_remote_code=True)
    for name in ("layout.json", "zero_shot.safetensors"):  # its layout would refuse the swapped backbone class
        (run / name).unlink()
    write_manifest(run, ["adapters.safetensors", "head.safetensors"])  # as a run made before they were saved
    code, err = _evaluate(capsys, run)
    assert code == 1 and not marker.exists(), err
    assert "sets trust_remote_code" in err and "pass --trust-remote-code" in err
    code, err = _evaluate(capsys, run, "--trust-remote-code")  # this command's own say
    assert code == 0 and marker.exists(), err


def test_the_run_cache_dir_is_ignored(capsys, crafted, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    code, err = _evaluate(capsys, crafted(cache_dir=str(elsewhere)))
    assert code == 0, err
    assert not elsewhere.exists()
    mine = tmp_path / "mine"
    code, err = _evaluate(capsys, crafted(cache_dir=str(elsewhere)), "--cache-dir", str(mine))
    assert code == 0 and list(mine.rglob("*.safetensors")) and not elsewhere.exists(), err


def test_latest_json_cannot_point_outside_the_run(crafted, tmp_path):
    run = crafted()
    root = run / "checkpoints"
    inside = latest_checkpoint(run)
    outside = tmp_path / "outside" / inside.name
    shutil.copytree(inside, outside)  # a valid checkpoint, but not this run's
    (root / "latest.json").write_text(json.dumps({"checkpoint": f"../../outside/{inside.name}", "step": 4}))
    (root / "step-00000009").symlink_to(outside)
    with pytest.warns(BayesPolarWarning, match="is not a checkpoint directory of"):
        found = latest_checkpoint(run)
    assert found == inside
    with pytest.warns(BayesPolarWarning):
        assert load_checkpoint(run)[2] == 4


def test_guide_file_re_passed_runs(capsys, crafted, tmp_path):
    """Re-passing the file is this command's choice: it runs, with the one-line notice."""
    marker = tmp_path / "marker"
    guide = tmp_path / "my_guide.py"
    guide.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                     "from bayes_polar.guides.full_covariance import FullCovarianceGuide as _Full\n\n\n"
                     "class FullCovarianceGuide(_Full):\n    pass\n")
    run = crafted(guide=str(guide))
    code, err = _evaluate(capsys, run)
    assert code == 1 and not marker.exists() and "--allow-code-from-run" in err
    code, err = _evaluate(capsys, run, "--guide", str(guide))
    assert code == 0 and marker.exists(), err
    assert f"the guide file {guide} executes" in err

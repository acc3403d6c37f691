"""The README's code runs as written: the Python example and the add-a-prior / add-a-guide recipe."""
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def _file_blocks() -> dict[str, str]:
    """Python blocks that start with '# <name>.py' are files the reader writes."""
    files = {}
    for block in _blocks("python"):
        first = block.splitlines()[0]
        if re.fullmatch(r"# \w+\.py", first):
            files[first[2:]] = block
    return files


def test_python_example_runs(tmp_path):
    example = next(b for b in _blocks("python") if "BayesianLastLayer" in b)
    example += "\nassert probs.shape == (64, 4) and torch.allclose(probs.sum(-1), torch.ones(64))\n"
    subprocess.run([sys.executable, "-c", example], cwd=tmp_path, check=True, timeout=300)


def test_add_a_prior_and_a_guide_recipe(tmp_path):
    files = _file_blocks()
    assert set(files) == {"my_prior.py", "my_guide.py"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    usage = next(b for b in _blocks("python") if "load_prior(" in b)
    check = usage + '''
import torch, pyro
from pyro.infer import SVI
from bayes_polar.bll.model import BayesianLastLayer
from bayes_polar.bll.registry import make_guide
from bayes_polar.bll.elbo import make_elbo
head = BayesianLastLayer(5, 1, prior)
guide = make_guide(guide_builder, head)
svi = SVI(head, guide, pyro.optim.Adam({"lr": 0.01}), make_elbo("mc", num_particles=4))
phi, y = torch.randn(20, 3, 5), torch.randint(0, 3, (20,))
for _ in range(5):
    loss = svi.step(phi, None, y, dataset_size=20)
assert type(prior).__name__ == "LaplacePrior" and prior.scale == 0.3
assert type(guide).__name__ == "AutoLowRankMultivariateNormal"
'''
    subprocess.run([sys.executable, "-c", check], cwd=tmp_path, check=True, timeout=300)


def test_readme_names_only_existing_cli_options():
    from bayes_polar.cli import build_parser

    fit_help = build_parser()._subparsers._group_actions[0].choices["fit"].format_help()
    used = set()
    for block in _blocks("bash"):
        if "bayes-polar fit" in block:
            used |= set(re.findall(r"(--[a-z][a-z-]+)", block))
    assert used and all(option in fit_help for option in used), used - set(re.findall(r"--[a-z-]+", fit_help))


def test_readme_names_only_existing_posterior_check_options():
    from bayes_polar.cli import build_parser

    check_help = build_parser()._subparsers._group_actions[0].choices["posterior-check"].format_help()
    used = {option for block in _blocks("bash") if "bayes-polar posterior-check" in block
            for option in re.findall(r"(--[a-z][a-z-]+)", block)}
    assert used and all(option in check_help for option in used), used


@pytest.mark.integration
def test_your_own_data_example_runs(tmp_path):
    """The 'Your own data' section end to end (tiny random Llama, two steps instead of the real model)."""
    import os

    section = (REPO / "README.md").read_text().split("## Your own data", 1)[1].split("\n## ", 1)[0]
    bash = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    python = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(bash) == 2 and len(python) == 1
    tiny = " --model tiny-random-llama --steps 2 --layers=-1 --rank 2 --threads 1 --max-length 64 --quiet"
    script = bash[0].replace("--batch-size 4\n", "--batch-size 4" + tiny + "\n") + bash[1]
    assert tiny in script
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, check=True, timeout=600, env=env)
    lines = (tmp_path / "preds.jsonl").read_text().splitlines()
    assert len(lines) == 2 and {"entropy", "aleatoric", "epistemic"} <= set(json.loads(lines[0]))
    assert (tmp_path / "exported" / "mine" / "model" / "config.json").exists()
    (tmp_path / "pets.csv").write_text("prompt,opt1,opt2,opt3,gold\nWhich barks?,cat,dog,,dog\n")
    subprocess.run([sys.executable, "-c", python[0]], cwd=tmp_path, check=True, timeout=300, env=env)

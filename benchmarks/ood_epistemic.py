"""Why a last-layer posterior's epistemic score can point the wrong way under a shift: a decomposition.

For a Gaussian last layer on centred, scaled option features φ̃_tc (``options`` format), the logit
variance of option c of question t factors into a feature *size* and a *direction* term:

.. math::
    \\operatorname{Var}(z_{tc}) = \\tilde\\phi_{tc}^\\top \\Sigma\\, \\tilde\\phi_{tc}
    = \\underbrace{\\lVert\\tilde\\phi_{tc}\\rVert^2}_{\\text{spread}}
      \\cdot \\underbrace{\\frac{\\tilde\\phi_{tc}^\\top \\Sigma\\, \\tilde\\phi_{tc}}{\\lVert\\tilde\\phi_{tc}\\rVert^2}}_{\\text{novelty}}

``spread`` is how far a question's options lie from their own mean (centring removes the shared
part), ``novelty`` the posterior variance per unit length along them (large in directions the
training features did not cover). Each is averaged over a question's valid options. A shifted split
whose options are more alike than the training task's has a smaller spread, hence less logit
variance and less mutual information, however novel its directions: this script measures which
term decides (both are :func:`bayes_polar.evaluation.uncertainty.uncertainty_scores` scores), as AUROCs (OOD positive, larger = more uncertain) of every score against the run's
in-distribution validation split, with each split's mean.

    python benchmarks/ood_epistemic.py RUN_DIR --data-dir ../shared/data \\
        --ood arc_challenge arc_easy mmlu_college_chemistry mmlu_college_physics --out result.json

``RUN_DIR``: a fitted ``bayes-polar fit`` run with a Gaussian last layer (a VBLL method or
polar-vbll-la / lora-laplace), trained on the ID task.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SCORES = ("max_prob", "mutual_information", "logit_variance", "spread", "novelty")


@torch.no_grad()
def question_scores(pipe, task: str, split: str | None, data_dir, limit: int | None, num_samples: int) -> dict:
    """Per-question ``{max_prob, mutual_information, logit_variance, spread, novelty}`` (N,) of one split."""
    from bayes_polar.data.formats import make_loader
    from bayes_polar.data.tasks import default_split
    from bayes_polar.evaluation.uncertainty import uncertainty_scores
    from bayes_polar.run import encode_eval, warm_cache

    encoded = encode_eval(pipe, task, split or default_split(task), data_dir, limit)
    warm_cache(pipe, encoded)
    torch.manual_seed(pipe.config.seed)
    out: dict[str, list] = {name: [] for name in SCORES}
    for batch in make_loader(encoded, pipe.tokenizer, batch_size=pipe.config.eval_batch_size):
        drawn = pipe.method.predict_samples(batch, num_samples)  # on the head's centred, scaled features
        if drawn["logit_var"] is None:
            raise SystemExit(f"{pipe.config.method} has no Gaussian last layer: no logit variance to decompose")
        scores = uncertainty_scores(drawn["samples"], drawn["mask"], drawn["logit_var"], drawn["feature_norm2"])
        for name in SCORES:
            out[name].append(scores[name])
    return {name: torch.cat(values) for name, values in out.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a fitted run with a Gaussian last layer")
    parser.add_argument("--ood", nargs="+", required=True, help="shifted tasks (their validation split)")
    parser.add_argument("--data-dir", default=None, help="local data root (default: $BAYES_POLAR_DATA)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions of every split")
    parser.add_argument("--samples", type=int, default=256, help="last-layer draws per question")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bayes_polar.evaluation.ood import detection_metrics
    from bayes_polar.evaluation.uncertainty import uncertainty
    from bayes_polar.run import load_run

    started = time.time()
    pipe = load_run(args.run_dir, data_dir=args.data_dir)
    splits = {"id": pipe.config.task, **{f"ood:{task}": task for task in args.ood}}
    scores = {key: question_scores(pipe, task, None, args.data_dir, args.limit, args.samples)
              for key, task in splits.items()}
    oriented = {key: {name: uncertainty(s, name) for name in s} for key, s in scores.items()}
    rows = []
    for key, s in scores.items():
        row = {"split": key, "questions": len(s["max_prob"]),
               **{f"mean_{name}": round(float(v.mean()), 5) for name, v in s.items()}}
        if key != "id":
            row.update({f"auroc_{name}": round(detection_metrics(oriented["id"][name], oriented[key][name])["auroc"], 4)
                        for name in SCORES})
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"benchmark": "ood_epistemic", "command": " ".join(["python benchmarks/ood_epistemic.py",
                                                                 *(argv if argv is not None else sys.argv[1:])]),
              "method": pipe.config.method, "task": pipe.config.task, "seed": pipe.config.seed,
              "torch": torch.__version__, "seconds": round(time.time() - started, 1), "splits": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()

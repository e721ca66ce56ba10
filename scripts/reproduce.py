"""Does STGC help, and is it the gradients that matter? The study: stage III arms from one stage II model.

Per pipeline (easy_vqa; mix: easy-vqa + Sort-of-CLEVR + text-only), every arm trains stage III from
the same stage II checkpoint for --epochs epochs, then answers the test questions (`stgc predict`):
  1. dense: the stage II model itself, answering;
  2. baseline: the MoE with STGC measuring only (λ = 0, at the arms' τ), over --seeds seeds;
  3. screen (seed 0): every loss form at every --loss-weights λ; the best on val accuracy is chosen;
  4. main: the chosen setting and the random control (the same loss and λ on as many random
     assignments as the gradient flags: STGC(selection="random")) over --seeds seeds;
  5. variants (seed 0): the chosen setting with gradient="output", and with mean="others".
Per arm: test accuracy overall and per question family; its paired difference to the baseline
(same seeds, same questions) with a seed-level 95% interval (stgc_experiments.study.paired_interval:
Student's t over the per-seed differences; a bootstrap over questions for one seed); curves of conflict ratio, cosine against its null level, reroute rate and expert drift; how differently
the experts serve image and text tokens, and the question families, at the end.

    python scripts/reproduce.py --pipeline easy_vqa     # hours on 2 CPU cores: see the README
    python scripts/reproduce.py --pipeline mix --parts dense main --loss-types unlikelihood --loss-weights 0.1
                                # the mix: easy-vqa's chosen setting, no screen (seeds: --seeds 0 1 2)
    python scripts/reproduce.py --quick                 # a tiny slice, to keep the script working

Resumable run by run: a finished run's results/<pipeline>/runs/<run>.json is kept and not run again.
The stage II model every arm starts from is kept as results/<pipeline>/stage2.ckpt (trained when
missing: retraining is bit-identical on one machine only); its weights' digest is recorded in every
run and checked. Writes results/<pipeline>/{results.md,summary.md,curves.png}; --readme puts every
pipeline's summary.md into the README's Results section. Two processes can share a study once its
stage2.ckpt is kept: `--parts dense main --seeds 0` beside `--parts main --seeds 1`, one thread each,
or within one seed `--arms baseline chosen` beside `--arms control`.
"""

import argparse

from stgc.method.loss import LOSS_TYPES
from stgc_experiments.pipeline import PIPELINES
from stgc_experiments.reproduce import MAIN_ARMS, PARTS, Study, run_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=Study.pipeline, choices=list(PIPELINES))
    parser.add_argument("--quick", action="store_true", help="tiny slice and budget: checks the script works")
    parser.add_argument(
        "--stage2", default=None, help="default: <out>/<pipeline>/stage2.ckpt, trained when missing"
    )
    parser.add_argument(
        "--epochs", type=int, default=Study.epochs, help="stage III epochs of every arm (MoE-LLaVA: 1)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=list(Study.seeds), help="of the main comparison"
    )
    parser.add_argument("--loss-weights", type=float, nargs="+", default=list(Study.loss_weights))
    parser.add_argument(
        "--loss-types",
        nargs="+",
        default=list(Study.loss_types),
        choices=LOSS_TYPES,
        help="the forms screened",
    )
    parser.add_argument("--threshold", type=float, default=Study.threshold)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=list(Study.parts),
        choices=PARTS,
        help="dense: the stage II model's answers; screen: the λ sweep and variants; main: seeds of "
        "baseline, chosen, control",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        default=list(Study.arms),
        choices=MAIN_ARMS,
        help="of the main comparison, the ones this process trains: two processes can share a seed",
    )
    parser.add_argument("--out", default=Study.out, help="relative paths are the repository root's")
    parser.add_argument("--log-root", default=Study.log_root)
    parser.add_argument("--readme", action="store_true", help="write the README's Results section")
    parser.add_argument(
        "--refresh-loads",
        action="store_true",
        help="redo the expert loads of finished runs sampled otherwise, from their checkpoints under --log-root",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="train nothing: the outputs from the runs in --out alone"
    )
    args, extra = parser.parse_known_args()
    quick = vars(args).pop("quick")
    study = Study(**vars(args), extra=extra)
    run_study(study.quick() if quick else study)


if __name__ == "__main__":
    main()

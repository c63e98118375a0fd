"""The paper's experiments (SPEC 8) on the synthetic cohort, one report beside the paper's tables.

    python jobs/reproduce.py [--profile local] [--out URI]
    ray job submit --working-dir . -- python jobs/reproduce.py --profile local --data /abs/path
        --synthetic

Table 2: humerus baseline and augmented at t in {0.70, 0.85, 0.90, 0.95}.
Table 3: tibia baseline / augmented / TL_G / TL_G + TL_PL; femur baseline / TL_G / TL_G + TL_PL
(TL_G: the humerus UNIT; TL_PL: the humerus baseline as pseudo-labeller). t is chosen on
validation AUC for every augmented variant (humerus: the paper's grid; the others: the profile's
augment.thresholds); the test set is only used for the final table.
"""

import time

from boneaug import storage, tracking
from boneaug.config import PAPER_THRESHOLDS
from boneaug.runtime import absolute, init_ray, job_parser, setup
from boneaug.workflow import OWN, Variant, ensure_cohort, run_body_part

TL_G = Variant("tl_g", "TL_G", unit_from="humerus")
TL_G_PL = Variant("tl_g_pl", "TL_G + TL_PL", unit_from="humerus", scorer_from="humerus")
EXPERIMENTS = (("humerus", (OWN,)), ("tibia", (OWN, TL_G, TL_G_PL)), ("femur", (TL_G, TL_G_PL)))


def main() -> None:
    args = job_parser(__doc__, body_part=False).parse_args()
    config, data, _ = setup(args)
    out = absolute(args.out or data)
    start = time.perf_counter()
    tracking.configure(config.tracking)
    init_ray()
    ensure_cohort(config, data, [part for part, _ in EXPERIMENTS],
                  synthesize=args.data is None or args.synthetic)
    sections = []
    for part, variants in EXPERIMENTS:
        result = run_body_part(config, part,  # type: ignore[arg-type]
                               data_uri=data, out_uri=out, synthesize=False, variants=variants,
                               thresholds=PAPER_THRESHOLDS if part == "humerus" else None)
        png = result.figures.get(variants[0].key)
        chosen = ", ".join(f"{k}: t = {t:.2f}" for k, t in result.chosen.items())
        figure = (f"![Figure 3: original, translated, blended]({png})\n" if png
                  else "(no candidates: no Figure 3)\n")
        sections.append(f"## {part}\n\nt chosen on validation: {chosen}\n\n"
                        f"{result.markdown}\n{figure}")
    report = storage.join(out, "runs", f"reproduce-{config.profile}", "report.md")
    storage.write_text(report, "# boneaug: the paper's experiments on the synthetic cohort\n\n"
                       + "\n".join(sections))
    print("\n".join(sections))
    print(f"report: {report}\ndone in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

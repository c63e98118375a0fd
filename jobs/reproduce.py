"""The paper's experiments (SPEC 8) and the chain's own instruments (SPEC 9), one report.

    python jobs/reproduce.py [--profile local] [--seeds 0,1,2] [--body-parts humerus] [--out URI]
    ray job submit --working-dir . -- python jobs/reproduce.py --profile local --data /abs/path
        --synthetic --seeds 0,1,2

Table 2: humerus baseline and augmented at each t of the grid (the profile's augment.thresholds:
the paper's {0.70, 0.85, 0.90, 0.95} on `paper`, {0.70, 0.90} on `local`, where each t costs one
DRN per arm and seed; --thresholds sets it), beside the copy-paste and (synthetic cohorts) oracle
arms at the same t, and the learning curve (the baseline on a share, and a multiple, of the real
training positives: `eval.learning_curve`).
Table 3: tibia baseline / augmented / TL_G / TL_G + TL_PL; femur baseline / TL_G / TL_G + TL_PL
(TL_G: the humerus UNIT; TL_PL: the humerus baseline of the same seed as pseudo-labeller), each
beside copy-paste and oracle. t is chosen on validation AUC for every arm; the test set is only
used for the tables. With augment.t_from_humerus (on in `local`) Table 3's arms train at the t
their humerus counterpart chose instead of searching the grid again: one DRN per arm and seed.

Translators are trained once per body part; each training seed of --seeds repeats the
classifier trainings (the first seed searches the t grid and trains the learning curve's points
above 1x; later seeds train each arm at the t it chose), and the tables give the mean +- sd over
seeds beside each row.
"""

import time

from boneaug import storage, tracking
from boneaug.runtime import (
    THRESHOLDS_HELP,
    absolute,
    init_ray,
    job_parser,
    parse_seeds,
    parse_thresholds,
    setup,
)
from boneaug.synth.cohort import generated_with
from boneaug.workflow import (
    ARMS,
    COPY_PASTE,
    ORACLE,
    OWN,
    Plan,
    Variant,
    ensure_cohort,
    run_body_part,
)

TL_G = Variant("tl_g", "TL_G", unit_from="humerus")
TL_G_PL = Variant("tl_g_pl", "TL_G + TL_PL", unit_from="humerus", scorer_from="humerus")
EXPERIMENTS = (("humerus", (OWN, COPY_PASTE, ORACLE)),
               ("tibia", (OWN, TL_G, TL_G_PL, COPY_PASTE, ORACLE)),
               ("femur", (TL_G, TL_G_PL, COPY_PASTE, ORACLE)))


def parse_body_parts(text: str | None) -> tuple[str, ...]:
    """"humerus,tibia" -> the experiments of those body parts, in EXPERIMENTS' order."""
    known = [part for part, _ in EXPERIMENTS]
    if not text:
        return tuple(known)
    asked = [p.strip() for p in text.split(",")]
    unknown = sorted(set(asked) - set(known))
    if unknown:
        raise SystemExit(f"--body-parts: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(known)}")
    if "humerus" not in asked:
        raise SystemExit("--body-parts: tibia's and femur's TL_G and TL_G + TL_PL arms use the "
                         "humerus translator and baseline, so humerus must be among them")
    return tuple(part for part in known if part in asked)


def humerus_grids(variants: tuple[Variant, ...],
                  chosen: dict[str, float]) -> dict[str, tuple[float, ...]]:
    """Table 3's arms at the t their humerus counterpart chose (augment.t_from_humerus): the
    copy-paste and oracle arms at humerus' copy-paste and oracle t, the UNIT arms (the body
    part's own, TL_G, TL_G + TL_PL) at humerus' UNIT arm's; none on humerus itself."""
    return {v.key: (chosen[ARMS[v.arm].key],) for v in variants if ARMS[v.arm].key in chosen}


def main() -> None:
    parser = job_parser(__doc__, body_part=False)
    parser.add_argument("--seeds", default=None,
                        help="comma-separated training seeds, e.g. 0,1,2 (default: the config's)")
    parser.add_argument("--thresholds", default=None, help=THRESHOLDS_HELP)
    parser.add_argument("--body-parts", default=None,
                        help="comma-separated, e.g. humerus for Table 2 alone (default: all)")
    args = parser.parse_args()
    parts = parse_body_parts(args.body_parts)
    config, data, _ = setup(args)
    thresholds = parse_thresholds(args.thresholds)
    seeds = parse_seeds(args.seeds) or (config.drn.seed,)
    out = absolute(args.out or data)
    start = time.perf_counter()
    tracking.configure(config.tracking)
    init_ray()
    ensure_cohort(config, data, list(parts), synthesize=args.data is None or args.synthetic)
    sections, scorers = [], {}
    chosen: dict[str, float] = {}  # humerus: variant key -> t chosen on validation
    for part, variants in EXPERIMENTS:
        if part not in parts:
            continue
        if not generated_with(data, part, config.synth, seed=config.synth.seed):
            variants = tuple(v for v in variants if v is not ORACLE)  # a real cohort: no phantom
        plan = Plan(variants=variants, thresholds=thresholds, seeds=seeds,
                    grids=humerus_grids(variants, chosen) if config.augment.t_from_humerus
                    else {},
                    learning_curve=config.eval.learning_curve if part == "humerus" else ())
        result = run_body_part(config, part,  # type: ignore[arg-type]
                               data_uri=data, out_uri=out, synthesize=False, plan=plan,
                               scorers=scorers)
        scorers[part] = result.baselines
        if part == "humerus":
            chosen = result.chosen
        png = result.figures.get(variants[0].key)
        how = "from humerus" if plan.grids else "chosen on validation"
        picked = ", ".join(f"{k}: t = {t:.2f}" for k, t in result.chosen.items())
        figure = (f"![Figure 3: original, translated, blended]({png})\n" if png
                  else "(no candidates: no Figure 3)\n")
        sections.append(f"## {part}\n\nt {how} (seed {seeds[0]}): {picked}\n\n"
                        f"{result.markdown}\n{figure}\nFull report: {result.report_uri}\n")
    report = storage.join(out, "runs", f"reproduce-{config.profile}", "report.md")
    storage.write_text(report, "# boneaug: the paper's experiments on the synthetic cohort\n\n"
                       + "\n".join(sections))
    print("\n".join(sections))
    print(f"report: {report}\ndone in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

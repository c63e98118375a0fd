"""The prepared GPU check: what the `paper` profile costs on one GPU, ready for when one is lent.

Measures, on the GPU, in bf16 autocast (the trainers' own policy there):
- the bf16 GEMM peak (8192^3 matrix products), the anchor for MFU;
- `paper`-profile UNIT training iterations/s (256 px patches, the published widths) and its MFU;
- `paper`-profile DRN training images/s (1024x512, drn_d_22 at full width) and its MFU;
- a 2-minute UNIT smoke training through Ray Train on the GPU (fit_unit, one worker), when Ray,
  MLflow and pydantic are importable there (the image has torch but none of them, and nothing
  can be fetched: carry the project's wheels and install them with --no-index first).

Writes `device_check.md` (a markdown table) and `device_check.json` under --out. --dry-run runs
the same code on the CPU at toy sizes (smoke profile, 32 px, 128x64 images, a few iterations):
what a machine without a GPU, and the tests, can check.

    benchmarks/device_check.sh [--dry-run]          # OUT=<folder>, default ./device_check_out
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import best_seconds, gemm_peak_gflops
from bench_drn import Case, run_case
from torch.utils.flop_counter import FlopCounterMode


def flops_of(step: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:  # also the warm-up call
        step()
    return float(counter.get_total_flops())


def unit_rate(profile: str, size: int, device: torch.device, repeats: int) -> dict[str, float]:
    """UNIT training iterations/s and TFLOP/s of one iteration at `profile`'s networks."""
    from boneaug.config import load_config
    from boneaug.models.unit import UNIT, Discriminators, UnitArch
    from boneaug.train.unit import LossWeights, make_optimizers, train_iteration

    config = load_config(profile).unit  # type: ignore[arg-type]
    arch = UnitArch.from_config(config)
    g = torch.Generator().manual_seed(0)
    unit, dis = UNIT(arch, generator=g).to(device), Discriminators(arch, generator=g).to(device)
    optimizers = make_optimizers(unit, dis, config)
    x_h, x_l = (torch.rand(config.batch_size, 1, size, size, generator=g).to(device) * 2 - 1
                for _ in range(2))

    def step() -> None:
        train_iteration(unit, dis, x_h, x_l, weights=LossWeights.from_config(config),
                        optimizers=optimizers)

    flops = flops_of(step)
    seconds = best_seconds(step, repeats, str(device))
    return {"per_s": 1 / seconds, "tflops": flops / seconds / 1e12, "batch": config.batch_size}


def drn_rate(profile: str, batch: int, device: torch.device, repeats: int) -> dict[str, float]:
    """DRN training images/s and TFLOP/s (every stage trainable: the fracture pre-training), as
    bench_drn measures them."""
    row = run_case(Case(profile, "train", batch, repeats), device)
    return {"per_s": float(row["img_s"]), "tflops": float(row["gflop_s"]) / 1e3, "batch": batch}


def ray_unit_smoke(out: Path, device: torch.device, seconds_budget: float) -> dict[str, Any]:
    """fit_unit (Ray Train, one worker, the GPU when there is one) on seeded synthetic patches,
    for as many iterations as fill about `seconds_budget` seconds; what it reached and its rate,
    start-up included, beside the same config's in-process rate."""
    try:
        import ray
        import ray.data

        from boneaug.config import TrackingConfig, load_config
        from boneaug.data.arrays import encode_pixels
        from boneaug.train.distributed import Publish, Workers
        from boneaug.train.unit import fit_unit
    except ImportError as exc:
        return {"status": f"not run: {exc.name} is not installed here (carry the project's "
                          "wheels and pip install --no-index them first)"}
    import numpy as np

    profile = "smoke" if device.type == "cpu" else "local"
    size = 32 if device.type == "cpu" else 64
    # as many iterations as fill the budget at the rate this config trains at in-process
    rate = unit_rate(profile, size, device, repeats=3)["per_s"]
    iterations = max(8, int(0.8 * seconds_budget * rate) // 4 * 4)
    config = load_config(profile).unit.model_copy(update={
        "iterations": iterations, "checkpoint_every": iterations // 2,
        "sample_every": iterations // 2, "log_every": max(1, iterations // 10)})
    rng = np.random.default_rng(0)
    rows = [{"height": size, "width": size,
             "pixels": encode_pixels(rng.random((size, size), dtype=np.float32))}
            for _ in range(64)]
    ray.init(address="local", num_cpus=2, num_gpus=int(device.type == "cuda"),
             include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        result = fit_unit(
            config, ray.data.from_items(rows), ray.data.from_items(rows),
            publish=Publish(str(out / "unit-smoke"), "device_check", overwrite=True,
                            tracking=TrackingConfig(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")),
            workers=Workers(num_workers=1, use_gpu=device.type == "cuda"))
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {"status": "ok", "iterations": result.iterations, "seconds": seconds,
            "per_s": result.iterations / seconds, "in_process_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("device_check_out"))
    parser.add_argument("--dry-run", action="store_true",
                        help="the same code on the CPU at toy sizes (no GPU needed)")
    parser.add_argument("--smoke-seconds", type=float, default=120.0)
    args = parser.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --dry-run on a CPU machine")
    device = torch.device("cpu" if dry else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    peak = gemm_peak_gflops(256 if dry else 8192, 10, str(device),
                            "float32" if dry else "bfloat16") / 1e3
    unit = unit_rate("smoke" if dry else "paper", 32 if dry else 256, device, 2 if dry else 10)
    drn = drn_rate("smoke" if dry else "paper", 2 if dry else 16, device, 2 if dry else 10)
    smoke = ray_unit_smoke(args.out, device, 15.0 if dry else args.smoke_seconds)

    report = {"device": name, "torch": torch.__version__, "dry_run": dry,
              "peak_tflops": peak, "unit": unit, "drn": drn, "ray_unit_smoke": smoke}
    (args.out / "device_check.json").write_text(json.dumps(report, indent=2))
    profile = "smoke (dry run)" if dry else "paper"
    lines = [
        f"# device check: {name}, torch {torch.__version__}",
        "",
        "| what | rate | TFLOP/s | MFU vs measured GEMM peak |",
        "|---|---|---|---|",
        f"| GEMM peak ({'fp32 256' if dry else 'bf16 8192'}^3) | – | {peak:.1f} | 1 |",
        f"| UNIT training, {profile}, batch {unit['batch']:.0f} | {unit['per_s']:.2f} it/s | "
        f"{unit['tflops']:.2f} | {unit['tflops'] / peak:.3f} |",
        f"| DRN training, {profile}, batch {drn['batch']:.0f} | {drn['per_s']:.1f} img/s | "
        f"{drn['tflops']:.2f} | {drn['tflops'] / peak:.3f} |",
    ]
    if smoke["status"] == "ok":
        lines.append(f"| UNIT through Ray Train (fit_unit, 1 worker) | {smoke['per_s']:.2f} it/s "
                     f"({smoke['iterations']} iterations in {smoke['seconds']:.0f} s, start-up "
                     f"included; {smoke['in_process_per_s']:.1f} it/s in-process) | – | – |")
    else:
        lines.append(f"| UNIT through Ray Train | {smoke['status']} | – | – |")
    (args.out / "device_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

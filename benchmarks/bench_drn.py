"""DRN classifier throughput against the machine's own GEMM peak.

For the `local` profile (256x128 input, narrow DRN) and the `paper` profile (1024x512, the
published width) this measures images/s for inference (eval, no grad), for a full training step
(Adam + weighted BCE, every stage trainable: the fracture pre-training) and for a fine-tuning
step (only the last `finetune_blocks` stages and the head trainable). FLOPs per image come from
torch.utils.flop_counter.FlopCounterMode over the same call; achieved GFLOP/s is compared with
an fp32 2048x2048 matmul measured in the same run with the same threads (the roofline anchor
in STACK.md: about 150 GFLOP/s with 2 threads here). The `local` cases also run the same
model in NCHW layout (the DRN is built channels-last): `/ NCHW` is that layout's speed-up.

    .venv/bin/python benchmarks/bench_drn.py            # about 2 minutes on 2 idle cores
    .venv/bin/python benchmarks/bench_drn.py --device cuda --threads 16
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch
from _common import best_seconds, gemm_peak_gflops
from torch.utils.flop_counter import FlopCounterMode

from boneaug.config import load_config
from boneaug.models.precision import autocast
from boneaug.train.classifier import build_model, make_loss, make_optimizer, train_step


@dataclass(frozen=True)
class Case:
    profile: str
    mode: str  # infer | train | finetune
    batch: int
    repeats: int


CASES = (
    Case("local", "infer", 16, 20),
    Case("local", "train", 16, 6),
    Case("local", "finetune", 16, 6),
    Case("paper", "infer", 2, 2),
    Case("paper", "train", 2, 2),
    Case("paper", "finetune", 2, 2),
)


def run_case(case: Case, device: torch.device, *, nchw: bool = False) -> dict[str, object]:
    config = load_config(case.profile)  # type: ignore[arg-type]
    drn = config.drn
    height, width = config.image.height, config.image.width
    model = build_model(drn, generator=torch.Generator().manual_seed(0)).to(device)
    if nchw:
        model = model.to(memory_format=torch.contiguous_format)
    if case.mode == "finetune":
        model.freeze(drn.finetune_blocks)
    x = torch.rand(case.batch, 1, height, width, generator=torch.Generator().manual_seed(1))
    x = x.to(device)
    y = (torch.arange(case.batch, device=device) % 2).float()

    if case.mode == "infer":
        model.eval()

        def step() -> object:
            with torch.no_grad(), autocast(device):
                return model(x)
    else:
        optimizer = make_optimizer(model, drn)
        loss_fn = make_loss(3.0, device)

        def step() -> object:
            return train_step(model, x, y, optimizer=optimizer, loss_fn=loss_fn)

    counter = FlopCounterMode(display=False)
    with counter:  # also the warm-up (allocator, oneDNN / cuDNN kernel selection)
        step()
    flops = counter.get_total_flops()
    seconds = best_seconds(step, case.repeats, str(device))
    return {
        "profile": case.profile, "input": f"{height}x{width}", "width": drn.width_mult,
        "mode": case.mode, "batch": case.batch, "img_s": case.batch / seconds,
        "gflop_img": flops / case.batch / 1e9, "gflop_s": flops / seconds / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profiles", nargs="+", default=["local", "paper"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    arch = load_config("local").drn.arch
    t_start = time.perf_counter()
    peak_before = gemm_peak_gflops(repeats=20, device=str(device))
    load = os.getloadavg()[0]
    print(f"DRN ({arch}) on {device}, {args.threads} threads, torch {torch.__version__}, "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    header = (f"{'profile':8} {'input':9} {'width':>5} {'mode':9} {'batch':>5} {'img/s':>9} "
              f"{'GFLOP/img':>10} {'GFLOP/s':>9} {'/ peak':>7} {'/ NCHW':>7}")
    rows = [run_case(c, device) for c in CASES if c.profile in args.profiles]
    nchw = {(c.profile, c.mode): run_case(c, device, nchw=True)["img_s"]
            for c in CASES if c.profile == "local" and c.profile in args.profiles}
    peak_after = gemm_peak_gflops(repeats=20, device=str(device))
    # the anchor is the better of the two measurements: a contended one only understates it
    peak = max(peak_before, peak_after)
    print(f"GEMM peak (fp32 2048x2048 matmul, best of 20, before/after the cases): "
          f"{peak_before:.1f} / {peak_after:.1f} GFLOP/s -> anchor {peak:.1f}\n")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['profile']:8} {r['input']:9} {r['width']:>5} {r['mode']:9} {r['batch']:>5} "
              f"{r['img_s']:>9.2f} {r['gflop_img']:>10.2f} {r['gflop_s']:>9.1f} "
              f"{r['gflop_s'] / peak:>7.2f} "  # type: ignore[operator]
              + (f"{r['img_s'] / nchw[key]:>7.2f}"  # type: ignore[operator]
                 if (key := (r["profile"], r["mode"])) in nchw else f"{'-':>7}"))
    if abs(peak_after - peak_before) > 0.15 * peak or load > (os.cpu_count() or 1):
        print("\nwarning: the machine was busy (GEMM spread or load average): ratios are noisy")
    epoch = {r["profile"]: r for r in rows if r["mode"] == "train"}
    if "paper" in epoch:
        n = 268 + 2295  # humerus train images, paper Table 1
        secs = n / float(epoch["paper"]["img_s"])  # type: ignore[arg-type]
        print(f"one paper-size humerus epoch ({n} images, full training) at this rate: "
              f"{secs / 3600:.1f} h")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

"""UNIT training throughput: our iteration vs the reference trainer's, same networks, same machine.

Anchors (the public reference "UNIT" trainer, width 64, 1 channel, 64x64 crops, 2 CPU threads):
162 GFLOP per iteration at batch 1 and 1299 at batch 8; 1.6-2.1 s/iteration at batch 1 and
10-12 s at batch 8. The reference's iteration is a D step (encode, translate) followed by a
G step that encodes and decodes everything again; ours does the generator forward once, batches
the shared blocks and each decoder's latents, computes the upsample + 5x5 convolutions on the
low-resolution grid (`boneaug.models.unit.upsample_conv5`, exact), gives the G step's pass
through the frozen D no weight gradients, and uses torch's fused Adam (the same update).

Besides the anchors, the reference iteration is re-run here on the same networks (with the
direct upsample + conv) interleaved with ours, so the ratio does not depend on how busy the
machine is; times are the best of `--iters` (the least disturbed). FLOP are counted with
torch.utils.flop_counter.FlopCounterMode (convolutions and matrix products, forward and
backward); the fp32 GEMM peak (2048^2, same threads) is measured in the same run.

    .venv/bin/python benchmarks/bench_unit.py [--iters 3] [--threads 2] [--skip-b8]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from _common import gemm_peak_gflops, print_table

from boneaug.config import UnitConfig, load_config
from boneaug.models.unit import UNIT, Discriminators, UnitArch, UpConv
from boneaug.train.unit import (
    LossWeights,
    Optimizers,
    kl_loss,
    l1_loss,
    lsgan_d_loss,
    lsgan_g_loss,
    make_optimizers,
    train_iteration,
)

# (batch, GFLOP/iter, s/iter low, s/iter high) of the reference trainer at width 64, 64x64
REFERENCE = {1: (162.0, 1.6, 2.1), 8: (1299.0, 10.0, 12.0)}


@contextlib.contextmanager
def direct_upsampling() -> Iterator[None]:
    """UpConv as the reference computes it (upsample, then 5x5 conv on the large grid)."""
    fast = UpConv.forward
    UpConv.forward = UpConv.reference_forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        UpConv.forward = fast  # type: ignore[method-assign]


def reference_iteration(unit: UNIT, dis: Discriminators, x_a: torch.Tensor, x_b: torch.Tensor,
                        w: LossWeights, optimizers: Optimizers) -> None:
    """The reference trainer's dis_update then gen_update (a = h, b = l), on our networks."""
    with direct_upsampling():
        optimizers.d.zero_grad()
        h_a, h_b = unit.enc_h(x_a), unit.enc_l(x_b)
        x_ba = unit.gen_h(h_b + torch.randn_like(h_b))
        x_ab = unit.gen_l(h_a + torch.randn_like(h_a))
        loss_d = (w.gan * lsgan_d_loss(dis.dis_h(x_a), dis.dis_h(x_ba.detach()))
                  + w.gan * lsgan_d_loss(dis.dis_l(x_b), dis.dis_l(x_ab.detach())))
        loss_d.backward()
        optimizers.d.step()

        optimizers.g.zero_grad()
        h_a, h_b = unit.enc_h(x_a), unit.enc_l(x_b)
        n_a, n_b = torch.randn_like(h_a), torch.randn_like(h_b)
        x_a_recon, x_b_recon = unit.gen_h(h_a + n_a), unit.gen_l(h_b + n_b)
        x_ba, x_ab = unit.gen_h(h_b + n_b), unit.gen_l(h_a + n_a)
        h_b_recon, h_a_recon = unit.enc_h(x_ba), unit.enc_l(x_ab)
        x_aba = unit.gen_h(h_a_recon + torch.randn_like(h_a_recon))
        x_bab = unit.gen_l(h_b_recon + torch.randn_like(h_b_recon))
        loss_g = (w.gan * lsgan_g_loss(dis.dis_h(x_ba)) + w.gan * lsgan_g_loss(dis.dis_l(x_ab))
                  + w.recon * (l1_loss(x_a_recon, x_a) + l1_loss(x_b_recon, x_b))
                  + w.kl * (kl_loss(h_a) + kl_loss(h_b))
                  + w.cyc * (l1_loss(x_aba, x_a) + l1_loss(x_bab, x_b))
                  + w.kl_cyc * (kl_loss(h_a_recon) + kl_loss(h_b_recon)))
        loss_g.backward()
        optimizers.g.step()


def count_gflop(step: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def seconds(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(config: UnitConfig, batch: int, size: int, iters: int) -> dict[str, float]:
    """GFLOP/iter and best s/iter of ours and of the reference iteration (interleaved)."""
    arch, weights = UnitArch.from_config(config), LossWeights.from_config(config)
    g = torch.Generator().manual_seed(0)
    unit, dis = UNIT(arch, generator=g), Discriminators(arch, generator=g)
    optimizers = make_optimizers(unit, dis, config)
    x_h = torch.rand(batch, 1, size, size, generator=g) * 2 - 1
    x_l = torch.rand(batch, 1, size, size, generator=g) * 2 - 1

    def ours() -> None:
        train_iteration(unit, dis, x_h, x_l, weights=weights, optimizers=optimizers)

    # the reference's optimiser: torch.optim.Adam with its default (per-parameter) CPU loop
    ref_g, ref_d = (torch.optim.Adam(net.parameters(), lr=config.lr,
                                     betas=(config.beta1, config.beta2),
                                     weight_decay=config.weight_decay) for net in (unit, dis))
    ref_optimizers = Optimizers(ref_g, ref_d, None, None)  # type: ignore[arg-type]

    def reference() -> None:
        reference_iteration(unit, dis, x_h, x_l, weights, ref_optimizers)

    out = {"gflop_ours": count_gflop(ours), "gflop_ref": count_gflop(reference)}
    t_ours, t_ref = [], []
    for _ in range(iters):  # interleaved: both see the same machine load
        t_ours.append(seconds(ours))
        t_ref.append(seconds(reference))
    out["s_ours"], out["s_ref"] = min(t_ours), min(t_ref)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-b8", action="store_true", help="only batch 1 for the paper net")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = gemm_peak_gflops()

    paper, local = load_config("paper"), load_config("local")
    cases = [("paper (width 64)", paper.unit, 1, 64)] + (
        [] if args.skip_b8 else [("paper (width 64)", paper.unit, 8, 64)])
    cases.append((f"local profile ({local.patches.size} px)", local.unit, local.unit.batch_size,
                  local.patches.size))
    rows = []
    for name, config, batch, size in cases:
        m = measure(config, batch, size, args.iters)
        images = 2 * batch  # one healthy and one lesion patch per batch element
        anchor = REFERENCE.get(batch) if name.startswith("paper") else None
        anchor_s = (anchor[1] + anchor[2]) / 2 if anchor else None
        achieved = m["gflop_ours"] / m["s_ours"]
        rows.append([
            name, batch, f"{m['gflop_ours']:.1f}",
            f"{m['gflop_ref']:.1f}" + (f" ({anchor[0]:.0f})" if anchor else ""),
            f"{m['s_ours']:.2f}",
            f"{m['s_ref']:.2f}" + (f" ({anchor[1]}-{anchor[2]})" if anchor else ""),
            f"{images / m['s_ours']:.2f}",
            f"{m['s_ref'] / m['s_ours']:.2f}"
            + (f" ({anchor_s / m['s_ours']:.2f})" if anchor_s else ""),
            round(achieved),
        ])
        print(f"done: {name} batch {batch}", flush=True)
    peak = max(peak, gemm_peak_gflops())  # best of before and after: the machine may be shared
    print(f"\nfp32 GEMM 2048^2 peak, {args.threads} threads: {peak:.0f} GFLOP/s (best of two)\n")
    rows = [[*row[:-1], f"{row[-1]} / {100 * row[-1] / peak:.0f} %"] for row in rows]
    print_table(
        ["network", "batch", "GFLOP/iter ours", "GFLOP/iter reference (anchor)", "s/iter ours",
         "s/iter reference here (anchor)", "images/s ours",
         "images/s ratio vs ref here (vs anchor)",
         "GFLOP/s ours / of peak"],
        rows,
    )
    print("\nimages = 2 x batch per iteration (a healthy and a lesion patch per element), "
          "both sides;\n1 channel, 64x64 patches for the paper network (the anchor's crops); the "
          "local profile has no published anchor.")


if __name__ == "__main__":
    main()

"""UNIT training: losses and DDP steps, quality signal, translate/load, a 2-worker Ray run."""

from __future__ import annotations

import socket
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from unit_helpers import ARCH, SMOKE, nets, patch_rows, patches

from boneaug.augment.translate import load_translator, translate_patches
from boneaug.config import TrackingConfig
from boneaug.errors import DataError, ModelError
from boneaug.eval.quality import (
    CriticConfig,
    CriticEnsemble,
    PatchCritic,
    QualityProbe,
    QualitySets,
    degrade,
    gaussian_blur,
    quality_signal,
    standardize,
    train_critic,
    youden_threshold,
)
from boneaug.train.distributed import Publish, Workers
from boneaug.train.unit import (
    GRID_LABEL_WIDTH,
    LossWeights,
    PatchStream,
    checksum,
    d_step,
    decode_patch_batch,
    g_step,
    generate,
    make_optimizers,
    sample_grid,
    train_iteration,
    training_state,
)

S = 32  # smoke patch side


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def process_group() -> Iterator[None]:
    """A one-process gloo group, so steps run through real DDP wrappers (reducers, hooks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture()
def ray_s3(s3_endpoint: str, ray_session: None) -> None:
    """Ray started (if this is the first Ray test) after the S3 variables are set: Ray's
    processes, the Train controller among them, see the environment of `ray.init` time."""


def _batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x_h = torch.from_numpy(patches(n, S, lesion=False, seed=seed)) * 2 - 1
    x_l = torch.from_numpy(patches(n, S, lesion=True, seed=seed + 1)) * 2 - 1
    return x_h, x_l


FULL = LossWeights.from_config(SMOKE)
ZERO_ONE = [replace(FULL, **{name: 0.0}) for name in ("gan", "kl", "recon", "kl_cyc", "cyc")]
ONLY_KL = LossWeights(gan=0, kl=0.1, recon=0, kl_cyc=0, cyc=0)
ONLY_CHANGE = LossWeights(gan=0, kl=0, recon=0, kl_cyc=0, cyc=0, change=1.0)
TERMS = {"gan": ("gan_h", "gan_l"), "kl": ("kl_h", "kl_l"), "recon": ("recon_h", "recon_l"),
         "kl_cyc": ("kl_cyc_h", "kl_cyc_l"), "cyc": ("cyc_h", "cyc_l"),
         "change": ("change_h", "change_l")}


# ---- losses and steps --------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [FULL, *ZERO_ONE, ONLY_KL, replace(FULL, change=1.0)],
                         ids=["full", "gan0", "kl0", "recon0", "kl_cyc0", "cyc0", "only_kl",
                              "change"])
def test_every_zero_weight_trains_through_ddp_without_error(
    weights: LossWeights, process_group: None
) -> None:
    unit, dis = nets()
    before = [p.detach().clone() for p in unit.parameters()]
    unit_w = DDP(unit, find_unused_parameters=weights.leaves_unused_parameters,
                 forward_sync_buffers=False)
    dis_w = DDP(dis, forward_sync_buffers=False)
    optimizers = make_optimizers(unit, dis, SMOKE)
    x_h, x_l = _batch()
    for _ in range(2):  # the second iteration catches reducer state left over by the first
        losses = train_iteration(unit_w, dis_w, x_h, x_l, weights=weights, optimizers=optimizers,
                                 generator=torch.Generator().manual_seed(1))
    for name, keys in TERMS.items():
        present = getattr(weights, name) > 0
        assert all((k in losses) == present for k in keys), (name, sorted(losses))
    assert ("d_total" in losses) == (weights.gan > 0)
    assert all(torch.isfinite(v) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, unit.parameters(), strict=True))


def test_all_zero_or_negative_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="nothing to train"):
        LossWeights(gan=0, kl=0, recon=0, kl_cyc=0, cyc=0)
    with pytest.raises(ValueError, match=">= 0"):
        LossWeights(gan=-1)


def test_weights_choose_the_forward_plan_and_ddp_flag() -> None:
    assert FULL.plan() == FULL.plan().__class__()  # everything
    no_cycle = replace(FULL, kl_cyc=0, cyc=0)
    assert not no_cycle.plan().cycle_encode and no_cycle.plan().cross
    assert not replace(FULL, recon=0).plan().recon
    assert ONLY_KL.leaves_unused_parameters and not FULL.leaves_unused_parameters
    assert not LossWeights(gan=0, kl=0, recon=0, kl_cyc=1, cyc=0).leaves_unused_parameters


def test_the_change_prior_pulls_each_translation_towards_its_input() -> None:
    unit, dis = nets()
    optimizers = make_optimizers(unit, dis, SMOKE.model_copy(update={"lr": 1e-3}))
    x_h, x_l = _batch()

    def change() -> float:
        with torch.no_grad():
            out = generate(unit, x_h, x_l, weights=ONLY_CHANGE,
                           generator=torch.Generator().manual_seed(0))
        return float((out.x_hl - x_h).abs().mean() + (out.x_lh - x_l).abs().mean())

    before = change()
    for _ in range(30):
        losses = train_iteration(unit, dis, x_h, x_l, weights=ONLY_CHANGE, optimizers=optimizers,
                                 generator=torch.Generator().manual_seed(1))
    assert set(losses) == {"change_h", "change_l", "g_total"}
    assert change() < 0.5 * before, (before, change())


def test_d_step_moves_only_d_and_g_step_only_g_against_the_updated_d() -> None:
    unit, dis = nets()
    optimizers = make_optimizers(unit, dis, SMOKE)
    x_h, x_l = _batch()
    g0 = [p.detach().clone() for p in unit.parameters()]
    d0 = [p.detach().clone() for p in dis.parameters()]
    out = generate(unit, x_h, x_l, weights=FULL, generator=torch.Generator().manual_seed(0))
    d_losses = d_step(dis, out, x_h, x_l, weights=FULL, optimizer=optimizers.d)
    assert all(torch.equal(a, b) for a, b in zip(g0, unit.parameters(), strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(d0, dis.parameters(), strict=True))
    assert d_losses["d_total"] == pytest.approx(FULL.gan * (d_losses["d_h"] + d_losses["d_l"]))
    d1 = [p.detach().clone() for p in dis.parameters()]
    d_grads = [p.grad.clone() for p in dis.parameters()]
    with torch.no_grad():  # what the G step must see: the updated D on this step's translations
        expected_gan_h = sum((o - 1).pow(2).mean() for o in dis.dis_h(out.x_lh))
    g_losses = g_step(dis, out, x_h, x_l, weights=FULL, optimizer=optimizers.g)
    assert g_losses["gan_h"].item() == pytest.approx(expected_gan_h.item(), rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(d1, dis.parameters(), strict=True))
    # frozen: the G step computed no weight gradients for D
    assert all(torch.equal(g, p.grad) for g, p in zip(d_grads, dis.parameters(), strict=True))
    assert all(p.requires_grad for p in dis.parameters())  # and unfrozen afterwards
    changed = sum(not torch.equal(a, b) for a, b in zip(g0, unit.parameters(), strict=True))
    assert changed > len(g0) // 2


def test_disc_steps_step_d_once_per_extra_batch_pair_and_g_once() -> None:
    def steps(optimizer: torch.optim.Optimizer) -> set[int]:
        return {int(state["step"]) for state in optimizer.state.values()}

    unit, dis = nets()
    optimizers = make_optimizers(unit, dis, SMOKE)
    extra = [_batch(seed=3), _batch(seed=5)]
    train_iteration(unit, dis, *_batch(), weights=FULL, optimizers=optimizers, extra_d=extra)
    assert steps(optimizers.d) == {3} and steps(optimizers.g) == {1}
    d_after = [p.detach().clone() for p in dis.parameters()]

    unit, dis = nets()  # the same start, one D step: the extra ones moved D further
    optimizers = make_optimizers(unit, dis, SMOKE)
    train_iteration(unit, dis, *_batch(), weights=FULL, optimizers=optimizers)
    assert any(not torch.equal(a, b) for a, b in zip(d_after, dis.parameters(), strict=True))

    unit, dis = nets()  # no adversarial term: no D to train, extra batches or not
    optimizers = make_optimizers(unit, dis, SMOKE)
    train_iteration(unit, dis, *_batch(), weights=replace(FULL, gan=0.0), optimizers=optimizers,
                    extra_d=extra)
    assert steps(optimizers.d) == set() and steps(optimizers.g) == {1}


def test_a_few_iterations_on_a_tiny_batch_lower_the_reconstruction_loss() -> None:
    unit, dis = nets(seed=2)
    config = SMOKE.model_copy(update={"lr": 1e-3})
    optimizers = make_optimizers(unit, dis, config)
    x_h, x_l = _batch(4, seed=5)
    noise = torch.Generator().manual_seed(0)
    history = [train_iteration(unit, dis, x_h, x_l, weights=FULL, optimizers=optimizers,
                               generator=noise) for _ in range(25)]
    recon = [float(h["recon_h"] + h["recon_l"]) for h in history]
    assert np.mean(recon[-5:]) < 0.7 * np.mean(recon[:3]), recon


def test_scheduler_halves_the_learning_rate_every_lr_step() -> None:
    unit, dis = nets()
    optimizers = make_optimizers(unit, dis, SMOKE.model_copy(update={"lr_step": 2}))
    x_h, x_l = _batch(1)
    for _ in range(4):
        train_iteration(unit, dis, x_h, x_l, weights=FULL, optimizers=optimizers)
    assert optimizers.g.param_groups[0]["lr"] == pytest.approx(SMOKE.lr / 4)
    assert optimizers.d.param_groups[0]["lr"] == pytest.approx(SMOKE.lr / 4)
    group = optimizers.g.param_groups[0]
    assert group["betas"] == (0.5, 0.999) and group["weight_decay"] == 1e-4


# ---- data, samples ------------------------------------------------------------------------------
def test_decode_patch_batch_maps_to_minus_one_one_and_checks_size() -> None:
    arr = patches(3, S, lesion=True, seed=0)
    rows = patch_rows(arr, "lesion")
    batch = {k: np.array([r[k] for r in rows], dtype=object if k == "pixels" else None)
             for k in ("height", "width", "pixels")}
    x = decode_patch_batch(batch, S)
    assert x.shape == (3, 1, S, S) and x.dtype == torch.float32
    np.testing.assert_allclose((x.numpy() + 1) / 2, arr, atol=1e-4)
    with pytest.raises(DataError, match="trains on 16x16"):
        decode_patch_batch(batch, 16)


def test_patch_stream_yields_full_batches_forever_from_a_cached_shard(ray_s3: None) -> None:
    import ray

    arr = patches(10, S, lesion=False, seed=1)
    ds = ray.data.from_items(patch_rows(arr, "normal"))
    ds = ds.select_columns(["height", "width", "pixels"])
    stream = PatchStream(ds, batch_size=4, size=S, seed=0, device=torch.device("cpu"))
    batches = [next(stream) for _ in range(7)]  # epochs of 2 full batches (10 rows)
    assert all(b.shape == (4, 1, S, S) for b in batches)
    flat = {tuple(np.round(r.numpy().ravel()[:8], 4)) for b in batches for r in b}
    assert len(flat) == 10  # every row appears (the tail row of epoch 0 is cached, not lost)
    with pytest.raises(DataError, match="fewer rows than its batch size"):
        next(PatchStream(ds, batch_size=16, size=S, seed=0, device=torch.device("cpu")))


def test_sample_grid_stacks_six_rows_and_shows_what_the_translation_adds() -> None:
    x = torch.rand(3, 1, 8, 8)
    recon = x * 0.5 + 0.25  # what h -> h would give: the blur the translation shares
    lesion = recon.clone()
    lesion[:, :, 3:5, 3:5] -= 0.1  # the translation = the reconstruction plus a lucent spot
    grid = sample_grid(x, recon, lesion, x, 1 - x, pad=1, labels=False)
    assert grid.shape == (6 * 10, 3 * 10) and grid.dtype == np.uint8
    u8 = lambda t: np.round(t.numpy() * 255).astype(np.uint8)  # noqa: E731
    np.testing.assert_array_equal(grid[1:9, 1:9], u8(x[0, 0]))  # row 0: healthy
    np.testing.assert_array_equal(grid[21:29, 11:19], u8(lesion[1, 0]))  # row 2, tile 1: h -> l
    added = grid[31:39, 1:9].astype(int)  # row 3: (h -> l - h -> h) x 4 around mid-grey
    assert np.abs(added[3:5, 3:5] - 0.1 * 255).max() <= 1  # 0.5 - 4 x 0.1: darker = lucent
    assert np.abs(np.r_[added[:3], added[5:]] - 0.5 * 255).max() <= 1  # nothing added: mid-grey
    labelled = sample_grid(x, recon, lesion, x, 1 - x, pad=1)
    assert labelled.shape == (60, GRID_LABEL_WIDTH + 30)
    np.testing.assert_array_equal(labelled[:, GRID_LABEL_WIDTH:], grid)
    assert labelled[:, :GRID_LABEL_WIDTH].min() < 128  # the row names are drawn


# ---- quality signal ------------------------------------------------------------------------------
def test_quality_signal_sees_painted_lesions_and_not_untouched_patches() -> None:
    sets = QualitySets(lesion=patches(48, S, lesion=True, seed=10),
                       normal=patches(48, S, lesion=False, seed=11),
                       source=patches(40, S, lesion=False, seed=12))
    config = CriticConfig(steps=150, seed=0)
    probe, report = QualityProbe.train(sets, config)
    assert report.train_accuracy >= 0.9
    again, _ = QualityProbe.train(sets, config)  # seeded: the same critic
    pairs = zip(probe.critic.parameters(), again.critic.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    identity = probe(lambda p: p.copy())
    assert identity.frac_translated == identity.frac_source <= 0.2 and identity.gain == 0
    painted = probe(lambda p: patches(len(p), S, lesion=True, seed=13))  # a "perfect" translator
    assert painted.frac_translated >= 0.8 and painted.gain >= 0.6
    assert set(painted.as_metrics()) == {"quality/frac_source", "quality/frac_translated",
                                         "quality/gain", "quality/fd_ratio",
                                         "quality/kid_translated", "quality/kid_source",
                                         "quality/kid_ratio"}
    direct = quality_signal(probe.critic, sets.source, patches(40, S, lesion=True, seed=13))
    assert (direct.frac_source, direct.frac_translated) == (painted.frac_source,
                                                           painted.frac_translated)
    # realism: real lesions are near 0, untouched healthy patches near 1, noise far above
    rng = np.random.default_rng(0)
    noise = probe(lambda p: rng.random(p.shape, dtype=np.float32))
    assert painted.fd_ratio < 0.3 and 0.5 < identity.fd_ratio < 2 and noise.fd_ratio > 2
    # KID to the real lesions, against the untranslated sources' (the same in every signal)
    assert identity.kid_ratio == pytest.approx(1.0, abs=0.05) and identity.kid_source > 0
    assert painted.kid_source == identity.kid_source and painted.kid_ratio < 0.1
    assert noise.kid_ratio > 2


def test_youden_threshold_separates_and_standardize_removes_exposure() -> None:
    assert 0.3 < youden_threshold(np.array([0.35, 0.4, 0.9]), np.array([0.1, 0.2, 0.3])) < 0.35
    # overlapping sets: the cut with the largest TPR - FPR (3/4 - 0/3 at 0.45)
    cut = youden_threshold(np.array([0.2, 0.5, 0.6, 0.7]), np.array([0.1, 0.3, 0.4]))
    assert 0.4 < cut <= 0.5
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    brighter = 0.5 * x + 0.3  # another exposure of the same patches
    torch.testing.assert_close(standardize(x), standardize(brighter), atol=1e-5, rtol=1e-5)
    flat = standardize(torch.full((1, 1, 8, 8), 0.7))  # no contrast: (about) zeros, not NaN
    assert flat.abs().max() < 1e-4


def test_critic_ignores_blur_and_noise_and_reports_its_heldout_auc() -> None:
    """Degradations shared by both classes in training: a translator that only blurs or adds
    noise gains (almost) nothing, and the held-out AUC says the critic generalises."""
    sets = QualitySets(lesion=patches(48, S, lesion=True, seed=20),
                       normal=patches(48, S, lesion=False, seed=21),
                       source=patches(40, S, lesion=False, seed=22))
    probe, report = QualityProbe.train(sets, CriticConfig(steps=200, seed=0))
    assert report.heldout_auc is not None and report.heldout_auc >= 0.9
    rng = np.random.default_rng(0)
    for sigma in (1.0, 2.0):
        blurred = probe(lambda p, s=sigma: gaussian_blur(torch.from_numpy(p),
                                                         torch.full((len(p),), s)).numpy())
        assert blurred.gain <= 0.1, (sigma, blurred)
    noisy = probe(lambda p: np.clip(p + rng.normal(0, 0.05, p.shape), 0, 1).astype(np.float32))
    assert noisy.gain <= 0.1, noisy
    assert probe(lambda p: patches(len(p), S, lesion=True, seed=23)).gain >= 0.6
    _, no_holdout = train_critic(sets.lesion, sets.normal, CriticConfig(steps=5, holdout=0))
    assert no_holdout.heldout_auc is None


def test_degrade_is_seeded_and_keeps_shape_and_range() -> None:
    x = torch.from_numpy(patches(6, 32, lesion=True, seed=0))
    config = CriticConfig()
    a = degrade(x, config, torch.Generator().manual_seed(3))
    b = degrade(x, config, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert a.shape == x.shape and not torch.equal(a, x)
    assert a.min() >= 0 and a.max() <= 1  # shifts reflect, blur averages: no new values
    off = CriticConfig(max_blur=0, shift=False)
    flipped = degrade(x, off, torch.Generator().manual_seed(3))  # flips only: same pixel values
    torch.testing.assert_close(flipped.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    # blur with sigma 0 leaves a patch alone; a flat patch stays flat under any blur
    torch.testing.assert_close(gaussian_blur(x, torch.zeros(6)), x, atol=1e-6, rtol=0)
    flat = torch.full((2, 1, 16, 16), 0.4)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([0.5, 2.0])), flat)


def test_critic_downsamples_large_patches() -> None:
    critic, _ = train_critic(patches(8, 64, lesion=True, seed=0),
                             patches(8, 64, lesion=False, seed=1), CriticConfig(size=32, steps=5))
    assert critic(torch.rand(2, 1, 64, 64)).shape == (2,)


# ---- translate, save, register, load -----------------------------------------------------------
def test_translate_patches_is_batched_deterministic_and_restores_the_model() -> None:
    unit, _ = nets()
    translator = unit.translator()
    translator.train()
    src = patches(5, S, lesion=False, seed=3)
    a = translate_patches(translator, src, batch_size=2)
    b = translate_patches(translator, src, batch_size=64)
    assert a.shape == src.shape and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    # oneDNN picks its convolution kernels by batch shape: equal up to float rounding
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert translator.training  # mode restored
    assert translate_patches(translator, src[:0]).shape == (0, 1, S, S)
    # the input is the caller's: out-of-range values are clamped in a copy, and a read-only
    # array (as Ray's object store hands out) is read without a warning
    loud = src * 1.5
    loud.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        translate_patches(translator, loud)
    np.testing.assert_array_equal(loud, src * 1.5)
    with pytest.raises(ValueError, match=r"\(N, 1, S, S\)"):
        translate_patches(translator, src[:, 0])


def test_save_register_load_gives_identical_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from boneaug import storage, tracking

    db = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db.tracking_uri)
    tracking.configure(db)
    mlflow.create_experiment("boneaug/test/unit", artifact_location=str(tmp_path / "artifacts"))
    unit, dis = nets(seed=4)
    optimizers = make_optimizers(unit, dis, SMOKE)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    state = training_state(unit, dis, optimizers, ARCH, SMOKE, iteration=7)
    torch.save(state, checkpoint / "state.pt")
    src = patches(3, S, lesion=False, seed=9)
    with tracking.start_run("boneaug/test/unit", "register", {"unit": SMOKE.model_dump()}):
        version = tracking.log_torch_model(
            unit.translator(), name="translator", input_example=src[:1],
            registered_name="boneaug-unit-tibia", alias="challenger")
    assert version == "1"
    expected = translate_patches(unit.translator(), src)
    registered = load_translator("models:/boneaug-unit-tibia@challenger")
    from_checkpoint = load_translator(str(checkpoint))
    from_file = load_translator(str(checkpoint / "state.pt"))
    for model in (registered, from_checkpoint, from_file):
        np.testing.assert_array_equal(translate_patches(model, src), expected)
    reverse = load_translator(str(checkpoint), direction="l2h")
    np.testing.assert_array_equal(translate_patches(reverse, src),
                                  translate_patches(unit.translator("l2h"), src))
    with pytest.raises(ModelError, match="no UNIT translator"):
        load_translator(str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="not in the registry|cannot load"):
        load_translator("models:/boneaug-unit-femur@challenger")
    assert storage.exists(str(checkpoint / "state.pt"))


def test_checksum_detects_any_difference() -> None:
    a, da = nets(seed=0)
    b, db = nets(seed=0)
    assert checksum(a, da) == checksum(b, db)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-3
    assert checksum(a, da) != checksum(b, db)


# ---- the Ray Train run ---------------------------------------------------------------------------
@pytest.mark.slow
def test_two_worker_run_on_s3_resumes_after_a_failure_and_registers_the_translator(
    s3_bucket: str, ray_s3: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 DDP workers on CPU, checkpoints on the loopback S3 server; rank 1 fails once at
    iteration 3, the worker group restarts from the iteration-2 checkpoint and finishes.

    The failure comes 5 s after the checkpoint: Ray Train V2's controller takes one report per
    worker per health-check poll (every 2 s) and consolidates a checkpoint only when it holds
    every rank's copy; a crash in the same poll round as another rank's slow poll answer (a busy
    machine) drops that round, and the retry starts from the checkpoint before (observed here
    under load with an instant crash)."""
    import faults
    import mlflow
    import ray
    from ray.train import Result

    import boneaug.train.unit as unit_train
    from boneaug import storage, tracking
    from boneaug.train.unit import fit_unit, registered_unit_name

    db = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db.tracking_uri)
    tracking.configure(db)
    experiment = "boneaug/tibia/train_unit"
    mlflow.create_experiment(experiment, artifact_location=str(tmp_path / "artifacts"))

    config = SMOKE  # width 8, batch 4 (2 per worker), 4 iterations, checkpoint every 2
    lesion_arr = patches(16, S, lesion=True, seed=20)
    normal_arr = patches(16, S, lesion=False, seed=21)
    sets = QualitySets(lesion=lesion_arr, normal=normal_arr,
                       source=patches(12, S, lesion=False, seed=22))
    run_uri = f"{s3_bucket}/runs/tibia-smoke"
    name = registered_unit_name("tibia")
    members = [PatchCritic(8, S) for _ in range(2)]  # an instrument that calls every patch
    for member in members:  # lesion, registrable like the phantom critic (an ensemble)
        with torch.no_grad():
            member.head.weight.zero_()
            member.head.bias.fill_(5.0)
    judge = CriticEnsemble(members).eval()
    kwargs = dict(publish=Publish(run_uri, experiment, registered_name=name, alias="challenger",
                                  tracking=db),
                  workers=Workers(num_workers=2, cpus_per_worker=0.5, max_failures=1),
                  quality_sets=sets, critic_config=CriticConfig(steps=40),
                  instrument=(judge, 0.5))
    faults.by_value()
    run = unit_train.run_ray_train
    monkeypatch.setattr(unit_train, "run_ray_train", lambda loop_fn, *args, **kw: run(
        faults.unit_fails_once(loop_fn, iteration=3, rank=1, delay_s=5.0,
                               marker=str(tmp_path / "failed-once")), *args, **kw))
    result = fit_unit(config, ray.data.from_items(patch_rows(lesion_arr, "lesion")),
                      ray.data.from_items(patch_rows(normal_arr, "normal")), **kwargs)
    assert result.iterations == config.iterations == 4
    assert result.model_version == "1" and result.model_uri == f"models:/{name}/1"
    assert 0 <= result.frac_source <= 1 and 0 <= result.frac_translated <= 1
    assert result.fd_ratio is not None and result.fd_ratio > 0 and result.critic_accuracy >= 0.9
    assert result.kid_translated is not None and result.kid_source is not None
    assert result.critic_heldout_auc is not None and 0 <= result.critic_heldout_auc <= 1
    assert result.quality_gain == pytest.approx(result.frac_translated - result.frac_source)
    assert result.instrument == {"translated": 1.0, "source": 1.0, "real_lesion": 1.0}

    # Ray's record of the run: the attempt that finished started from the iteration-2
    # checkpoint, and both ranks held identical weights at every checkpoint
    fs, path = storage.pyarrow_filesystem(f"{run_uri}/unit/train")
    history = Result.from_path(path, storage_filesystem=fs).metrics_dataframe
    assert list(history["iteration"]) == [2, 4]
    assert list(history["resumed_from"]) == [0, 2]
    assert (history["checksum/rank0"] == history["checksum/rank1"]).all()
    assert storage.list_files(f"{run_uri}/unit/train", suffix="state.pt")

    # MLflow: params, each iteration's losses logged exactly once (no replay after the resume),
    # quality signal and sample grids every sample_every, the translator registered
    client = mlflow.MlflowClient(tracking_uri=db.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["unit.width"] == "8" and run.data.params["per_worker_batch"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/g_total")]
    assert sorted(steps) == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "quality/gain")] == [2, 4]
    for key in ("d/auc_l", "d/auc_h", "instrument/translated"):  # D's and the instrument's view
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [2, 4] and all(0 <= m.value <= 1 for m in history)
    samples = [f.path for f in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == ["samples/iter_0000002.png", "samples/iter_0000004.png"]
    # the six labelled rows; 4 tiles each: 2 rows per worker batch, collected over 2 batches
    grid_png = client.download_artifacts(run.info.run_id, samples[-1], str(tmp_path))
    assert Image.open(grid_png).size == (GRID_LABEL_WIDTH + 4 * (S + 4), 6 * (S + 4))
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"

    # the registered translator is the final weights; a checkpoint loads too
    src = sets.source
    registered = translate_patches(load_translator(f"models:/{name}@challenger"), src)
    final = translate_patches(load_translator(result.final_uri), src)
    np.testing.assert_array_equal(registered, final)
    assert not np.allclose(registered, src, atol=1e-2)

    # a finished run is not trained twice
    again = fit_unit(config, ray.data.from_items(patch_rows(lesion_arr, "lesion")),
                     ray.data.from_items(patch_rows(normal_arr, "normal")), **kwargs)
    assert again == result


def test_fit_unit_refuses_local_mode_and_mismatched_patches(ray_s3: None, tmp_path: Path) -> None:
    import ray

    from boneaug.train.unit import fit_unit

    good = ray.data.from_items(patch_rows(patches(4, S, lesion=True, seed=0), "lesion"))
    publish = Publish(str(tmp_path / "run"), "x")
    with pytest.raises(ValueError, match="local mode"):
        fit_unit(SMOKE, good, good, publish=publish, workers=Workers(num_workers=0))
    small = ray.data.from_items(patch_rows(patches(4, 16, lesion=False, seed=0), "normal"))
    one, two = Workers(num_workers=1), Workers(num_workers=2)
    with pytest.raises(DataError, match="normal patches 16"):
        fit_unit(SMOKE, good, small, publish=publish, workers=one)
    with pytest.raises(DataError, match="cannot give 2 workers"):
        fit_unit(SMOKE.model_copy(update={"batch_size": 8}), good, good, publish=publish,
                 workers=two)
    with pytest.raises(DataError, match="lack columns"):
        fit_unit(SMOKE, ray.data.from_items([{"x": 1}]), good, publish=publish, workers=one)

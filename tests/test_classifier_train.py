"""DRN classifier training: decoding, augmentation, steps, init/freeze, a 2-worker Ray run."""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from boneaug.config import DrnConfig, TrackingConfig, load_config
from boneaug.data.arrays import encode_pixels
from boneaug.errors import DataError, ModelError
from boneaug.train.classifier import (
    AffineAugment,
    TrainState,
    apply_init,
    batch_to_arrays,
    build_model,
    load_init_state,
    make_ema,
    make_loss,
    make_optimizer,
    make_scheduler,
    predict,
    train_step,
)
from boneaug.train.distributed import Publish, Workers

H, W = 64, 32


def bone_image(rng: np.random.Generator, lesion: bool, h: int = H, w: int = W) -> np.ndarray:
    """(h, w) float32: a bright vertical bar (bone) on a dim background, noise, and for a
    lesion a dark ellipse inside the bar."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx = w / 2 + rng.uniform(-2, 2)
    half = w * rng.uniform(0.18, 0.24)
    img = 0.15 + 0.6 * (np.abs(xx - cx) < half)
    if lesion:
        cy, ry, rx = rng.uniform(0.3, 0.7) * h, h * rng.uniform(0.08, 0.14), half * 0.7
        img = img - 0.45 * ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) < 1)
    img = img + rng.normal(0, 0.03, size=img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def shard_rows(n: int, *, split: str, task: str, seed: int, pos_every: int = 3) -> list[dict]:
    """Rows with the classification image-shard schema (CONTRACTS.md)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        positive = i % pos_every == 0
        rows.append({
            "image_id": f"{task}-{split}-{i:03d}", "body_part": "humerus", "task": task,
            "split": split, "label": np.int8(positive if task == "lesion" else 0),
            "fracture": np.int8(positive if task == "fracture" else 0),
            "patient_id": f"p{seed}-{i}", "confounders": [], "boxes": [],
            "height": H, "width": W, "pixels": encode_pixels(bone_image(rng, positive)),
            "scale": np.float32(1.0), "pad_x": np.int32(0), "pad_y": np.int32(0),
        })
    return rows


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows], dtype=object if k == "pixels" else None)
            for k in ("image_id", "height", "width", "pixels", "label")}


def test_batch_to_arrays_decodes_pixels_and_checks_size() -> None:
    rows = shard_rows(4, split="train", task="lesion", seed=1)
    images, labels, ids = batch_to_arrays(_columns(rows), label_column="label", image_size=(H, W))
    assert images.shape == (4, 1, H, W) and images.dtype == np.float32
    assert labels.tolist() == [1.0, 0.0, 0.0, 1.0] and ids[0] == "lesion-train-000"
    expected = bone_image(np.random.default_rng(1), True)
    np.testing.assert_allclose(images[0, 0], expected, atol=1 / 65535)
    with pytest.raises(DataError, match="re-run ingest"):
        batch_to_arrays(_columns(rows), label_column="label", image_size=(2 * H, W))


def test_affine_augment_is_seeded_per_image_and_keeps_shape(one_thread: None) -> None:
    x = torch.from_numpy(np.stack([bone_image(np.random.default_rng(i), True) for i in range(4)]))
    x = x[:, None]
    augment = AffineAugment()
    a = augment(x, torch.Generator().manual_seed(7))
    b = augment(x, torch.Generator().manual_seed(7))
    c = augment(x, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x) and 0 <= float(a.min()) and float(a.max()) <= 1
    flip = AffineAugment(degrees=0, scale=(1, 1), translate=0, hflip=1.0)
    assert torch.equal(flip(x, torch.Generator()), x.flip(-1))
    with pytest.raises(ValueError, match="invalid augmentation"):
        AffineAugment(scale=(1.2, 1.1))


def test_a_few_steps_on_synthetic_bones_lower_the_loss(one_thread: None) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = np.array([1, 0, 0, 0] * 4, dtype=np.float32)
    images = np.stack([bone_image(rng, bool(y)) for y in labels])[:, None]
    config = DrnConfig(arch="drn_d_22", width_mult=0.125, epochs=1, pretrain_epochs=1, lr=1e-3)
    model = build_model(config, generator=torch.Generator().manual_seed(0))
    optimizer = make_optimizer(model, config)
    loss_fn = make_loss(pos_weight=3.0)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    losses = [train_step(model, x, y, optimizer=optimizer, loss_fn=loss_fn) for _ in range(20)]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    scores = predict(model, images, batch_size=5)
    assert scores.shape == (16,) and model.training  # predict restores the mode


def test_max_grad_norm_clips_the_step_gradients(one_thread: None) -> None:
    rng = np.random.default_rng(0)
    labels = np.array([1, 0, 0, 0], dtype=np.float32)
    x = torch.from_numpy(np.stack([bone_image(rng, bool(y)) for y in labels])[:, None])
    y = torch.from_numpy(labels)
    config = DrnConfig(arch="drn_d_22", width_mult=0.125, epochs=1, pretrain_epochs=1)

    def grad_norm(clip: float | None) -> float:
        model = build_model(config, generator=torch.Generator().manual_seed(0))
        train_step(model, x, y, optimizer=make_optimizer(model, config),
                   loss_fn=make_loss(pos_weight=3.0), max_grad_norm=clip)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    free = grad_norm(None)
    assert free > 0.02
    assert grad_norm(0.01) == pytest.approx(0.01, rel=1e-3)
    assert grad_norm(10 * free) == pytest.approx(free, rel=1e-5)  # a loose cap changes nothing


def test_predict_is_batch_size_invariant_and_in_unit_interval(one_thread: None) -> None:
    torch.manual_seed(0)
    model = build_model(DrnConfig(width_mult=0.125, epochs=1, pretrain_epochs=1)).eval()
    images = np.random.default_rng(0).random((5, 1, H, W), dtype=np.float32)
    a, b = predict(model, images, batch_size=1), predict(model, images, batch_size=5)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert ((a > 0) & (a < 1)).all()
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        predict(model, images[:, 0])


def test_plateau_scheduler_decays_lr_and_early_stopping_counts() -> None:
    config = DrnConfig(width_mult=0.125, epochs=20, pretrain_epochs=1, plateau_patience=1,
                       early_stop_patience=3)
    optimizer = make_optimizer(build_model(config), config)
    scheduler = make_scheduler(optimizer, config)
    state = TrainState()
    stops = []
    for epoch, auc in enumerate([0.6, 0.7, 0.72, 0.65, 0.69, 0.8, 0.7, 0.7, 0.7]):
        state.update(epoch, auc)
        scheduler.after_batch()  # the plateau schedule moves per epoch only
        scheduler.after_epoch(auc)
        stops.append(state.should_stop(config))
    assert state.best_auc == 0.8 and state.best_epoch == 5
    assert stops.index(True) == 8  # three epochs without improvement after epoch 5
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.9**2)
    assert make_scheduler(optimizer, config.model_copy(update={"lr_decay": 1.0})).scheduler is None


def test_keeping_the_last_epoch_never_stops_early_and_reports_the_kept_model() -> None:
    config = DrnConfig(width_mult=0.125, epochs=20, pretrain_epochs=1, early_stop_patience=2,
                       checkpoint="last")
    state = TrainState()
    kept = [state.update(epoch, auc, latest=config.checkpoint == "last")
            for epoch, auc in enumerate([0.8, 0.7, 0.6, 0.65])]
    assert all(kept) and not state.should_stop(config)
    assert (state.best_epoch, state.best_auc) == (3, 0.65)  # the last epoch's, not the max


@pytest.mark.parametrize(("losses", "diverged"), [
    ([0.745, 0.74, 0.81, 0.84, 0.828], True),  # the humerus baseline that went constant
    ([0.957, 0.944, 0.833, 0.981, 0.745], False),  # a noisy run that learned
    ([1.2], False),  # one epoch: nothing to compare
])
def test_a_run_whose_train_loss_ends_no_lower_than_it_began_counts_as_diverged(
    losses: list[float], diverged: bool
) -> None:
    state = TrainState()
    for epoch, loss in enumerate(losses):
        state.update(epoch, 0.5, latest=True, loss=loss)
    assert state.diverged is diverged
    assert state.train_losses == losses and state.val_aucs == [0.5] * len(losses)
    assert TrainState(**asdict(state)).diverged is diverged  # it survives a checkpoint


@pytest.mark.parametrize(("aucs", "latest", "unlearned"), [
    ([0.689, 0.70, 0.66, 0.623], True, True),  # the scarce humerus baseline of seed 2
    ([0.688, 0.70, 0.74, 0.776], True, False),  # its seed 0, which learned
    ([0.80, 0.75, 0.70], False, True),  # best-checkpointing keeps epoch 1: nothing learned
    ([0.7], True, False),  # one epoch: nothing to compare
])
def test_a_run_whose_kept_model_validates_no_better_than_epoch_one_counts_as_unlearned(
    aucs: list[float], latest: bool, unlearned: bool
) -> None:
    state = TrainState()
    for epoch, auc in enumerate(aucs):
        state.update(epoch, auc, latest=latest, loss=1.0 - 0.1 * epoch)  # the loss falls
    assert state.unlearned is unlearned and not state.diverged
    assert TrainState(**asdict(state)).unlearned is unlearned  # it survives a checkpoint


def test_cosine_schedule_warms_up_then_decays_each_group_to_zero() -> None:
    config = DrnConfig(width_mult=0.125, epochs=4, pretrain_epochs=1, lr=1e-3, head_lr=4e-3,
                       schedule="cosine", warmup_epochs=1)
    optimizer = make_optimizer(build_model(config), config)
    heads = [g for g in optimizer.param_groups if g["lr"] == 4e-3]
    assert len(optimizer.param_groups) == 2 and len(heads) == 1  # the head is its own group
    schedule = make_scheduler(optimizer, config, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.after_batch()
        schedule.after_epoch(0.5)  # ignored by the cosine schedule
    body, head = np.array(lrs).T
    assert body[0] == pytest.approx(1e-4) and body[9] == pytest.approx(1e-3)  # linear warm-up
    assert np.all(np.diff(body[9:]) <= 0) and body[-1] < 0.01 * 1e-3  # cosine down to ~0
    np.testing.assert_allclose(head, 4 * body)  # one schedule, both groups
    with pytest.raises(ValueError, match="needs schedule='cosine'"):
        DrnConfig(epochs=4, pretrain_epochs=1, warmup_epochs=1)


def test_ema_follows_the_weights_with_its_decay(one_thread: None) -> None:
    config = DrnConfig(width_mult=0.125, epochs=1, pretrain_epochs=1, ema_decay=0.5)
    model = build_model(config, generator=torch.Generator().manual_seed(0))
    ema = make_ema(model, config)
    assert ema is not None and make_ema(model, config.model_copy(update={"ema_decay": None})) \
        is None
    start = model.fc.weight.detach().clone()
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    ema.update_parameters(model)  # then 0.5 old + 0.5 new
    torch.testing.assert_close(ema.module.fc.weight, start + 1.5)


def test_init_from_file_copies_the_backbone_and_reinitialises_the_head(tmp_path: Path) -> None:
    config = DrnConfig(width_mult=0.125, epochs=1, pretrain_epochs=1)
    source = build_model(config, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        source.fc.bias.fill_(3.0)
    torch.save(source.state_dict(), tmp_path / "best_model.pt")
    state = load_init_state(str(tmp_path))  # a run directory holding best_model.pt
    target = apply_init(build_model(config, generator=torch.Generator().manual_seed(2)), state)
    assert torch.equal(target.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert float(target.fc.bias.detach()) == 0.0
    wide = build_model(config.model_copy(update={"width_mult": 0.25}))
    with pytest.raises(ModelError, match="same arch and width_mult"):
        apply_init(wide, state)
    with pytest.raises(ModelError, match="fracture pre-training"):
        load_init_state(str(tmp_path / "nothing-here"))


# ---- the Ray Train run -------------------------------------------------------------------------
@pytest.mark.slow
def test_fracture_pretraining_then_two_worker_finetuning_registers_and_reloads(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    import ray

    from boneaug import storage, tracking
    from boneaug.train.classifier import (
        FRACTURE_MODEL,
        ClassifierData,
        fit_classifier,
        load_best_model,
        pretrain_fracture,
    )

    db = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db.tracking_uri)  # restored after the test
    config = load_config("smoke").drn.model_copy(update={"epochs": 2, "batch_size": 8})
    two = Workers(num_workers=2, cpus_per_worker=0.5)

    fracture = ray.data.from_items(
        shard_rows(16, split="train", task="fracture", seed=10, pos_every=2)
        + shard_rows(8, split="val", task="fracture", seed=11, pos_every=2)
        + shard_rows(4, split="test", task="fracture", seed=12, pos_every=2)
        + shard_rows(4, split="train", task="lesion", seed=13)  # not fracture rows: ignored
    )
    pre = pretrain_fracture(
        config, fracture, workers=Workers(num_workers=0), image_size=(H, W),
        publish=Publish(str(tmp_path / "fracture"), "boneaug/fracture/pretrain",
                        registered_name=FRACTURE_MODEL, tracking=db))
    assert pre.model_version == "1" and pre.model_uri == "models:/boneaug-drn-fracture/1"
    assert pre.epochs_run == config.pretrain_epochs == 1

    train_rows = shard_rows(18, split="train", task="lesion", seed=1)
    val_rows = shard_rows(9, split="val", task="lesion", seed=2)
    test_rows = shard_rows(6, split="test", task="lesion", seed=3)
    run_uri = str(tmp_path / "humerus")
    publish = Publish(run_uri, "boneaug/humerus/train_classifier",
                      registered_name="boneaug-drn-humerus", alias="challenger", tracking=db)
    data = ClassifierData(ray.data.from_items(train_rows), ray.data.from_items(val_rows))
    result = fit_classifier(
        config, replace(data, test=ray.data.from_items(test_rows)), publish=publish,
        workers=two, init_from=pre.model_uri, image_size=(H, W),
    )
    assert result.model_version == "1" and result.epochs_run == 2
    assert 0 <= result.best_val_auc <= 1 and 0 <= result.best_epoch < result.epochs_run

    # the registered model is the best model: same outputs, bit for bit
    registered = tracking.load_torch_model("models:/boneaug-drn-humerus@challenger", tracking=db)
    best = load_best_model(result, config)
    images, labels, ids = batch_to_arrays(_columns(val_rows + test_rows), label_column="label",
                                          image_size=(H, W))
    with torch.no_grad():
        x = torch.from_numpy(images)
        assert torch.equal(registered(x), best(x))

    # fine-tuning touched only stages 7-8 and the head; the rest is the fracture model
    fracture_model = tracking.load_torch_model(pre.model_uri, tracking=db)
    src, dst = fracture_model.state_dict(), best.state_dict()
    frozen = [k for k in dst if not k.startswith(("layer7.", "layer8.", "fc."))]
    assert frozen and all(torch.equal(src[k], dst[k]) for k in frozen)
    assert not torch.equal(src["fc.weight"], dst["fc.weight"])

    # predictions: every val/test row once, scores = predict(best model)
    table = storage.read_parquet(result.predictions_uri).to_pandas()
    assert sorted(table["image_id"]) == sorted(ids)
    assert table.groupby("split").size().to_dict() == {"test": 6, "val": 9}
    table = table.set_index("image_id").loc[ids]
    np.testing.assert_allclose(table["score"], predict(best, images), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(table["label"], labels.astype(np.int8))
    from sklearn.metrics import roc_auc_score
    val = table[table["split"] == "val"]
    assert roc_auc_score(val["label"], val["score"]) == pytest.approx(result.best_val_auc)

    # MLflow: config + counts as params, one val_auc per epoch, checkpoints in the run's storage
    client = mlflow.MlflowClient(tracking_uri=db.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["drn.arch"] == config.arch and run.data.params["data.train_pos"] == "6"
    assert run.data.params["pos_weight"] == "2.0"
    logged = sorted(client.get_metric_history(run.info.run_id, "val_auc"), key=lambda m: m.step)
    assert len(logged) == result.epochs_run == len(result.train_losses)  # the manifest's history
    assert result.val_aucs == pytest.approx([m.value for m in logged])
    assert run.data.tags["predictions_uri"] == result.predictions_uri
    assert storage.list_files(storage.join(run_uri, "ray"), suffix="state.pt")

    # a finished run URI is not trained twice
    again = fit_classifier(config, data, publish=replace(publish, experiment="x"),
                           workers=two, image_size=(H, W))
    assert again == result

    # resume: without the manifest, the same run URI continues from its last Ray checkpoint
    storage.remove(storage.join(run_uri, storage.MANIFEST))
    longer = fit_classifier(config, data, publish=replace(publish, alias=None), workers=two,
                            init_from=pre.model_uri, image_size=(H, W), epochs=3)
    assert longer.epochs_run == 3 and longer.model_version == "2"
    assert longer.train_losses[:2] == result.train_losses  # the history survives the resume
    assert longer.best_val_auc >= result.best_val_auc
    history = client.get_metric_history(longer.mlflow_run_id, "val_auc")
    assert [m.step for m in history] == [2]  # only the new epoch was trained


@pytest.mark.slow
def test_local_mode_run_writes_its_outputs_to_s3(
    ray_session: None, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Train's local mode (num_workers=0, in this process) against the loopback S3 server;
    without a registered name the model is only logged in the run."""
    import ray

    from boneaug import storage, tracking
    from boneaug.train.classifier import ClassifierData, fit_classifier, load_best_model

    db = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db.tracking_uri)
    config = load_config("smoke").drn.model_copy(update={"epochs": 1})
    run_uri = f"{s3_bucket}/runs/r1/classifier-humerus"
    result = fit_classifier(
        config, ClassifierData(
            ray.data.from_items(shard_rows(9, split="train", task="lesion", seed=4)),
            ray.data.from_items(shard_rows(6, split="val", task="lesion", seed=5))),
        publish=Publish(run_uri, "boneaug/humerus/smoke", tracking=db),
        workers=Workers(num_workers=0), image_size=(H, W),
    )
    assert result.model_version is None and result.model_uri.startswith("runs:/")
    assert result.predictions_uri == f"{run_uri}/predictions.parquet"
    assert storage.read_manifest(run_uri)["best_val_auc"] == result.best_val_auc
    table = storage.read_parquet(result.predictions_uri)
    assert table.num_rows == 6 and set(table.column("split").to_pylist()) == {"val"}
    logged = tracking.load_torch_model(result.model_uri, tracking=db)
    best = load_best_model(result, config)  # best_model.pt read back from S3
    x = torch.rand(2, 1, H, W, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(logged(x), best(x))


@pytest.mark.slow
def test_full_finetuning_with_ema_publishes_the_averaged_weights_it_validated(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local profile's regime: every stage trains, a faster head, warm-up and cosine, and
    an EMA of the weights that validation judges and the registry receives."""
    import ray

    from boneaug import storage, tracking
    from boneaug.train.classifier import ClassifierData, fit_classifier, load_best_model

    db = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db.tracking_uri)
    base = load_config("smoke").drn
    init = build_model(base, generator=torch.Generator().manual_seed(7))
    torch.save(init.state_dict(), tmp_path / "best_model.pt")  # stands in for the fracture model
    config = base.model_copy(update={
        "epochs": 3, "finetune_blocks": 8, "lr": 1e-3, "head_lr": 3e-3, "schedule": "cosine",
        "warmup_epochs": 1.0, "ema_decay": 0.9})
    val_rows = shard_rows(9, split="val", task="lesion", seed=2)
    result = fit_classifier(
        config, ClassifierData(
            ray.data.from_items(shard_rows(18, split="train", task="lesion", seed=1)),
            ray.data.from_items(val_rows)),
        publish=Publish(str(tmp_path / "run"), "boneaug/humerus/ema",
                        registered_name="boneaug-drn-ema", tracking=db),
        workers=Workers(num_workers=0), init_from=str(tmp_path), image_size=(H, W),
    )
    best = load_best_model(result, config)
    registered = tracking.load_torch_model(result.model_uri, tracking=db)
    images, labels, ids = batch_to_arrays(_columns(val_rows), label_column="label",
                                          image_size=(H, W))
    with torch.no_grad():
        assert torch.equal(registered(torch.from_numpy(images)), best(torch.from_numpy(images)))
    # every stage moved from its initialisation (nothing frozen)
    moved = [k for k, v in init.state_dict().items()
             if k.endswith("weight") and not torch.equal(v, best.state_dict()[k])]
    assert {k.split(".")[0] for k in moved} >= {"layer0", "layer1", "layer4", "layer8", "fc"}
    # the stored val scores are the published (averaged) model's, and the AUC the trainer chose by
    table = storage.read_parquet(result.predictions_uri).to_pandas().set_index("image_id").loc[ids]
    np.testing.assert_allclose(table["score"], predict(best, images), rtol=1e-5, atol=1e-6)
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(labels, table["score"]) == pytest.approx(result.best_val_auc)
    # the learning rate followed the warm-up and the cosine: it ends near 0
    client = mlflow_client(db)
    lrs = [m.value for m in client.get_metric_history(result.mlflow_run_id, "lr")]
    assert len(lrs) == 3 and lrs[0] > lrs[-1] and lrs[-1] < 0.3 * config.lr


def test_validating_every_third_epoch_trains_the_very_same_model(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`val_every` skips scoring the validation split, nothing else: the same seed publishes the
    same weights, and the epochs it does validate (first, every third, last) read the same."""
    import ray

    from boneaug.train.classifier import ClassifierData, fit_classifier, load_best_model, validates

    assert [e for e in range(8) if validates(e, 8, 3)] == [0, 2, 5, 7]
    db = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db.tracking_uri)
    base = load_config("smoke").drn.model_copy(update={
        "epochs": 4, "finetune_blocks": 8, "schedule": "cosine", "checkpoint": "last",
        "ema_decay": 0.9})
    data = ClassifierData(ray.data.from_items(shard_rows(18, split="train", task="lesion", seed=1)),
                          ray.data.from_items(shard_rows(9, split="val", task="lesion", seed=2)))

    def fit(every: int):  # noqa: ANN202 - a test helper
        config = base.model_copy(update={"val_every": every})
        return config, fit_classifier(
            config, data, publish=Publish(str(tmp_path / f"every{every}"), "boneaug/val-every",
                                          tracking=db),
            workers=Workers(num_workers=0, torch_threads=1), init_from=None,
            image_size=(H, W))

    (config, each), (_, third) = fit(1), fit(3)
    assert all(np.isfinite(each.val_aucs))
    assert np.isnan(third.val_aucs[1]) and third.val_aucs[0] == each.val_aucs[0]
    assert third.val_aucs[2:] == each.val_aucs[2:] and third.best_val_auc == each.best_val_auc
    assert third.train_losses == each.train_losses
    a, b = (load_best_model(r, config).state_dict() for r in (each, third))
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = mlflow_client(db).get_metric_history(third.mlflow_run_id, "val_auc")
    assert [m.step for m in history] == [0, 2, 3]  # no NaN logged for the skipped epoch
    with pytest.raises(ValueError, match="val_every=3 needs schedule='cosine' and "
                                         "checkpoint='last'"):
        DrnConfig.model_validate(base.model_dump() | {"val_every": 3, "checkpoint": "best"})


def mlflow_client(db: TrackingConfig):  # noqa: ANN201 - a test helper
    import mlflow

    return mlflow.MlflowClient(tracking_uri=db.tracking_uri)


def test_step_matched_scales_epochs_to_the_baselines_steps_only_when_asked() -> None:
    from boneaug.train.classifier import step_matched

    same = load_config("smoke").drn.model_copy(update={"epochs": 24})
    steps = same.model_copy(update={"augmented_epochs": "baseline_steps"})
    assert step_matched(same, rows=929, baseline_rows=668) is same  # the paper: 24 epochs
    # the humerus oracle's 261 blends beside 668 real rows: 17 epochs of 929 rows, the steps
    # of 24 epochs of 668
    assert step_matched(steps, rows=929, baseline_rows=668).epochs == 17
    # the learning curve's 25 % point (67 of 268 positives beside 400 negatives): 34 epochs
    assert step_matched(steps, rows=467, baseline_rows=668).epochs == 34
    assert step_matched(steps, rows=668, baseline_rows=668) is steps
    assert step_matched(steps, rows=10_001, baseline_rows=1).epochs == 1
    with pytest.raises(ValueError, match="rows must be > 0"):
        step_matched(steps, rows=0, baseline_rows=668)


def test_train_drn_at_baseline_steps_scales_the_epochs_of_arms_and_curve_points(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chain's `train_drn` counts the rows it kept and scales the epochs of an augmented DRN
    and of a learning-curve point to the baseline's steps: 24 real + 24 augmented rows take 2
    of 4 epochs."""
    import pyarrow as pa

    from boneaug import storage
    from boneaug.workflow import drn_publish, train_drn

    db = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db.tracking_uri)
    run = str(tmp_path / "run")
    rows = (shard_rows(24, split="train", task="lesion", seed=1)
            + shard_rows(9, split="val", task="lesion", seed=2)
            + shard_rows(6, split="test", task="lesion", seed=3)
            + [r | {"image_id": f"extra-{i:03d}", "label": np.int8(1)}  # the curve's 2x draws
               for i, r in enumerate(shard_rows(8, split="extra", task="lesion", seed=5))])
    storage.write_parquet(storage.join(run, "images", "part-0.parquet"), pa.Table.from_pylist(rows))
    storage.publish_manifest(storage.join(run, "images"), {"rows": len(rows)})
    blends = [r | {"image_id": f"blend-{i:03d}", "label": np.int8(1)}
              for i, r in enumerate(shard_rows(24, split="train", task="lesion", seed=4))]
    config = load_config("smoke", overrides={
        "image": {"height": H, "width": W}, "compute": {"num_workers": 0},
        "tracking": {"tracking_uri": db.tracking_uri},
        "drn": {"epochs": 4, "augmented_epochs": "baseline_steps"}})
    torch.save(build_model(config.drn).state_dict(), tmp_path / "init.pt")

    def epochs(cfg, augmented: pa.Table | None, positives: float = 1.0) -> int:  # noqa: ANN001
        trained = train_drn(cfg, run, drn_publish(run, "drn", "boneaug/test/steps"),
                            augmented=augmented, init_from=str(tmp_path / "init.pt"), seed=0,
                            positives=positives)
        return len(trained["train_losses"])

    assert epochs(config, pa.Table.from_pylist(blends)) == 2
    assert epochs(config, None) == 4  # the baseline itself keeps its epochs
    # learning-curve points: 2 of the 8 positives (18 rows) take 5 epochs, all 8 and 8 extra
    # ones (32 rows) take 3: each about the baseline's 96 row-steps
    assert epochs(config, None, positives=0.25) == 5
    assert epochs(config, None, positives=2.0) == 3
    same = config.model_copy(update={"drn": config.drn.model_copy(
        update={"augmented_epochs": "same"})})
    assert epochs(same, pa.Table.from_pylist(blends)) == 4

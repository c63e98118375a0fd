"""The phantom lesion critic (boneaug.eval.phantom_critic): pairs that differ only by a lesion,
a critic that learns the lesion from them, and its validation on healthy patches."""

from __future__ import annotations

import numpy as np
import pytest

from boneaug.config import SynthConfig, load_config
from boneaug.eval.phantom_critic import (
    paired_patches,
    perturbations,
    train_phantom_critic,
    validate,
)
from boneaug.eval.quality import CriticConfig

SIZE = 32


@pytest.fixture(scope="module")
def synth() -> SynthConfig:
    return load_config("smoke").synth.model_copy(update={"min_conspicuity": 0.5})


@pytest.fixture(scope="module")
def pairs(synth: SynthConfig):  # noqa: ANN201 - a PairSet
    return paired_patches(synth, "humerus", n=160, size=SIZE, s=2.0)


def test_a_pair_differs_only_inside_its_lesion_box(pairs) -> None:  # noqa: ANN001
    assert pairs.lesion.shape == pairs.healthy.shape and len(pairs.lesion) >= 150
    assert pairs.lesion.shape[1:] == (1, SIZE, SIZE)
    peaks = []
    for lesion, healthy, (x0, y0, x1, y1) in zip(pairs.lesion, pairs.healthy, pairs.boxes,
                                                 strict=True):
        diff = np.abs(lesion[0] - healthy[0])
        outside = np.ones_like(diff, bool)
        # the box in patch pixels, grown by the resize's reach (antialiased bilinear: 2 px)
        outside[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = False
        assert diff[outside].max() < 1e-6
        peaks.append(diff.max())
        # the patch rule: the crop holds the whole box
        assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
    assert min(peaks) > 0 and np.median(peaks) > 0.03  # the lesion changes its box


def test_pairs_are_seeded_and_never_the_cohorts_own_images(synth: SynthConfig, pairs) -> None:  # noqa: ANN001
    again = paired_patches(synth, "humerus", n=8, size=SIZE, s=2.0)
    assert np.array_equal(again.lesion, pairs.lesion[:8])
    with pytest.raises(ValueError, match="must not be the cohort itself"):
        paired_patches(synth, "humerus", n=8, size=SIZE, s=2.0, seed=synth.seed)


def test_the_critic_learns_the_lesion_and_ignores_label_free_changes(pairs) -> None:  # noqa: ANN001
    critic, heldout = train_phantom_critic(pairs, CriticConfig(steps=300, holdout=0.0, seed=0))
    assert heldout > 0.6  # on pairs it never saw (chance: 0.5; smoke lesions are a few px)
    half = len(pairs.lesion) // 2
    v = validate(critic, heldout_pair_auc=heldout, lesion=pairs.lesion[half:],
                 normal=pairs.healthy[half:],
                 translators={"identity": lambda x: x, "darken": lambda x: x * 0.7})
    assert v.real_auc > 0.6
    assert set(v.perturbed_rates) == set(perturbations())
    assert v.translated_rates["identity"] == pytest.approx(v.healthy_rate)
    assert v.worst_rise == max(r - v.healthy_rate for r in v.perturbed_rates.values())
    lesions = validate(critic, heldout_pair_auc=heldout, lesion=pairs.lesion[half:],
                       normal=pairs.healthy[half:],
                       translators={"paints lesions": lambda x: pairs.lesion[half:]})
    assert lesions.translated_rates["paints lesions"] > lesions.healthy_rate + 0.2
    assert lesions.worst_rise == v.worst_rise  # a lesion painter is no false alarm


def test_a_pair_is_drawn_and_degraded_as_one() -> None:
    import torch

    from boneaug.eval.quality import paired_batch

    gen = torch.Generator().manual_seed(0)
    patches = torch.rand(16, 1, SIZE, SIZE, generator=gen)
    config = CriticConfig(max_blur=2.0)
    # twins that are the same image: whatever flips, shift and blur one gets, the other gets
    x = paired_batch(patches, patches.clone(), 8, config, gen)
    assert x.shape == (16, 1, SIZE, SIZE)
    torch.testing.assert_close(x[:8], x[8:], rtol=0, atol=0)
    assert not any(torch.equal(x[0], p) for p in patches)  # degraded: not the stored patch
    # a real pair differs in its lesion box alone, and so do its two degraded patches (the
    # transforms are linear): patches drawn or degraded apart would differ everywhere
    lesion = patches.clone()
    lesion[:, :, 10:20, 10:20] += 0.5
    x = paired_batch(lesion, patches, 8, config, torch.Generator().manual_seed(1))
    changed = ((x[:8] - x[8:]).abs() > 1e-6).flatten(1).float().mean(1)
    assert bool((changed > 0.05).all()) and bool((changed < 0.75).all())


def test_the_ensemble_calls_the_mean_of_its_members_probabilities() -> None:
    import torch

    from boneaug.eval.quality import CriticEnsemble, PatchCritic, lesion_probability

    torch.manual_seed(0)
    members = [PatchCritic(8, SIZE).eval() for _ in range(3)]
    ensemble = CriticEnsemble(members).eval()
    x = np.random.default_rng(0).random((5, 1, SIZE, SIZE), dtype=np.float32)
    mean = np.mean([lesion_probability(m, x) for m in members], axis=0)
    np.testing.assert_allclose(lesion_probability(ensemble, x), mean, rtol=1e-5)
    assert ensemble.spec == {"kind": "critic_ensemble", "members": 3, "width": 8, "size": SIZE}
    with pytest.raises(ValueError, match="at least one member"):
        CriticEnsemble([])


def test_the_registered_critic_comes_back_with_its_cut_or_none(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import torch

    from boneaug import tracking
    from boneaug.config import TrackingConfig
    from boneaug.eval.phantom_critic import registered_critic
    from boneaug.eval.quality import CriticEnsemble, PatchCritic

    db = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db.tracking_uri)
    tracking.configure(db)
    assert registered_critic("humerus") is None  # jobs/train_critic.py has not run

    torch.manual_seed(0)
    critic = CriticEnsemble([PatchCritic(8, SIZE) for _ in range(2)]).eval()
    with tracking.start_run("boneaug/humerus/critic", "boneaug-critic-humerus", {}):
        version = tracking.log_torch_model(
            critic, name="critic", input_example=np.zeros((1, 1, SIZE, SIZE), np.float32),
            registered_name="boneaug-critic-humerus", alias="champion")
    tracking.set_version_tag("boneaug-critic-humerus", str(version), "lesion_threshold", "0.625")
    back = registered_critic("humerus")
    assert back is not None and back.threshold == 0.625
    x = torch.rand(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back.model(x), critic(x))
    assert registered_critic("tibia") is None

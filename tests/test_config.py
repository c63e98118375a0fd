from __future__ import annotations

import re
from pathlib import Path

import pytest

from boneaug.config import BODY_PARTS, PROFILES, dump_config, load_config
from boneaug.errors import ConfigError


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_load_and_round_trip_through_yaml(profile: str, tmp_path: Path) -> None:
    config = load_config(profile)
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    assert load_config(path=path) == config


def test_paper_profile_has_table_1_sizes_and_reference_unit() -> None:
    config = load_config("paper")
    tibia = config.synth.counts["tibia"]
    assert ((tibia.train_pos, tibia.train_neg, tibia.val_pos, tibia.val_neg)
            == (214, 14482, 22, 1628))
    assert config.patches.body_parts["humerus"].s == 2 and config.patches.body_parts["tibia"].n == 7
    assert (config.image.height, config.image.width, config.patches.size) == (1024, 512, 256)
    assert (config.unit.width == 64 and config.unit.lambda_gan == 10
            and config.unit.lambda_cyc == 100)


def test_local_profile_keeps_the_papers_ratios() -> None:
    counts = load_config("local").synth.counts
    assert counts["femur"].train_pos < counts["tibia"].train_pos < counts["humerus"].train_pos
    for part in BODY_PARTS:
        # 3x Table 1's test positives: a finer instrument, the training sets keep the ratios
        assert counts[part].test_pos == 150 and counts[part].test_neg == 500
        assert counts[part].val_pos >= 20 and counts[part].val_neg >= 200


def test_the_scarce_humerus_config_takes_a_quarter_of_the_positives_and_nothing_else() -> None:
    path = Path(__file__).resolve().parents[1] / "jobs" / "humerus_scarce.yaml"
    local, scarce = load_config("local"), load_config("local", path)
    full, few = local.synth.counts["humerus"], scarce.synth.counts["humerus"]
    assert (few.train_pos, few.extra_pos) == (round(full.train_pos / 4), 0)
    assert few.model_copy(update={"train_pos": full.train_pos, "extra_pos": full.extra_pos}) == full
    assert scarce.synth.model_copy(update={"counts": local.synth.counts}) == local.synth
    assert all(scarce.synth.counts[p] == local.synth.counts[p]
               for p in BODY_PARTS if p != "humerus")
    assert scarce.drn.lr == local.drn.lr / 2 and scarce.drn.head_lr == local.drn.head_lr / 2
    assert scarce.model_copy(update={"synth": local.synth, "drn": local.drn}) == local
    lrs = {"lr": local.drn.lr, "head_lr": local.drn.head_lr}
    assert scarce.drn.model_copy(update=lrs) == local.drn


def test_yaml_overrides_and_explicit_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "best.yaml"
    path.write_text("profile: smoke\nunit:\n  lambda_gan: 1.0\naugment:\n  blend_n: 4\n")
    config = load_config("local", path, overrides={"unit": {"lr": 2e-4}})
    assert config.profile == "smoke"
    assert config.unit.lambda_gan == 1.0 and config.unit.lr == 2e-4
    assert config.augment.blend_n == 4
    assert config.unit.width == load_config("smoke").unit.width


def test_errors_name_the_file_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("unit:\n  lambda_gan: -1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml[\s\S]*lambda_gan"):
        load_config("smoke", path)
    path.write_text("unit:\n  no_such_field: 1\n")
    with pytest.raises(ConfigError, match="no_such_field"):
        load_config("smoke", path)
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        load_config("huge")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="n_shared=5 exceeds n_res=2"):
        load_config("local", overrides={"unit": {"n_shared": 5}})


def test_scaled_counts_keep_nonzero_classes() -> None:
    counts = load_config("local").synth.counts["femur"].scaled(0.01)
    assert counts.train_pos == 1 and counts.test_neg == 5


def test_job_grids_parse_or_say_what_is_wrong() -> None:
    from boneaug.runtime import parse_seeds, parse_thresholds

    assert parse_thresholds("0.70,0.85,0.90,0.95") == (0.70, 0.85, 0.90, 0.95)
    assert parse_thresholds(None) is None and parse_seeds("") == ()
    assert parse_seeds("0,1,2") == (0, 1, 2)
    for bad, message in (("0.7,high", "comma-separated numbers"), ("0.7,1.5", "in [0, 1]"),
                         ("0.9,0.9", "distinct")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            parse_thresholds(bad)
    with pytest.raises(SystemExit, match="repeats a seed"):
        parse_seeds("1,1")

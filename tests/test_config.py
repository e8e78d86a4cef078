import pytest
from conftest import default_run_config
from pydantic import ValidationError

from common.config import ConfigError, RunConfig, build_config


def test_pyproject_defaults_validate_and_match_the_model():
    rc = default_run_config()
    cfg = build_config(rc)
    # Every pyproject key is a field, and every field has a pyproject default.
    assert set(cfg.to_flat()) == set(rc)
    for key, value in rc.items():
        assert cfg.to_flat()[key] == value, key


def test_unknown_key_is_named():
    with pytest.raises(ConfigError) as e:
        build_config({"methd": "oscar"})
    assert "unknown key 'methd'" in str(e.value)
    assert "method" in str(e.value)  # the known keys are listed


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("method", "fedprox", "'oscar'"),
        ("partition", "random", "dirichlet"),
        ("guidance-scale", 0.5, "greater than or equal to 1"),
        ("images-per-class", 0, "greater than or equal to 1"),
        ("dirichlet-alpha", -1.0, "greater than 0"),
        ("domains", "inverted,sepia", "sepia"),
        ("run-name", "a/b", "letters"),
        ("lora-merge", "mean", "generative"),
    ],
)
def test_bad_value_names_key_value_and_allowed(key, value, needle):
    with pytest.raises(ConfigError) as e:
        build_config({key: value})
    msg = str(e.value)
    assert key in msg and repr(value) in msg and needle in msg


def test_config_is_frozen_and_derived_fields():
    cfg = RunConfig()
    assert cfg.domain_list == ("inverted", "thick", "thin", "rotated", "noisy")
    assert cfg.lora_target_list == [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "conv1",
        "conv2",
    ]
    with pytest.raises(ValidationError):
        cfg.method = "fedavg"  # type: ignore[misc]

import pytest
from pydantic import ValidationError

from methods import METHODS, ConfigError, RunConfig, build_config
from methods.lora.config_lora import LoraConfig


def test_unknown_key_is_named():
    with pytest.raises(ConfigError) as e:
        build_config({"methd": "oscar"})
    assert "unknown key 'methd'" in str(e.value)
    assert "method" in str(e.value)  # the known keys are listed


def test_two_unknown_keys_are_each_named_and_the_known_keys_listed_once():
    with pytest.raises(ConfigError) as e:
        build_config({"methd": "oscar", "sed": 3})
    text = str(e.value)
    assert "unknown key 'methd' (value 'oscar')" in text
    assert "unknown key 'sed' (value 3)" in text
    assert text.count("known keys: ") == 1


@pytest.mark.parametrize("method", ["fedlmg", "fedhydra"])
def test_client_classifiers_are_checked_once_for_every_method_that_has_them(method):
    key = f"{method}-client-classifiers"
    with pytest.raises(ConfigError) as e:
        build_config({"method": method, key: "cnn,vgg"})
    assert f"{key} = 'cnn,vgg'" in str(e.value) and "['vgg'] not in" in str(e.value)
    cfg = build_config({"method": method, key: " cnn, ,resnet18"})
    assert cfg.options(METHODS[method].config).client_classifiers() == [
        "cnn",
        "resnet18",
    ]


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
        ("run-name", "..", "inside output-dir"),
        ("run-name", ".", "inside output-dir"),
        ("lora-merge-density", 0.0, "greater than 0"),
        ("max-weight-share", 1.5, "less than or equal to 1"),
        ("lora-merge", "mean", "generative"),
    ],
)
def test_bad_value_names_key_value_and_allowed(key, value, needle):
    with pytest.raises(ConfigError) as e:
        build_config({key: value})
    msg = str(e.value)
    assert key in msg and repr(value) in msg and needle in msg


def test_config_is_frozen_and_derived_fields():
    cfg = build_config({})
    assert cfg.domain_list == ("inverted", "thick", "thin", "rotated", "noisy")
    assert cfg.options(LoraConfig).target_list == [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "conv1",
        "conv2",
    ]
    with pytest.raises(ValidationError):
        cfg.method = "fedavg"  # type: ignore[misc]


def test_method_keys_are_validated_by_the_methods_model_and_replace_routes_them():
    cfg = build_config({"method": "oscar", "lora-rank": 8})
    assert cfg.options(LoraConfig).lora_rank == 8
    assert cfg.to_flat()["lora-rank"] == 8
    other = cfg.replace(lora_merge="ties", seed=3)
    assert other.options(LoraConfig).lora_merge == "ties" and other.seed == 3
    assert cfg.options(LoraConfig).lora_merge == "svd"  # the original is untouched
    with pytest.raises(KeyError):
        cfg.replace(nope=1)
    assert isinstance(cfg, RunConfig)


def test_partition_seed_holds_the_clients_data_while_seed_varies():
    """``partition-seed`` alone decides the partition; -1 (the default) follows
    ``seed`` (issue 23: partition seed apart from synthesis / training seed)."""
    from methods import build_config

    assert build_config({"seed": 3}).data_args().seed == 3
    fixed = [
        build_config({"seed": s, "partition-seed": 7}).data_args() for s in (0, 1, 2)
    ]
    assert {a.seed for a in fixed} == {7}
    assert build_config({"seed": 1, "partition-seed": 7}).seed == 1  # the rest varies
    with pytest.raises(Exception, match="partition-seed|partition_seed"):
        build_config({"partition-seed": -2})

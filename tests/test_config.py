import pytest

from core.config import ConfigError, RunConfig, apply_overrides, config_diff


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"trian": {}}, "unknown key.*trian.*allowed"),
        ({"train": {"stpes": 1}}, "train.stpes.*allowed.*steps"),
        ({"context": {"solver": "hungarian"}}, "context.solver.*'exact', 'sinkhorn', 'sliced'"),
        ({"train": {"steps": "ten"}}, "train.steps: expected int"),
        ({"train": {"steps": 0}}, "train.steps: must be >= 1"),
        ({"context": {"strides": [1, 1]}}, "distinct"),
        ({"model": {"block_out_channels": [30]}}, "divisible"),
        ({"train": {"batch_size": 10, "grad_accumulation": 4}}, "divisible"),
        ({"context": {"point_fraction": 1.5}}, r"\(0, 1\]"),
    ],
)
def test_bad_configs_name_the_key(bad, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(bad)


def test_round_trip_and_overrides():
    d = apply_overrides({}, ["train.steps=7", "context.strides=[1,2]", "name=x", "train.lr=1e-4"])
    cfg = RunConfig.from_dict(d)
    assert cfg.train.steps == 7 and cfg.context.strides == (1, 2) and cfg.train.lr == 1e-4
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert config_diff(cfg.to_dict(), RunConfig().to_dict()) == [
        "context.strides: [1, 2] -> [1, 2, 3]", "name: 'x' -> 'run'", "train.lr: 0.0001 -> 0.001", "train.steps: 7 -> 3000"
    ]

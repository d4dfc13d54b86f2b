"""DiLoCoConfig: the plan's `diloco:` section, validated with readable errors."""

import pytest

from diloco import DiLoCoConfig


def test_plan_section_builds_a_config() -> None:
    plan = {
        "sync_every": 100, "fragments": 4, "pattern": "strided",
        "overlap_steps": 2, "alpha": 0.5, "quantization": "fp4",
    }  # fmt: skip
    config = DiLoCoConfig(**plan)
    assert config.outer_lr == 0.7 and config.outer_momentum == 0.9 and config.nesterov
    assert {k: config.to_dict()[k] for k in plan} == plan


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sync_every", 0, "sync_every must be >= 1"),
        ("fragments", 200, "fragments must be in"),
        ("pattern", "random", "pattern must be one of"),
        ("overlap_steps", 100, "overlap_steps must be in"),
        ("alpha", 1.5, "alpha must be in"),
        ("quantization", "fp8", "quantization must be one of"),
        ("outer_momentum", 1.0, "outer_momentum"),
        ("quant_block", 7, "quant_block"),
        ("timeout_s", 0, "timeout_s"),
    ],
)
def test_bad_values_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiLoCoConfig(**{field: value})

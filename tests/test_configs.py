"""Every YAML in configs/ composes into the validated schema; bad overrides fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from archquant.cli import CONFIG_DIR
from archquant.config import Config, register_configs, to_object

GROUP_FILES = sorted(
    (p.parent.name, p.stem) for p in Path(CONFIG_DIR).glob("*/*.yaml") if p.parent.name != "hydra"
)


def _compose(overrides: list[str]) -> Config:
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
        cfg.out_dir = "."  # outside a Hydra run there is no runtime.output_dir
        return to_object(cfg)


def test_there_are_configs_to_check():
    assert len(GROUP_FILES) >= 15


@pytest.mark.parametrize("group,name", GROUP_FILES, ids=[f"{g}/{n}" for g, n in GROUP_FILES])
def test_every_yaml_composes(group, name):
    cfg = _compose([f"{group}={name}"])
    assert isinstance(cfg, Config)


@pytest.mark.parametrize(
    "override,key",
    [
        ("budget.latency_ms=-3", "budget.latency_ms"),
        ("search.steps=0", "search.steps"),
        ("search.tau_start=0", "search.tau_start"),
        ("eval.limit=0", "eval.limit"),
        ("eval.tasks=[piqa,nope]", "eval.tasks"),
        ("latency.scenario=train", "latency.scenario"),
        ("space.group_size=-1", "space.group_size"),
        ("trainer.devices=0", "trainer.devices"),
    ],
)
def test_invalid_values_name_the_override_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _compose([override])


def test_unknown_override_key_is_refused():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose(["search.stepz=3"])

"""A default is written where a user reads it (conf/), and the schema and the Python signature that repeat it
agree with it: the evaluators' settings and MAPA's prior candidates (whose two copies once disagreed)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from hydra.utils import get_object
from omegaconf import OmegaConf

from mapa_exp.config import ESTIMATOR_SCHEMAS, PriorRecoveryConf, compose
from mapa_exp.math.prior_choice import plain_settings


def dataclass_defaults(schema) -> dict:
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize("name", ["quadrature", "mog_iwae"])
def test_an_evaluator_default_is_one_value_in_config_schema_and_signature(name):
    node = OmegaConf.to_container(compose("evaluate", [f"evaluator={name}"]).evaluator[name])
    target = node.pop("_target_")
    schema = dataclass_defaults(ESTIMATOR_SCHEMAS[target])
    signature = {k: p.default for k, p in inspect.signature(get_object(target)).parameters.items()
                 if p.default is not inspect.Parameter.empty}
    assert set(node) == set(schema) - {"_target_"} == set(signature)
    for key, value in node.items():
        assert value == schema[key] == signature[key], key


def test_prior_recovery_has_one_file_for_training_and_evaluation():
    train, evaluate = (OmegaConf.to_container(compose(c).prior_recovery) for c in ("train", "evaluate"))
    assert train == evaluate == dataclass_defaults(PriorRecoveryConf) == plain_settings({})
    assert train["bins"][0] is None  # the interpolating map is a candidate (method.md §6)

"""One source of defaults: a schema'd group's yaml extends its schema (Hydra's structured-config pattern) and
restates none of its values, and the Python signatures that take the same settings default to the schema's:
the evaluators (whose copies once disagreed), MAPA's prior candidates (the pure functions' own defaults) and the
net."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml
from hydra.utils import get_object
from omegaconf import OmegaConf

from mapa_exp.config import ESTIMATOR_SCHEMAS, NetConf, PriorRecoveryConf, compose
from mapa_exp.math.prior_choice import DEFAULTS, plain_settings
from tests.conftest import ROOT


def dataclass_defaults(schema) -> dict:
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize("path, schema", [("evaluator/quadrature", "schema/evaluator/quadrature"),
                                          ("evaluator/mog_iwae", "schema/evaluator/mog_iwae"),
                                          ("prior_recovery/default", "schema/prior_recovery/default"),
                                          ("net/mlp", "schema/net/mlp")])
def test_a_schema_groups_yaml_extends_its_schema_and_restates_no_value(path, schema):
    text = yaml.safe_load((ROOT / "conf" / f"{path}.yaml").read_text())
    assert text == {"defaults": [f"/{schema}@_here_", "_self_"]}  # nothing but the schema (comments aside)


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
    assert train == evaluate == dataclass_defaults(PriorRecoveryConf) == plain_settings({}) == DEFAULTS
    assert train["bins"][0] is None  # the interpolating map is a candidate (method.md §6)


def test_the_net_composes_to_its_schema():
    node = OmegaConf.to_container(compose("train").net)
    assert node == {**dataclass_defaults(NetConf), "encoder": {"hidden": None, "activation": None},
                    "decoder": {"hidden": None, "activation": None}}
    assert node["hidden"] == [50, 50] and node["activation"] == "leaky_relu"  # method.md §11

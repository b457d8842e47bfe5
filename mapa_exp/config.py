"""Typed configs: the schemas of the groups a user overrides, and the check of a command line before any job.

Each schema is a dataclass (registered in Hydra's ConfigStore under ``schema/<group>/<name>``): the keys a
node may have and their types. ``validate(cfg)`` merges every schema'd node of a composed config into its
schema, so a misspelt key -- also one added with ``+key=...``, which Hydra's struct mode lets through -- and a
value of the wrong type are refused, as a ``ConfigError`` naming the key and the nearest valid one. Range
checks (``K >= 1``, ...) stay where the values are used.

``mapa_exp.cli.check_command_line`` composes the first job of a command line and validates it with these
before any run folder is made; training validates its config again (``+key=...`` additions included).
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from mapa_exp import resolvers  # noqa: F401  the configs' ${mapa_...} resolvers, registered before any compose
from mapa_exp.errors import ConfigError, check
from mapa_exp.math.prior_choice import DEFAULTS as PRIOR_DEFAULTS
from mapa_exp.math.prior_choice import check_prior_recovery

ROOT = Path(__file__).resolve().parents[1]


# -- schemas -----------------------------------------------------------------------------------------
@dataclass
class SurrogateConf:
    fit: bool = True
    seed: int = 0
    steps: int = 4000
    n_fit: int = 4096
    lr: float = 0.01


@dataclass
class SyntheticDatasetConf:
    _target_: str = "mapa_exp.data.groundtruth.GroundTruth"
    name: str = "synthetic"
    f: Any = None  # any callable f(z), as {_target_: ..., _partial_: true, <its own arguments>}
    likelihood: Any = None
    latent_dim: int = 1
    obs_dim: int = 2
    n_train: int = 1000
    n_val: int = 1000
    n_test: int = 1000
    draw: int = 0
    surrogate: SurrogateConf = field(default_factory=SurrogateConf)
    cache_dir: Optional[str] = None


@dataclass
class FileDatasetConf:
    _target_: str = "mapa_exp.data.files.FileDataset"
    name: str = "file"
    path: Optional[str] = None
    likelihood: Any = None
    latent_dim: int = 2
    draw: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    binarize: Optional[float] = None


@dataclass
class DigitsConf:
    _target_: str = "mapa_exp.data.digits.Digits"
    name: str = "digits"
    likelihood: Any = None
    latent_dim: int = 2
    draw: int = 0
    n_val: int = 300
    n_test: int = 300
    threshold: int = 8


@dataclass
class GaussianEncoderMethodConf:  # vae, iwae
    name: str = "vae"
    K_fraction: Optional[float] = None  # unused: lets a sweep set the MAPA family's K fraction for every method
    S: int = 1
    estimator: str = "standard"
    module: Any = None


@dataclass
class MapaFamilyConf:  # what mapa, mapa_gt and mapa_naive share
    name: str = "mapa"
    K_fraction: Optional[float] = None
    K: int = 5
    S: int = 5
    module: Any = None  # its proposal (over training indices) inside


@dataclass
class MapaMethodConf(MapaFamilyConf):
    bandwidth: Optional[float] = None
    rho: Optional[float] = None
    uniform_share: float = 0.0


@dataclass
class MapaGtMethodConf(MapaFamilyConf):
    name: str = "mapa_gt"


@dataclass
class MapaNaiveMethodConf(MapaFamilyConf):
    name: str = "mapa_naive"
    seed: int = 0


@dataclass
class DataConf:
    _target_: str = "mapa_exp.data.datamodule.GroundTruthDataModule"
    batch_size: int = 100
    cache_dir: Optional[str] = None
    neighbors_M: Optional[int] = None


@dataclass
class TrainerConf:
    """The Trainer options that act on a run here (the module runs its own step loop: e.g. gradient clipping
    or accumulation would be silently ignored, so they are not accepted)."""

    _target_: str = "lightning.Trainer"
    default_root_dir: Optional[str] = None
    accelerator: str = "cpu"
    devices: Any = 1
    max_epochs: int = 200
    max_time: Optional[str] = None
    check_val_every_n_epoch: int = 10
    log_every_n_steps: int = 10
    deterministic: bool = True
    enable_model_summary: bool = False
    enable_progress_bar: bool = True
    num_sanity_val_steps: int = 0
    limit_train_batches: Any = None  # an int (steps) or a fraction
    limit_val_batches: Any = None


@dataclass
class QuadratureConf:
    """Exact log p(x) for latent dimension <= 2 (method.md §7); the defaults of ``conf/evaluator/quadrature.yaml``
    and of ``QuadratureEstimator``."""

    _target_: str = "mapa_exp.evaluation.estimators.QuadratureEstimator"
    J_1d: int = 10000  # nodes for Dz = 1
    J_2d: int = 400  # nodes per axis for Dz = 2 (160,000 in all; a mixture prior: per component)
    rule: str = "uniform"  # uniform (exponentially convergent) | equal_mass (O(1/J^2), method.md §7)
    check_convergence: bool = True  # also run 2J and report the largest per-point gap


@dataclass
class MogIwaeConf:
    """The paper's evaluator (method.md §7); the defaults of ``conf/evaluator/mog_iwae.yaml`` and of
    ``MogIwaeEstimator``."""

    _target_: str = "mapa_exp.evaluation.estimators.MogIwaeEstimator"
    n_components: int = 10  # C, the mixture's components
    S_train: int = 100  # samples per point while fitting q
    S_eval: int = 5000  # samples per point scoring; on MAPA models over tightly grouped codes the test mean's
    #                     Monte-Carlo SE is then 0.001-0.003 nats, about 0.7x that at 10000 (2x the time;
    #                     docs/benchmarks.md, "samples per point")
    steps: int = 2000  # at most this many Adam steps per fit (batch_size points each)
    defensive: float = 0.1  # scoring's proposal: (1 - this) q + this x the prior (0: q alone); on MAPA models about
    #                         one fit in four misses part of a posterior, 0.01-0.04 nats low without it
    restarts: int = 1  # fits (seeds seed, seed + 1, ...); the best on the validation split scores
    S_select: int = 500  # samples per point for that choice (the same for every fit)
    batch_size: int = 100
    lr: float = 3e-3  # Adam, cosine decay to 1e-5
    estimator: str = "stl"  # the fit's gradient: stl | standard
    seed: int = 0  # fixed evaluation seed
    check_every: int = 0  # early stopping (opt-in, e.g. 100): score q on the validation split every this many
    #                       steps; off by default: on MAPA models it cost 0.004-0.011 nats (docs/benchmarks.md)
    patience: int = 3  # ... stop after this many checks in a row gained less than
    min_delta: float = 1e-3  # ... this many nats per point; the best q is kept
    min_steps: int = 1000  # ... never before this many steps (the held-out bound swings while the rate is high)


@dataclass
class PriorRecoveryConf:
    """MAPA's prior from its codes (method.md §6), for train.py (evaluate=true) and evaluate.py alike: each
    candidate fitted and scored, the best validation log-likelihood chosen per run. The defaults are
    ``mapa_exp.math.prior_choice.DEFAULTS`` (the pure functions' own); ``conf/prior_recovery/default.yaml``
    extends this schema."""

    bins: Any = field(default_factory=lambda: list(PRIOR_DEFAULTS["bins"]))  # Dz = 1: null = the interpolating
    #                  map, B = smooth through B bin means; a list of candidates, or one value that fixes it
    n_components: Any = field(default_factory=lambda: list(PRIOR_DEFAULTS["n_components"]))  # Dz > 1: Gaussian
    #                  mixtures of this many components; a list or one value
    tail_knots: int = PRIOR_DEFAULTS["tail_knots"]  # Dz = 1: secant slope over this many outer codes
    seed: int = PRIOR_DEFAULTS["seed"]  # Dz > 1: the mixtures' EM initialisation


@dataclass
class NetRoleConf:
    hidden: Optional[list[int]] = None  # null: the net's own
    activation: Optional[str] = None


@dataclass
class NetConf:
    _target_: str = "mapa_exp.nets.NetSpec"
    hidden: list[int] = field(default_factory=lambda: [50, 50])
    activation: str = "leaky_relu"
    encoder: NetRoleConf = field(default_factory=NetRoleConf)  # the VAE/IWAE encoder or MAPA's g_phi
    decoder: NetRoleConf = field(default_factory=NetRoleConf)


@dataclass
class RunFlagsConf:
    """The top-level switches of train.py / evaluate.py (the groups have their own schemas; value ranges such as
    the seed's are checked where they are used)."""

    seed: Any = 0  # an integer; its range (and a clear line for "abc") is checked where the run starts
    evaluate: bool = False
    eval_checkpoint: str = "best"
    nan_policy: str = "fail"
    stack: bool = False
    compile: bool = False


METHOD_SCHEMAS = {"vae": GaussianEncoderMethodConf, "iwae": GaussianEncoderMethodConf, "mapa": MapaMethodConf,
                  "mapa_gt": MapaGtMethodConf, "mapa_naive": MapaNaiveMethodConf}
DATASET_SCHEMAS = {SyntheticDatasetConf._target_: SyntheticDatasetConf, FileDatasetConf._target_: FileDatasetConf,
                   DigitsConf._target_: DigitsConf}
ESTIMATOR_SCHEMAS = {QuadratureConf._target_: QuadratureConf, MogIwaeConf._target_: MogIwaeConf}


def _register() -> None:
    cs = ConfigStore.instance()
    for group, schemas in (("method", {**METHOD_SCHEMAS}),
                           ("dataset", {"synthetic": SyntheticDatasetConf, "file": FileDatasetConf, "digits": DigitsConf}),
                           ("data", {"default": DataConf}), ("trainer", {"default": TrainerConf}),
                           ("net", {"mlp": NetConf}),
                           ("evaluator", {"quadrature": QuadratureConf, "mog_iwae": MogIwaeConf}),
                           ("prior_recovery", {"default": PriorRecoveryConf})):
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node, provider="mapa_exp")


_register()


def schemas_of(cfg: DictConfig) -> list[tuple[str, type]]:
    """(config path, schema) of every node of ``cfg`` that has one (a user's own method or data set has none)."""
    out = []
    method = cfg.get("method")
    if method is not None and method.get("name") in METHOD_SCHEMAS:
        out.append(("method", METHOD_SCHEMAS[method.name]))
    dataset = cfg.get("dataset")
    if dataset is not None and dataset.get("_target_") in DATASET_SCHEMAS:
        out.append(("dataset", DATASET_SCHEMAS[dataset._target_]))
    out.append(("", RunFlagsConf))
    if cfg.get("data") is not None:
        out.append(("data", DataConf))
    if cfg.get("net") is not None and cfg.net.get("_target_") == NetConf._target_:
        out.append(("net", NetConf))
    if cfg.get("trainer") is not None:
        out.append(("trainer", TrainerConf))
    if cfg.get("prior_recovery") is not None:
        out.append(("prior_recovery", PriorRecoveryConf))
    for name, node in (cfg.get("evaluator") or {}).items():
        if node is not None and node.get("_target_") in ESTIMATOR_SCHEMAS:
            out.append((f"evaluator.{name}", ESTIMATOR_SCHEMAS[node._target_]))
    return out


def validate(cfg: DictConfig) -> None:
    """Refuse keys a node's schema does not have, values of the wrong type and ``_target_``s that name nothing
    importable (ConfigError, module doc)."""
    for path, schema in schemas_of(cfg):
        node = OmegaConf.select(cfg, path) if path else cfg
        values = OmegaConf.to_container(node, resolve=False)
        if not path:  # the top level: only its own switches (the groups are checked on their own)
            values = {f.name: values[f.name] for f in fields(schema) if f.name in values}
        try:
            OmegaConf.merge(OmegaConf.structured(schema), values)
        except OmegaConfBaseException as exc:
            raise _translate(exc, path, schema, node) from None
    for path, target in _targets(OmegaConf.to_container(cfg, resolve=False)):
        _check_target(path, target)
    if cfg.get("trainer") is not None:
        check_trainer(cfg.trainer)
    if "eval_checkpoint" in cfg:
        check(cfg.eval_checkpoint in ("best", "last"), "eval_checkpoint", cfg.eval_checkpoint, "must be best or last")
    if cfg.get("prior_recovery") is not None:
        check_prior_recovery(OmegaConf.to_container(cfg.prior_recovery, resolve=True))


def check_trainer(trainer: DictConfig) -> None:
    """The trainer values the step loop relies on (ranges, not just types: checked before any run folder is touched)."""
    node = {k: trainer.get(k) for k in ("max_epochs", "max_time", "limit_train_batches", "limit_val_batches")}
    epochs, max_time = node["max_epochs"], node["max_time"]
    check(isinstance(epochs, int) and (epochs >= 1 or (epochs == -1 and max_time)), "trainer.max_epochs", epochs,
          "must be an integer >= 1 (or -1 with a trainer.max_time: training without an end is asked for explicitly)")
    for split in ("train", "val"):
        limit = node.get(f"limit_{split}_batches")
        check(limit is None or (isinstance(limit, (int, float)) and limit > 0), f"trainer.limit_{split}_batches",
              limit, "must be null, an integer >= 1 or a fraction in (0, 1]")


def _targets(node, path: str = ""):
    """(config path of the node, its ``_target_``) for every node of a plain container that has one."""
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield path, node["_target_"]
        for key, value in node.items():
            if key != "hydra":
                yield from _targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{path}[{i}]")


def _check_target(path: str, target: str) -> None:
    """ConfigError unless ``target`` (an interpolation is left to resolution) names an importable object.

    Read from the modules' source where that decides it (``_static_names``), so that checking a command line
    does not import torch or Lightning (seconds); imported for real where the source does not show the name
    (the error path, and the rare target bound dynamically or an attribute of an attribute)."""
    if "${" in target:
        return
    parts = target.split(".")
    if _statically_present(parts):
        return
    import importlib

    obj, i = None, 0
    for i in range(len(parts), 0, -1):  # the longest importable module prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    missing = obj is None
    for j, name in enumerate(parts[i:] if not missing else [], start=i):
        if not hasattr(obj, name):
            near = difflib.get_close_matches(name, [n for n in dir(obj) if not n.startswith("_")], n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(parts[:j] + [near[0]])}?" if near else ""
            raise ConfigError(f"{path}._target_" if path else "_target_", target, f"cannot be imported{hint}")
        obj = getattr(obj, name)
    if missing:
        raise ConfigError(f"{path}._target_" if path else "_target_", target, "cannot be imported")


def _statically_present(parts: list[str]) -> bool:
    """True when ``module.name`` exists by the module's source (found without importing anything, its parent
    packages included); False when that cannot be told this way."""
    import importlib.machinery

    if len(parts) < 2:
        return False
    module = ".".join(parts[:-1])
    if module in sys.modules:  # already imported: asking is free
        return hasattr(sys.modules[module], parts[-1])
    spec, search = None, None
    for k, name in enumerate(parts[:-1]):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: k + 1]), search)
        if spec is None:
            return False
        search = spec.submodule_search_locations
    return parts[-1] in _static_names(spec.origin)


def _static_names(origin: str | None) -> set[str]:
    """Names a module's top level binds by its source (definitions, assignments, imports, also inside top-level
    ``if``/``try``/``with``): a name found is there; one not found may still be (star imports, ``__getattr__``,
    no Python source), which only an import tells."""
    import ast

    if not origin or not origin.endswith(".py"):
        return set()
    try:
        tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return set()
    names: set[str] = set()
    body = list(tree.body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            body.extend(node.body)
            body.extend(getattr(node, "orelse", []))
            body.extend(getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                body.extend(handler.body)
    return names


_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _field_type(schema: type, dotted: str):
    """The declared type of a (nested) field, or None."""
    t = schema
    for part in dotted.split("."):
        if not is_dataclass(t):
            return None
        f = {f.name: f for f in fields(t)}.get(part)
        if f is None:
            return None
        t = f.type if not isinstance(f.type, str) else eval(f.type, globals())  # noqa: S307 -- our own annotations
    return t


def expected_type(schema: type, dotted: str) -> str:
    """What a schema's (nested) field must be, in words ("an integer"): for a type error, Hydra's at composition
    (its ``ValidationError`` names the schema and the key) as ours."""
    t = _field_type(schema, dotted)
    if getattr(t, "__origin__", None) is not None and getattr(t, "__origin__") is not list:  # Optional[X] -> X
        t = t.__args__[0]
    if getattr(t, "__origin__", None) is list:
        inner = t.__args__[0] if getattr(t, "__args__", None) else None
        return "a list" + (f" of {_TYPES[inner].split(' ', 1)[1]}s" if inner in (int, float, str) else "")
    return _TYPES.get(t, getattr(t, "__name__", "of another type"))


def _keys(schema: type, dotted: str) -> list[str]:
    """The field names at ``dotted`` (its parent) of a schema."""
    t = schema
    for part in [p for p in dotted.split(".")[:-1] if p]:
        t = _field_type(t, part)
        if not is_dataclass(t):
            return []
    return [f.name for f in fields(t)] if is_dataclass(t) else []


def _translate(exc: OmegaConfBaseException, path: str, schema: type, node) -> ConfigError:
    rel = str(getattr(exc, "full_key", "") or getattr(exc, "key", "") or "")
    key = f"{path}.{rel}" if rel and path else rel or path
    if isinstance(exc, ConfigKeyError) or "not in" in str(exc):
        leaf = rel.split(".")[-1]
        near = difflib.get_close_matches(leaf, _keys(schema, rel), n=1, cutoff=0.4)
        value = OmegaConf.select(node, rel, default=None) if rel else None
        hint = f"; did you mean {'.'.join(([path] if path else []) + rel.split('.')[:-1] + [near[0]])}?" if near else ""
        return ConfigError(key, value, f"no such key{hint}")
    value = getattr(exc, "value", None) if isinstance(exc, ValidationError) else None
    if value is None:
        value = OmegaConf.select(node, rel, default=None, throw_on_missing=False) if rel else None
    return ConfigError(key, value, f"must be {expected_type(schema, rel)}")


# -- a run's configuration, for grouping results -------------------------------------------------------
# what does not decide what a run trains: how it is computed, logged, stored or evaluated, and which restart
# and data draw it is (restarts x draws are one configuration's runs)
def compose(config_name: str = "train", overrides=(), return_hydra_config: bool = False) -> DictConfig:
    """The config that ``python <config_name>.py <overrides>`` composes from the repository's ``conf/``, outside
    ``@hydra.main`` (checks, benchmarks, tests): the one place that initialises Hydra for that; its global state is
    clear before and after."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()


NOT_CONFIGURATION = ("hydra", "paths", "logger", "callbacks", "evaluator", "prior_recovery", "evaluate",
                     "eval_checkpoint", "stack", "stack_members", "stack_subdir", "chunk_rows", "compile", "malloc",
                     "tags", "num_threads", "seed")
NOT_CONFIGURATION_KEYS = ("dataset.draw", "dataset.cache_dir", "data.cache_dir", "trainer.enable_progress_bar",
                          "trainer.enable_model_summary", "trainer.log_every_n_steps", "trainer.default_root_dir")


def run_configuration(config: dict) -> dict:
    """A run's configuration as flat ``{key: value}``: every key of its resolved config (``config.yaml``) but
    those of NOT_CONFIGURATION / NOT_CONFIGURATION_KEYS. Two runs belong to one configuration -- restarts or
    draws of it -- exactly when these are equal; results.json records them and the results table groups by
    them, whatever keys a method has."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    kept = flat({k: v for k, v in config.items() if k not in NOT_CONFIGURATION})
    return {k: v for k, v in sorted(kept.items()) if k not in NOT_CONFIGURATION_KEYS}

"""Recipe schema, loading and dotted overrides for ``scripts/compress.py``.

A recipe is YAML validated against the dataclasses below (OmegaConf structured configs). An
unknown key fails naming the nearest valid key; a bad value fails naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxcomp.errors import JaxcompError
from jaxcomp.train.config import HealConfig, MeshConfig, check_heal_config

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
DEFAULT_RECIPE = "smollm2_tt"


@dataclasses.dataclass
class EvalConfig:
    corpus: str = "enwiki-sample"
    seq_len: int = 512
    max_tokens: int = 0  # 0: the whole eval part
    batch_size: int = 8


@dataclasses.dataclass
class CalibConfig:
    corpus: str = "enwiki-sample"
    num_samples: int = 128
    seq_len: int = 512


@dataclasses.dataclass
class StageConfig:
    transform: str = MISSING  # a registered transform name
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    rules: list[Any] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Recipe:
    name: str = DEFAULT_RECIPE
    description: str = ""
    model: str = "smollm2-135m"
    out_dir: str = "out/${name}"
    seed: int = 0
    dtype: str = "float32"  # compute dtype: float32 or bfloat16
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    calib: CalibConfig = dataclasses.field(default_factory=CalibConfig)
    stages: list[StageConfig] = dataclasses.field(default_factory=list)
    heal: HealConfig = dataclasses.field(default_factory=HealConfig)
    # Read an HF checkpoint block by block (models larger than memory); every stage must be
    # block-sequential (gptq, awq, smoothquant, learn_clip) and evaluation streams too.
    stream: bool = False
    save_checkpoint: bool = True  # out_dir/checkpoint (orbax), reopened with model=<that dir>
    export_hf: bool = False


def available_recipes() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml"))


def _check_keys(data: Any, schema, where: str) -> None:
    """Rejects keys the schema does not have, naming the nearest valid key."""
    if not isinstance(data, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{where}{close[0]}'?" if close else ""
            raise JaxcompError(f"unknown recipe key '{where}{key}'{hint}")
        sub = fields[key].type
        sub_schema = {"EvalConfig": EvalConfig, "CalibConfig": CalibConfig,
                      "HealConfig": HealConfig, "MeshConfig": MeshConfig}.get(sub)
        if sub_schema is not None:
            if not isinstance(value, dict):
                raise JaxcompError(f"recipe key '{where}{key}' must be a mapping")
            _check_keys(value, sub_schema, f"{where}{key}.")
        elif key == "stages":
            if not isinstance(value, list):
                raise JaxcompError("recipe key 'stages' must be a list")
            for i, stage in enumerate(value):
                _check_keys(stage, StageConfig, f"stages.{i}.")


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise JaxcompError(f"override {key}: no list item {p}")
            node = node[int(p)]
        else:
            node = node.setdefault(p, {})
        if not isinstance(node, (dict, list)):
            raise JaxcompError(f"override {key}: '{p}' is not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise JaxcompError(f"override {key}: no list item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(args: list[str]) -> tuple[str, dict[str, Any]]:
    """Splits ``recipe=NAME key.sub=value ...`` into the recipe name and typed overrides."""
    recipe, overrides = DEFAULT_RECIPE, {}
    for arg in args:
        if "=" not in arg:
            raise JaxcompError(f"argument {arg!r} is not of the form key=value")
        key, raw = arg.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        if key == "recipe":
            recipe = str(raw)
        else:
            overrides[key] = value
    return recipe, overrides


def load_recipe(name: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """Loads ``recipes/NAME.yaml`` (or a YAML path), applies dotted overrides, validates.

    Args:
      name: a recipe name from ``recipes/`` or a path to a YAML file.
      overrides: ``{"eval.seq_len": 256, ...}``.

    Returns:
      The validated :class:`Recipe` with interpolations resolved.

    Example:
      >>> r = load_recipe("baseline", {"eval.max_tokens": 8192})
      >>> r.eval.max_tokens
      8192
    """
    path = name if name.endswith((".yaml", ".yml")) else os.path.join(RECIPES_DIR, name + ".yaml")
    if not os.path.isfile(path):
        close = difflib.get_close_matches(name, available_recipes(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise JaxcompError(f"unknown recipe '{name}'{hint} (available: "
                           f"{', '.join(available_recipes())})")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise JaxcompError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise JaxcompError(f"{path}: a recipe must be a mapping")
    data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    _check_keys(data, Recipe, "")
    if data.get("model") in (None, "", "???"):
        raise JaxcompError(f"recipe '{data['name']}' needs a model: pass model=<HF checkpoint "
                           "directory, .gguf file or jaxcomp checkpoint> (the embedded "
                           "SmolLM2-135M recipes need none, e.g. recipe=smollm2_tt)")
    heal = data.get("heal") if isinstance(data.get("heal"), dict) else {}
    if heal.get("corpus") in ("", "???") and heal.get("steps", 0) != 0:
        raise JaxcompError(f"recipe '{data['name']}' heals on a training text: pass "
                           "heal.corpus=text:PATH (or a corpus name such as enwiki-sample), or "
                           "heal.steps=0 to stop before healing")
    try:
        conf = OmegaConf.merge(OmegaConf.structured(Recipe), data)
        recipe: Recipe = OmegaConf.to_object(conf)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        msg = str(e).splitlines()[0]
        raise JaxcompError(f"recipe key '{key}': {msg}") from None
    _check_values(recipe)
    return recipe


def _check_values(r: Recipe) -> None:
    checks = [
        (r.eval.seq_len >= 2, "eval.seq_len must be >= 2"),
        (r.eval.batch_size >= 1, "eval.batch_size must be >= 1"),
        (r.eval.max_tokens >= 0, "eval.max_tokens must be >= 0 (0 means all)"),
        (r.calib.num_samples >= 1, "calib.num_samples must be >= 1"),
        (r.calib.seq_len >= 2, "calib.seq_len must be >= 2"),
        (r.dtype in ("float32", "bfloat16"), "dtype must be float32 or bfloat16"),
        *check_heal_config(r.heal),
        # With no stage and no other teacher the student would distill toward itself.
        (not r.heal.steps or r.stages or r.heal.teacher or r.heal.ce_weight > 0,
         "heal: no stage changes the model, so it would distill toward itself: set "
         "heal.teacher=<the original model> to heal a compressed checkpoint, or add stages"),
        (bool(r.out_dir), "out_dir must not be empty"),
    ]
    for ok, msg in checks:
        if not ok:
            raise JaxcompError(msg)
    from jaxcomp.parallel.mesh import compile_mesh_rules

    compile_mesh_rules(r.heal.mesh.rules)  # shapes are checked when the arrays exist


def recipe_to_yaml(r: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(r))

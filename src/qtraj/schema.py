"""Reading YAML strictly and validating it against a JSON schema, with messages that name the key: what the
workflow config (qtraj.config), family files (qtraj.families) and local trajectories (qtraj.local) build on.

Validation happens before any job runs, with messages that name the key, the bad value and what is
allowed — jsonschema's own messages do not say where in the file the problem is.
"""

from __future__ import annotations

import copy
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import jsonschema
import yaml

# The JSON schemas ship inside the package (package data), so an installed qtraj (a wheel, `pip install .`) finds
# them wherever it lives; read through importlib.resources, never through the source tree's layout.
SCHEMAS = files("qtraj") / "schemas"
SCHEMA_PATH = SCHEMAS / "config.schema.yaml"
FAMILY_SCHEMA_PATH = SCHEMAS / "family.schema.yaml"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the fix."""


def _with_defaults(validator_class):
    """A validator that also fills in `default:` values (the recipe from jsonschema's FAQ)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


DefaultFillingValidator = _with_defaults(jsonschema.Draft202012Validator)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping: PyYAML (and so Snakemake) keeps the
    last silently, so `runs: {wsd: ..., wsd: ...}` would drop a run without a word."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} is written twice in one mapping (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> object:
    """A YAML file read strictly: duplicate keys refused and syntax errors reported with their line, both naming
    the file."""
    try:
        return yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{path}:{where}: not valid YAML ({problem})") from None
    except OSError as error:
        raise ConfigError(f"{path} cannot be read: {error.strerror or error}") from None


def load_schema(path: str | Path | Traversable = SCHEMA_PATH) -> dict:
    """A JSON schema: the workflow config's by default (a packaged resource), or the one at `path`."""
    return yaml.safe_load((Path(path) if isinstance(path, str) else path).read_text(encoding="utf-8"))


def _key_path(parts) -> str:
    return ".".join(str(part) for part in parts) or "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    where = _key_path(error.absolute_path)
    if error.validator == "enum":
        allowed = ", ".join(repr(value) for value in error.validator_value)
        return f"config key '{where}': {error.instance!r} is not allowed; allowed values: {allowed}"
    if error.validator == "additionalProperties":
        known = ", ".join(sorted(error.schema.get("properties", {})))
        return f"config key '{where}': {error.message}; known keys: {known}"
    if error.validator == "propertyNames" or error.validator == "pattern":
        return f"config key '{where}': {error.message} (names are lower-case slugs: letters, digits, . _ -)"
    if error.validator == "type" and isinstance(error.instance, str) and _looks_numeric(error.instance):
        return (f"config key '{where}': {error.message} (YAML reads {error.instance} as text: write the exponent "
                "with a sign and the mantissa with a dot, e.g. 6.0e+9, or the plain number)")
    return f"config key '{where}': {error.message}"


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def validate_against(instance: dict, schema: dict, prefix: tuple = ()) -> None:
    """Fill `schema` defaults into `instance` and refuse it with every problem named by its key (`prefix`: where
    `instance` sits in the config)."""
    validator = DefaultFillingValidator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda error: list(error.absolute_path))
    if errors:
        for error in errors:
            error.path.extendleft(reversed(prefix))
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(error) for error in errors))

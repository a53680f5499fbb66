"""Config fields from a JSON or YAML file (--config, --tune-space): a flat mapping, or output/config.json's "config"."""
import difflib
import json
from pathlib import Path

import yaml

from config import config_fields, list_kind
from utils.checks import check_field
from utils.helpers import PipelineError

STUDY_KEY = "tuning_study"


def read_mapping(path, flag):
    """A JSON or YAML file holding one mapping; any other content is a PipelineError naming `flag`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{flag} {path}: no such file. Pass a JSON or YAML file of Config fields.")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise PipelineError(f"{flag} {path} is not readable JSON or YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{flag} {path} must hold a mapping of field names to values, not {type(data).__name__}")
    return data


def check_names(names, path, flag):
    """Stop on names that are not Config fields, suggesting the closest ones."""
    known = list(config_fields())
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    hints = [f"{n} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(str(n), known, n=1)) else str(n)
             for n in unknown]
    raise PipelineError(f"{flag} {path}: unknown field(s) {', '.join(hints)}. Fields are the flags' names with '_' "
                        f"for '-', e.g. tuples_per_patient.")


def coerce(name, value):
    """A value read from a file (or drawn by the tuner) as its field's type; comma text for a list field is read as the
    command line reads it, a single value becomes a one-item list. Values that do not convert are left for the rules."""
    default = config_fields()[name].default
    if isinstance(default, tuple):
        if isinstance(value, str):
            try:
                return tuple(list_kind(name)(x.strip()) for x in value.split(",") if x.strip())
            except ValueError:
                return value
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if isinstance(default, bool) or isinstance(value, bool):
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, (int, float)) and isinstance(value, str):
        try:
            return type(default)(value)
        except ValueError:
            return value
    return value


def read_config_file(path, flag="--config"):
    """{field: value} from a file of Config fields (flat, or under "config" as output/config.json writes them),
    every value checked against its field's rule. A best_config.json of the tune stage also names itself as the
    settings' `tuning` (its study's patients then travel with every run trained with them)."""
    data = read_mapping(path, flag)
    if isinstance(data.get("config"), dict):
        data = data["config"]
    if isinstance(data.get(STUDY_KEY), dict):
        data = {k: v for k, v in data.items() if k != STUDY_KEY} | {"tuning": str(path)}
    check_names(list(data), path, flag)
    values = {name: coerce(name, value) for name, value in data.items()}
    for name, value in values.items():
        try:
            check_field(name, value)
        except PipelineError as e:
            raise PipelineError(f"{flag} {path}: field {name}: {e}") from None
    return values

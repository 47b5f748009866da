"""Read params.yaml and check every value before any work starts.

`dvc exp run -S key=value` writes its overrides into params.yaml, so checking the file covers them too.
Every problem ends the run with a single line that names the key, the bad value and what is allowed.
"""
import math
import re
import string

import yaml

from qlora_nli.errors import ParamsError

# A float written without a dot, like `1e-3`, is a string to PyYAML (YAML 1.1); accept exactly that form.
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _integer(value):
    if isinstance(value, bool) or not isinstance(value, int):  # bool is a subclass of int: `true` is no count
        raise TypeError
    return value


def _number(value):
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError
    return float(value)


def _boolean(value):
    if not isinstance(value, bool):
        raise TypeError
    return value


def _text(value):
    if not isinstance(value, str):
        raise TypeError
    return value


def _count_or_all(value):
    return value if value == "all" else _integer(value)


def _modules(value):
    if value == "all-linear":
        return value
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise TypeError
    return value


def _template_ok(template):
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError:  # a lone `{` or `}`
        return False
    return sorted(fields) == ["hypothesis", "premise"]


def _one_of(*choices):
    return (_text, lambda v: v in choices, "one of " + ", ".join(choices))


NONEMPTY_STR = (_text, lambda v: v.strip() != "", "a non-empty string")
POSITIVE_INT = (_integer, lambda v: v >= 1, "an integer >= 1")
POSITIVE_NUMBER = (_number, lambda v: v > 0, "a number > 0")
FRACTION = (_number, lambda v: 0 <= v < 1, "a number with 0 <= x < 1")

# group -> key -> (type check that returns the converted value, range check, what is allowed)
SCHEMA = {
    "data": {
        "source": NONEMPTY_STR,
        "n_train": POSITIVE_INT,
        "n_val": POSITIVE_INT,
        "n_test": (_count_or_all, lambda v: v == "all" or v >= 1, 'an integer >= 1, or "all"'),
    },
    "model": {
        "name": NONEMPTY_STR,
        "load_in_4bit": (_boolean, None, "true or false"),
        "compute_dtype": _one_of("auto", "float32", "bfloat16", "float16"),
        "device": _one_of("auto", "cpu", "cuda"),
        "trust_remote_code": (_boolean, None, "true or false"),
    },
    "prompt": {
        "template": (_text, _template_ok, "a string with {premise} and {hypothesis} and no other {...} field"),
    },
    "evaluate": {
        "method": _one_of("score", "generate"),
        "batch_size": POSITIVE_INT,
        "max_new_tokens": POSITIVE_INT,
    },
    "lora": {
        "r": POSITIVE_INT,
        "alpha": POSITIVE_NUMBER,
        "dropout": FRACTION,
        "target_modules": (_modules, lambda v: v == "all-linear" or (v and all(m.strip() for m in v)),
                           '"all-linear" or a non-empty list of module names'),
        "layers": (_count_or_all, lambda v: v == "all" or v >= 1, 'an integer >= 1 (the last N blocks), or "all"'),
    },
    "train": {
        "seed": (_integer, None, "an integer"),
        "epochs": POSITIVE_INT,
        "batch_size": POSITIVE_INT,
        "micro_batch_tokens": POSITIVE_INT,
        "learning_rate": POSITIVE_NUMBER,
        "weight_decay": (_number, lambda v: v >= 0, "a number >= 0"),
        "warmup_ratio": FRACTION,
        "max_grad_norm": POSITIVE_NUMBER,
        "gradient_checkpointing": (_boolean, None, "true or false"),
        "num_threads": (_integer, lambda v: v >= 0, "an integer >= 0 (0 = all cores)"),
    },
    "report": {
        "n_examples": (_integer, lambda v: v >= 0, "an integer >= 0"),
    },
}


def _show(value):
    """A value as one short line: repr escapes newlines, long values are cut."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_params(path="params.yaml"):
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found; run from the repository root, where params.yaml lives")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ParamsError(f"{path}: not valid YAML{where} ({problem}); fix the syntax")
    except (OSError, UnicodeDecodeError) as e:
        raise ParamsError(f"{path}: cannot read the file ({type(e).__name__}); check that it is a UTF-8 text file")
    return check_params(raw, path)


def check_params(raw, path="params.yaml"):
    """The checked and converted params from a mapping as read from YAML; `path` names its origin in messages."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of groups ({', '.join(SCHEMA)}); found {type(raw).__name__}")

    params = {}
    for group in raw:
        if group not in SCHEMA:
            raise ParamsError(f"{path}: unknown group {_show(group)}; allowed groups: {', '.join(SCHEMA)}")
    for group, keys in SCHEMA.items():
        given = raw.get(group)
        if not isinstance(given, dict):
            state = "is missing" if group not in raw else f"= {_show(given)} is not a mapping"
            raise ParamsError(f"{path}: group {group} {state}; it needs the keys {', '.join(keys)}")
        for key in given:
            if key not in keys:
                raise ParamsError(f"{path}: unknown key {group}.{key}; allowed keys in {group}: {', '.join(keys)}")
        params[group] = {}
        for key, (convert, in_range, allowed) in keys.items():
            name = f"{group}.{key}"
            if key not in given:
                raise ParamsError(f"{path}: {name} is missing; add it ({allowed})")
            value = given[key]
            try:
                converted = convert(value)
            except TypeError:
                raise ParamsError(f"{path}: {name} = {_show(value)} has the wrong type "
                                 f"({type(value).__name__}); allowed: {allowed}")
            if in_range is not None and not in_range(converted):
                raise ParamsError(f"{path}: {name} = {_show(value)} is out of range; allowed: {allowed}")
            params[group][key] = converted

    return params


def check_target_modules(model, target_modules, path="params.yaml"):
    """Every listed name must be the last part(s) of some module name, the way peft matches a list."""
    if target_modules == "all-linear":
        return
    names = [name for name, _ in model.named_modules()]
    for wanted in target_modules:
        if not any(name == wanted or name.endswith("." + wanted) for name in names):
            # Linear4bit (bitsandbytes) subclasses nn.Linear; Conv1D is GPT-2's linear layer.
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if _is_linear(module) and name})
            raise ParamsError(f"{path}: lora.target_modules entry {_show(wanted)} matches no module of the model; "
                             f"allowed: names of its linear layers: {', '.join(linear) or '(none found)'}")


def _is_linear(module):
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def check_split_size(key, requested, available, path="params.yaml"):
    """Prepare samples without replacement: asking for more pairs than a split holds is a params error."""
    if requested > available:
        hint = ', or "all"' if key.endswith("n_test") else ""
        raise ParamsError(f"{path}: {key} = {requested} is larger than the split ({available} labeled pairs); "
                         f"allowed: an integer from 1 to {available}{hint}")

"""Read params.yaml and check every value before any work starts.

`dvc exp run -S key=value` writes its overrides into params.yaml, so checking the file covers them too.
Every problem ends the run with a single line that names the key, the bad value and what is allowed.
"""
import logging
import math
import re
import string

import yaml

from qlora_nli.analysis.probes import HYPOTHESIS_ONLY
from qlora_nli.analysis.probes import NAMES as PROBES
from qlora_nli.data.sources import SPLITS
from qlora_nli.prompts import unicode_problem, without_premise
from qlora_nli.runtime.errors import ParamsError, shorten, show
from qlora_nli.runtime.safe_yaml import _read_yaml

log = logging.getLogger(__name__)


# A float written without a dot, like `1e-3`, is a string to PyYAML (YAML 1.1); accept exactly that form.
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class _Invalid(ValueError):
    """A value, or a part of it, is wrong in a way the type alone does not say: `where` extends the param's name
    (".n", "[2]"), `what` says what is wrong with it ("= 0 is out of range")."""

    def __init__(self, where, what):
        super().__init__(what)
        self.where, self.what = where, what


def _not_finite(value, where=""):
    """.nan, .inf (or a number too large for a float, which YAML reads as inf) is a float, but no usable value."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _Invalid(where, f"= {show(value)} is not a finite number (YAML .nan or .inf)")


def _integer(value):
    _not_finite(value)
    if isinstance(value, bool) or not isinstance(value, int):  # bool is a subclass of int: `true` is no count
        raise TypeError
    return value


def _number(value):
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)
    _not_finite(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
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


class _WrongCase(TypeError):
    """A keyword written in another case ("ALL"): the fix is the case, not the type."""


def _count_or_all(value):
    if isinstance(value, str) and value != "all" and value.strip().lower() == "all":
        raise _WrongCase
    return value if value == "all" else _integer(value)


def _modules(value):
    if value == "all-linear":
        return value
    if not isinstance(value, list):
        raise TypeError
    for i, module in enumerate(value):
        if not isinstance(module, str):
            raise _Invalid(f"[{i}]", f"= {show(module)} is {type(module).__name__}, not a module name (a string)")
    return value


def template_has_fields(template, wanted=("hypothesis", "premise")):
    """True when the template's fields are exactly `wanted` (names), each once and plain: a conversion (`!r`), a
    format spec (`:d`), an index or attribute (`{premise[0]}`) would fail or change the text only when a row is
    formatted, so refuse them here."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError:  # a lone `{` or `}`
        return False
    named = [(name, spec, conversion) for _, name, spec, conversion in fields if name is not None]
    if sorted(name for name, _, _ in named) != sorted(wanted):
        return False
    if any(spec or conversion for _, spec, conversion in named):
        return False
    try:  # the sample row is formatted exactly as prompts.format_prompt will format every row
        template.format(premise="A premise.", hypothesis="A hypothesis.")
    except (ValueError, KeyError, IndexError, AttributeError, TypeError):
        return False
    return True


_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _keys_exactly(value, wanted, where=""):
    """`value` must be a mapping with exactly the keys `wanted`: the first missing or unknown one is named."""
    for key in value:
        if key not in wanted:
            raise _Invalid(where, f"has an unknown key {show(key)}; its keys are {', '.join(wanted)}")
    for key in wanted:
        if key not in value:
            raise _Invalid(where, f"is missing the key {key}")


def _names(value, where):
    """A source's dataset id or split name: a non-empty string."""
    if not isinstance(value, str):
        raise _Invalid(where, f"= {show(value)} is {type(value).__name__}, not a name (a string)")
    if not value.strip():
        raise _Invalid(where, f"= {show(value)} is empty")
    return value


def _split_names(value):
    if not isinstance(value, dict):
        raise TypeError
    _keys_exactly(value, SPLITS)
    return {role: _names(value[role], f".{role}") for role in SPLITS}


def _extra_sets(value):
    """{name: {source, split, n}}; the name becomes a file name, n an evenly spaced sample size or "all"."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError
    checked = {}
    for name, spec in value.items():
        if not (isinstance(name, str) and _SET_NAME.match(name)):
            raise _Invalid("", f"names a set {show(name)}, which cannot be a file name (data/sets/<name>.jsonl): "
                               f"a set name starts with a letter or digit and holds only letters, digits, _ and -")
        where = f".{name}"
        if not isinstance(spec, dict):
            raise _Invalid(where, f"= {show(spec)} is {type(spec).__name__}, not a mapping of source, split and n")
        _keys_exactly(spec, ("source", "split", "n"), where)
        n = spec["n"]
        _not_finite(n, f"{where}.n")
        try:
            n = _count_or_all(n)
        except _WrongCase:
            raise _Invalid(f"{where}.n", f"= {show(n)} has the wrong case (write all in lower case, without spaces)")
        except TypeError:
            raise _Invalid(f"{where}.n", f"= {show(n)} has the wrong type ({type(n).__name__})")
        if n != "all" and n < 1:
            raise _Invalid(f"{where}.n", f"= {show(n)} is out of range (a set needs at least one pair)")
        checked[name] = {"source": _names(spec["source"], f"{where}.source"),
                         "split": _names(spec["split"], f"{where}.split"), "n": n}
    return checked


def _probe_names(value):
    if not isinstance(value, list):
        raise TypeError
    for i, probe in enumerate(value):
        if not isinstance(probe, str):
            raise _Invalid(f"[{i}]", f"= {show(probe)} is {type(probe).__name__}, not a probe name (a string)")
        if probe not in PROBES:
            raise _Invalid(f"[{i}]", f"= {show(probe)} is no probe")
        if probe in value[:i]:
            raise _Invalid(f"[{i}]", f"= {show(probe)} is listed twice")
    return value


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
        "splits": (_split_names, None, "a mapping of train, validation and test to the source's split names, "
                                       "e.g. {train: train, validation: validation_matched, test: validation_mismatched}"),
        "extra_sets": (_extra_sets, None, "a mapping of set names (letters, digits, _ or -) to {source, split, n} "
                                          "(n an integer >= 1 or \"all\"), e.g. {mnli_matched: {source: "
                                          "nyu-mll/multi_nli, split: validation_matched, n: 300}}, or {} for none"),
    },
    "model": {
        "name": NONEMPTY_STR,
        "load_in_4bit": (_boolean, None, "true or false"),
        "compute_dtype": _one_of("auto", "float32", "bfloat16", "float16"),
        "trust_remote_code": (_boolean, None, "true or false"),
    },
    "prompt": {
        "template": (_text, template_has_fields, "a string with {premise} and {hypothesis} once each, written plainly "
                                          "(no !conversion, :format spec, index or attribute), and no other {...} "
                                          "field; write a literal brace as {{ or }}"),
    },
    "evaluate": {
        "method": _one_of("score", "generate"),
        "batch_size": POSITIVE_INT,
        "max_new_tokens": POSITIVE_INT,
        "probes": (_probe_names, lambda v: len(set(v)) == len(v) and set(v) <= set(PROBES),
                   "a list of distinct probe names from " + ", ".join(PROBES) + " ([] for none)"),
        "hypothesis_only_template": (_text, lambda v: v == "auto" or template_has_fields(v, ["hypothesis"]),
                                     "auto (prompt.template without its {premise} line), or a string with "
                                     "{hypothesis} once and no {premise}, written plainly; a literal brace as "
                                     "{{ or }}"),
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
        "seed": (_integer, lambda v: 0 <= v <= 2**32 - 1, "an integer from 0 to 4294967295 (2**32 - 1, NumPy's range)"),
        "epochs": POSITIVE_INT,
        "batch_size": POSITIVE_INT,
        "micro_batch_tokens": POSITIVE_INT,
        "learning_rate": POSITIVE_NUMBER,
        "weight_decay": (_number, lambda v: v >= 0, "a number >= 0"),
        "warmup_ratio": FRACTION,
        "max_grad_norm": POSITIVE_NUMBER,
        "gradient_checkpointing": (_boolean, None, "true or false"),
        "validation_batch_size": POSITIVE_INT,
        "resume": (_boolean, None, "true or false"),
    },
    "compute": {
        "device": _one_of("auto", "cpu", "cuda"),
        "num_threads": (_integer, lambda v: v >= 0, "an integer >= 0 (0 = auto: the free cores)"),
    },
    "failure_cases": {
        "n_examples": (_integer, lambda v: v >= 0, "an integer >= 0"),
    },
}


# Far-off values: allowed, but so far from what this pipeline is tuned for that the run is likely a mistake (much
# slower, or no learning). Each gets a warning line naming the param and its typical range; the value is used as given.
# name -> (low, high, what happens outside)
TYPICAL = {
    "train.micro_batch_tokens": (64, 65536, "below it each pass holds a sliver of a batch and steps run many times "
                                            "slower; above it the activation memory of one pass grows with it"),
    "train.batch_size": (1, 1024, "above it an epoch takes very few optimizer steps"),
    "train.epochs": (1, 100, "above it training takes that many passes over the data"),
    "train.learning_rate": (1e-6, 0.1, "below it the adapter barely changes; above it the loss diverges"),
    "train.max_grad_norm": (0.01, 1000, "below it every step is clipped to a crawl"),
    "train.weight_decay": (0, 1, "above it the adapter weights are pulled to zero faster than they learn"),
    "train.warmup_ratio": (0, 0.5, "above it most of the run is warm-up at a reduced learning rate"),
    "lora.r": (1, 512, "above it the adapter has as many weights as a full fine-tune, without its benefit"),
    "lora.alpha": (0.1, 1024, "alpha / r scales the adapter's update: far off, it learns nothing or diverges"),
    "evaluate.batch_size": (1, 4096, "above it one pass holds so many prompts that memory runs out"),
    "evaluate.max_new_tokens": (1, 64, "a label is a word or two: generating more only costs time"),
    "failure_cases.n_examples": (0, 1000, "above it the Markdown reports grow long"),
}


def load_params(path="params.yaml", warn=True):
    """params.yaml read and checked (check_params); `warn`: log the far-off values (TYPICAL)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        raw = _read_yaml(text, path)
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found; run from the repository root, where params.yaml lives")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ParamsError(f"{path}: not valid YAML{where} ({shorten(problem)}); fix the syntax")
    except RecursionError:
        raise ParamsError(f"{path}: nested too deeply to read (lists or mappings inside each other); params.yaml "
                          f"needs two levels, groups and their keys")
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not UTF-8 text at byte {e.start}; re-save it as UTF-8")
    except ValueError as e:  # a value YAML cannot convert: an integer of over 4300 digits, a date like 2026-13-45
        raise ParamsError(f"{path}: a value cannot be converted ({shorten(e)}); write it as a plain number or string")
    except IsADirectoryError:
        raise ParamsError(f"{path}: is a directory, not a file; give the params YAML file (params.yaml)")
    except OSError as e:
        raise ParamsError(f"{path}: cannot read the file ({type(e).__name__}); check that it is a UTF-8 text file")
    return check_params(raw, path, warn)


def far_off_values(params):
    """(name, value, low, high, consequence) for every checked param outside its TYPICAL range."""
    for name, (low, high, consequence) in TYPICAL.items():
        group, key = name.split(".")
        value = params.get(group, {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not low <= value <= high:
            yield name, value, low, high, consequence


def _strings(value, where=""):
    """(where, string) of every string in a checked value: its keys and items too."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key, where)
            yield from _strings(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{where}[{i}]")


def _checked(name, given, key, check, path):
    """(problem, None) or (None, the converted value) of `given[key]` under `check` (a SCHEMA entry)."""
    convert, in_range, allowed = check
    if key not in given:
        return f"{path}: {name} is missing; add it ({allowed})", None
    value = given[key]
    try:
        _not_finite(value)
        converted = convert(value)
    except _WrongCase:
        return f"{path}: {name} = {show(value)} has the wrong case; allowed: {allowed} (lower case, without spaces)", None
    except _Invalid as e:
        return f"{path}: {name}{e.where} {e.what}; allowed: {allowed}", None
    except TypeError:
        return (f"{path}: {name} = {show(value)} has the wrong type ({type(value).__name__}); allowed: {allowed}",
                None)
    # after the type check, which bounds the value's size (an alias bomb fails it unexpanded)
    for where, text in _strings(converted):
        problem = unicode_problem(text)
        if problem:  # tokenizers and UTF-8 writers fail on such a string
            return f"{path}: {name}{where} {problem}; write it as UTF-8 text", None
    if in_range is not None and not in_range(converted):
        return f"{path}: {name} = {show(value)} is out of range; allowed: {allowed}", None
    return None, converted


def _resolve_hypothesis_only(params, path):
    """evaluate.hypothesis_only_template: auto replaced by the text it stands for (prompts.without_premise), or,
    when the hypothesis_only probe is run, the problem line if prompt.template has no line of its own for the
    premise."""
    template = params.get("prompt", {}).get("template")
    evaluate = params.get("evaluate", {})
    if evaluate.get("hypothesis_only_template") != "auto" or template is None:
        return []
    if HYPOTHESIS_ONLY not in evaluate.get("probes", [HYPOTHESIS_ONLY]):
        return []  # never used
    derived = without_premise(template)
    if derived is None:
        return [f"{path}: evaluate.hypothesis_only_template = 'auto' needs prompt.template to give {{premise}} a line "
                f"of its own, to leave out; it shares one with {{hypothesis}}: write the hypothesis-only template "
                f"out (the prompt with {{hypothesis}} and without {{premise}}), or drop {HYPOTHESIS_ONLY} from "
                f"evaluate.probes"]
    evaluate["hypothesis_only_template"] = derived
    return []


def check_params(raw, path="params.yaml", warn=True):
    """The checked and converted params from a mapping as read from YAML; `path` names its origin in messages."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of groups ({', '.join(SCHEMA)}); found {type(raw).__name__}")

    problems = [f"{path}: unknown group {show(group)}; allowed groups: {', '.join(SCHEMA)}"
                for group in raw if group not in SCHEMA]
    params = {}
    for group, keys in SCHEMA.items():
        given = raw.get(group)
        if not isinstance(given, dict):
            state = "is missing" if group not in raw else f"= {show(given)} is not a mapping"
            problems.append(f"{path}: group {group} {state}; it needs the keys {', '.join(keys)}")
            continue
        problems += [f"{path}: unknown key {group}.{shorten(key, 60)}; allowed keys in {group}: {', '.join(keys)}"
                     for key in given if key not in keys]
        params[group] = {}
        for key, check in keys.items():
            problem, value = _checked(f"{group}.{key}", given, key, check, path)
            if problem:
                problems.append(problem)
            else:
                params[group][key] = value
    problems += _resolve_hypothesis_only(params, path)
    if problems:  # every bad value at once, one line each
        raise ParamsError("\n".join(problems))

    if warn:
        for name, value, low, high, consequence in far_off_values(params):
            log.warning("%s: %s = %s is far outside its typical range (%s to %s): %s; it is used as given, set it "
                        "within the range unless that is meant", path, name, show(value), low, high, consequence)
    return params

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


class _WrongCase(TypeError):
    """A keyword written in another case ("ALL"): the fix is the case, not the type."""


def _count_or_all(value):
    if isinstance(value, str) and value != "all" and value.strip().lower() == "all":
        raise _WrongCase
    return value if value == "all" else _integer(value)


def _modules(value):
    if value == "all-linear":
        return value
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise TypeError
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


SPLIT_ROLES = ("train", "validation", "test")
PROBES = ("hypothesis_only", "swap_contradiction", "premise_as_hypothesis", "tautology", "negation_tautology")
_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _split_names(value):
    if not isinstance(value, dict) or sorted(value) != sorted(SPLIT_ROLES):
        raise TypeError
    if not all(isinstance(v, str) and v.strip() for v in value.values()):
        raise TypeError
    return dict(value)


def _extra_sets(value):
    """{name: {source, split, n}}; the name becomes a file name, n an evenly spaced sample size or "all"."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError
    checked = {}
    for name, spec in value.items():
        if not (isinstance(name, str) and _SET_NAME.match(name)) or not isinstance(spec, dict):
            raise TypeError
        if sorted(spec) != ["n", "source", "split"]:
            raise TypeError
        if not all(isinstance(spec[k], str) and spec[k].strip() for k in ("source", "split")):
            raise TypeError
        checked[name] = {"source": spec["source"], "split": spec["split"], "n": _count_or_all(spec["n"])}
        if checked[name]["n"] != "all" and checked[name]["n"] < 1:
            raise TypeError
    return checked


def _probe_names(value):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError
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
        "device": _one_of("auto", "cpu", "cuda"),
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
        "hypothesis_only_template": (_text, lambda v: template_has_fields(v, ["hypothesis"]),
                                     "a string with {hypothesis} once and no {premise} (the prompt.template without "
                                     "the premise), written plainly; a literal brace as {{ or }}"),
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
        "num_threads": (_integer, lambda v: v >= 0, "an integer >= 0 (0 = auto: the free cores)"),
        "resume": (_boolean, None, "true or false"),
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
            except _WrongCase:
                raise ParamsError(f"{path}: {name} = {_show(value)} has the wrong case; allowed: {allowed} "
                                  f"(lower case, without spaces)")
            except TypeError:
                raise ParamsError(f"{path}: {name} = {_show(value)} has the wrong type "
                                  f"({type(value).__name__}); allowed: {allowed}")
            if in_range is not None and not in_range(converted):
                raise ParamsError(f"{path}: {name} = {_show(value)} is out of range; allowed: {allowed}")
            params[group][key] = converted

    return params


def _blocks(model):
    """The name of the transformer blocks' list (e.g. model.layers): the longest ModuleList of the model."""
    import torch

    lists = [(len(m), name) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    return max(lists)[1] if lists else None


def _is_linear(module):
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # Conv1D: GPT-2's linear layer


def check_target_modules(model, target_modules, path="params.yaml"):
    """Each entry of lora.target_modules must name linear layers inside the transformer blocks, and only those,
    matched the way peft matches a list (the last part or parts of a module name). "all-linear" is peft's own
    choice of exactly those."""
    if target_modules == "all-linear":
        return
    blocks = _blocks(model)
    inside = [(name, module) for name, module in model.named_modules()
              if blocks and name.startswith(blocks + ".")]
    outside = [name for name, _ in model.named_modules()
               if name and not (blocks and (name == blocks or name.startswith(blocks + ".")))]
    allowed = ", ".join(sorted({name.rsplit(".", 1)[-1] for name, module in inside if _is_linear(module)}))

    def matches(name, wanted):
        return name == wanted or name.endswith("." + wanted)

    for wanted in target_modules:
        hits = [module for name, module in inside if matches(name, wanted)]
        stray = [name for name in outside if matches(name, wanted)]
        if stray:
            raise ParamsError(f"{path}: lora.target_modules entry '{wanted}' names {stray[0]}, outside the "
                              f"transformer blocks, the only place this pipeline adapts (see lora.layers); allowed: "
                              f"linear layers inside the blocks: {allowed or '(none found)'}")
        if not hits or not all(_is_linear(m) for m in hits):
            what = "matches no module of the model" if not hits else f"is not a linear layer ({type(hits[0]).__name__})"
            raise ParamsError(f"{path}: lora.target_modules entry '{wanted}' {what}; allowed: linear layers "
                              f"inside the blocks: {allowed or '(none found)'}")


def check_split_size(key, requested, available, path="params.yaml"):
    """Prepare samples without replacement: asking for more pairs than a split holds is a params error."""
    if requested > available:
        hint = ', or "all"' if key.endswith(("n_test", ".n")) else ""
        raise ParamsError(f"{path}: {key} = {requested} is larger than the split ({available} labeled pairs); "
                          f"allowed: an integer from 1 to {available}{hint}")

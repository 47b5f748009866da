"""lm-evaluation-harness tasks for the pipeline's evaluation sets, so the standard evaluator scores a model as
`evaluate` does: the same prompt (params.yaml prompt.template), the same three answers (" entailment", ...), the
label with the highest log-likelihood as the prediction.

Each task is a `multiple_choice` task: lm-eval appends `target_delimiter` + each choice to the prompt and sums the
log-likelihoods of the continuation's tokens, which is `infer.scoring.score_labels` (prompt and answer tokenized apart,
no BOS token, like the pipeline's tokenizer call). The tasks read the pipeline's own JSONL files (data/test.jsonl,
data/sets/<name>.jsonl) by absolute path: no data is copied, and a task file is only as portable as that path.
"""
import string
from pathlib import Path

import yaml

from qlora_nli.data.artifacts import data_row_problem, read_rows
from qlora_nli.prompts import LABELS, answer_text
from qlora_nli.runtime.errors import ArtifactError

FOLDER = "lm_eval"  # in an export: lm_eval/<task>.yaml, for `lm_eval --include_path <export>/lm_eval`
PREFIX = "qlora_nli_"  # task names: qlora_nli_test, qlora_nli_mnli_matched, ...
DELIMITER = answer_text(0)[: -len(LABELS[0])]  # what precedes the label word in an answer: a space


def jinja_template(template):
    """prompt.template (a Python format string with {premise} and {hypothesis}) as the Jinja template lm-eval
    renders, with the fields stripped as prompts.format_prompt strips them."""
    parts = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        if literal:
            parts.append(literal if "{" not in literal and "}" not in literal
                         else "{% raw %}" + literal + "{% endraw %}")
        if field is not None:
            if field not in ("premise", "hypothesis") or spec or conversion:
                raise ArtifactError(f"prompt.template: field {{{field}}} cannot be written as an lm-eval task; "
                                    f"use {{premise}} and {{hypothesis}} only")
            parts.append("{{" + field + ".strip()}}")
    return "".join(parts)


def task(name, data_file, template):
    return {
        "task": PREFIX + name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": jinja_template(template),
        "doc_to_choice": list(LABELS),
        "doc_to_target": "{{label}}",
        "target_delimiter": DELIMITER,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def check_sets(sets):
    """Every set ({name: JSONL path}) a file of rows in the pipeline's schema (data.artifacts.data_row_problem), as
    the lm-eval tasks will read it; ArtifactError naming the file and line otherwise."""
    for data_file in sets.values():
        try:
            read_rows(data_file, data_row_problem)
        except ArtifactError as e:
            raise ArtifactError(f"lm-eval tasks: {e} (or pass --no-lm-eval)")


def write_tasks(folder, sets, template):
    """One task file per set ({name: JSONL path}, checked by check_sets) in `folder`; returns the task names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name, data_file in sets.items():
        spec = task(name, data_file, template)
        (folder / f"{spec['task']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
        names.append(spec["task"])
    return names


def pipeline_sets(data_dir="data"):
    """The evaluation sets `evaluate` scores: the test pairs and every extra set in data/sets/."""
    data_dir = Path(data_dir)
    sets = {"test": data_dir / "test.jsonl"}
    sets.update({p.stem: p for p in sorted((data_dir / "sets").glob("*.jsonl"))})
    return sets

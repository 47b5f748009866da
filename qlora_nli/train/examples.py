"""What the loop trains and validates on: the pairs as token ids, checked against the model's context before any
weights load."""
from dataclasses import dataclass

from qlora_nli.prompts import (
    check_prompt_lengths,
    encode_answers,
    encode_prompts,
    format_prompt,
)

TOO_LONG_FIX = "remove the pair from data.source and rerun `dvc repro prepare`, or use a model with a longer context"


@dataclass
class Examples:
    """Training pairs as token ids: each prompt and the answer tokens of its label."""
    prompt_ids: list
    answer_ids: list
    pad_id: int

    @property
    def lengths(self):
        return [len(p) + len(a) for p, a in zip(self.prompt_ids, self.answer_ids)]


@dataclass
class Validation:
    """The validation pairs, scored after every epoch as `evaluate` scores (label log-likelihoods)."""
    tokenizer: object
    prompts: list
    labels: list
    answers: list
    batch_size: int


def encode(tokenizer, template, train_rows, val_rows, context, validation_batch_size):
    """(Examples, Validation) of the rows; a pair longer than `context` (prompt plus the longest answer) is refused
    with the file and row, before any weights load: it could be neither trained on nor scored."""
    answers = encode_answers(tokenizer)
    prompt_ids = encode_prompts(tokenizer, [format_prompt(template, r) for r in train_rows])
    examples = Examples(prompt_ids, [answers[r["label"]] for r in train_rows], tokenizer.pad_token_id)
    validation = Validation(tokenizer, [format_prompt(template, r) for r in val_rows], [r["label"] for r in val_rows],
                            answers, validation_batch_size)
    longest_answer = max(map(len, answers))
    check_prompt_lengths(tokenizer, None, context, lambda i: f"data/train.jsonl row {i + 1}", TOO_LONG_FIX,
                         longest_answer, prompt_ids)
    check_prompt_lengths(tokenizer, validation.prompts, context, lambda i: f"data/validation.jsonl row {i + 1}",
                         TOO_LONG_FIX, longest_answer)
    return examples, validation

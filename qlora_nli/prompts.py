"""The prompt and the label words: one definition shared by training, scoring and generation."""
import logging
import re
import string

from qlora_nli.runtime.errors import DataError

log = logging.getLogger(__name__)


LABELS = ("entailment", "neutral", "contradiction")  # index = SNLI label id

def format_prompt(template, row):
    return template.format(premise=row["premise"].strip(), hypothesis=row["hypothesis"].strip())


def without_premise(template):
    """The hypothesis-only prompt of `template` (evaluate.hypothesis_only_template: auto): its text without the lines
    that hold the {premise} field, so that the instruction and the answer cue stay those the model is trained on;
    None when {premise} shares a line with {hypothesis}, which leaves no line to drop."""
    lines = template.split("\n")
    fields = [{name for _, name, _, _ in string.Formatter().parse(line) if name} for line in lines]
    if any({"premise", "hypothesis"} <= names for names in fields):
        return None
    return "\n".join(line for line, names in zip(lines, fields) if "premise" not in names)


def answer_text(label_id):
    """The completion the model is trained on and scored for: a space, then the label word."""
    return " " + LABELS[label_id]


# What a premise or hypothesis may hold, checked wherever text enters (prepare's raw data, the data/ files the stages
# read, nli-predict's input). At about 4 characters per English token, MAX_TEXT_CHARS is about the embedded model's
# 8,192-token context: a longer text cannot fit, and refusing it by its length never tokenizes a huge string. Whether
# a pair fits the context of the model actually used is checked in tokens once its tokenizer is loaded
# (prompts.check_prompt_lengths).
MAX_TEXT_CHARS = 32_768
# C0 and C1 control characters (NUL, ESC, DEL, U+0085 ...), except tab, line feed and carriage return, which are
# ordinary whitespace in text (a CSV cell may hold a line break). Format characters (soft hyphen, zero-width joiner)
# and no-break spaces are text: MultiNLI holds some.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# A lone surrogate is no character: a JSON escape like "\ud800" or, on a command line, bytes that are not UTF-8.
# Tokenizers and UTF-8 writers fail on it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def unicode_problem(text):
    """What makes a string not valid Unicode text (a lone surrogate), or None."""
    found = _SURROGATE.search(text)
    if found:
        return (f"holds U+{ord(found.group()):04X} at character {found.start() + 1}, which is not valid Unicode "
                f"(a lone surrogate, from a JSON escape like \\ud800 or bytes that are not UTF-8)")
    return None


def text_problem(text):
    """What makes a premise or hypothesis (a string) unusable, or None: longer than MAX_TEXT_CHARS, or holding a
    control character or a lone surrogate."""
    if len(text) > MAX_TEXT_CHARS:
        return f"is {len(text):,} characters long, more than the {MAX_TEXT_CHARS:,} a pair's text may have"
    control = _CONTROL.search(text)
    if control:
        return f"holds the control character U+{ord(control.group()):04X} at character {control.start() + 1}"
    return unicode_problem(text)


def pair_text_problem(text):
    """What makes the premise or hypothesis of a pair to train on, score or predict unusable, or None: text_problem's
    rules, and empty (prepare skips such pairs in the raw data; no prediction can be made of one)."""
    return "is empty" if not text.strip() else text_problem(text)


def encode_prompts(tokenizer, prompts):
    return [tokenizer(p).input_ids for p in prompts]


def encode_answers(tokenizer):
    """Token ids of each label's answer, index = label id."""
    return [tokenizer(answer_text(k), add_special_tokens=False).input_ids for k in range(len(LABELS))]


def check_prompt_lengths(tokenizer, prompts, context, where, fix, extra_tokens=0, prompt_ids=None):
    """Every prompt, with `extra_tokens` after it (the longest answer, or the tokens to generate), must fit the model's
    `context` (modeling.context_length; None = unknown, nothing checked). `where(i)` names prompt i in the message,
    `fix` ends it. The prompts' texts are already bounded in characters (prompts.MAX_TEXT_CHARS), so tokenizing them
    here is cheap; `prompt_ids` (their token ids) saves even that."""
    if context is None:
        return
    for start in range(0, len(prompts if prompt_ids is None else prompt_ids), 256):
        ids = prompt_ids[start:start + 256] if prompt_ids is not None else \
            tokenizer(list(prompts[start:start + 256])).input_ids
        for i, sequence in enumerate(ids, start):
            if len(sequence) + extra_tokens > context:
                raise DataError(f"{where(i)}: its prompt is {len(sequence):,} tokens, {len(sequence) + extra_tokens:,} "
                                f"with the answer, more than the model's context of {context:,} tokens; {fix}")

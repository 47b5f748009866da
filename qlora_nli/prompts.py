"""The prompt and the label words: one definition shared by training, scoring and generation."""

LABELS = ("entailment", "neutral", "contradiction")  # index = SNLI label id

# The default of params.yaml prompt.template; tests use it too.
TEMPLATE = ("Classify the relation of the hypothesis to the premise as entailment, neutral or contradiction.\n"
            "Premise: {premise}\nHypothesis: {hypothesis}\nRelation:")


def format_prompt(template, row):
    return template.format(premise=row["premise"].strip(), hypothesis=row["hypothesis"].strip())


def answer_text(label_id):
    """The completion the model is trained on and scored for: a space, then the label word."""
    return " " + LABELS[label_id]

"""Surface features of a premise/hypothesis pair, and error rates by feature slice.

Failure cases are explained from these measured slices (e.g. "the fine-tuned model errs on 45% of pairs with
negation vs 20% overall"), not from guesses. The features are the classic SNLI annotation artifacts:
negation words signal contradiction and high word overlap signals entailment.

Slice boundaries (chosen before looking at results):
  overlap   low < 0.5 <= mid < 0.8 <= high   (fraction of hypothesis content words found in the premise)
  negation  yes | no
  length    short <= 5 < medium <= 10 < long (hypothesis words; SNLI hypotheses average about 7)
  gold label  entailment | neutral | contradiction
"""
import re

from qlora_nli.prompts import LABELS

# function words only: numbers, pronouns and negations carry NLI meaning ("two men", "she", "not")
STOPWORDS = frozenset("""
a an the this that these those and or but of to in on at by for with from into onto up out over as
is are was were be been being am do does did has have had it its it's there who which while
""".split())

# negation words stay content words: "not" absent from the premise is exactly the kind of new word that matters
NEGATIONS = frozenset("not no never nobody nothing none neither nor nowhere cannot without".split())

OVERLAP_BOUNDS = (0.5, 0.8)
LENGTH_BOUNDS = (5, 10)
EVIDENCE_MIN_N, EVIDENCE_MIN_GAP = 5, 0.10  # a slice is cited as evidence only if this large and this much worse

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")  # keeps "isn't" whole, drops punctuation


def words(text):
    return _WORD.findall(text.lower())


def _norm(word):
    """Crude plural folding for matching only, so "dogs" in the hypothesis matches "dog" in the premise."""
    word = word.removesuffix("'s")
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def content_words(text):
    """Hypothesis words that carry meaning: not stopwords, each once, in order of appearance."""
    seen, out = set(), []
    for w in words(text):
        if w not in STOPWORDS and w not in seen:
            seen.add(w)
            out.append(w)
    return out


def has_negation(text):
    return any(w in NEGATIONS or w.endswith("n't") for w in words(text))


def pair_features(premise, hypothesis):
    premise_words = {_norm(w) for w in words(premise)}
    content = content_words(hypothesis)
    new = [w for w in content if _norm(w) not in premise_words]
    return {
        # a hypothesis with no content words adds nothing to the premise: full overlap
        "word_overlap": round(1 - len(new) / len(content), 4) if content else 1.0,
        "has_negation": has_negation(hypothesis),
        "hypothesis_length": len(words(hypothesis)),
        "new_words": new,
    }


def overlap_bucket(overlap):
    return "low" if overlap < OVERLAP_BOUNDS[0] else "high" if overlap >= OVERLAP_BOUNDS[1] else "mid"


def length_bucket(n_words):
    return "short" if n_words <= LENGTH_BOUNDS[0] else "long" if n_words > LENGTH_BOUNDS[1] else "medium"


def slices_of(features, label=None):
    """The slice value of a pair for each slice name (the gold-label slice only when label is given)."""
    out = {
        "overlap": overlap_bucket(features["word_overlap"]),
        "negation": "yes" if features["has_negation"] else "no",
        "length": length_bucket(features["hypothesis_length"]),
    }
    if label is not None:
        out["gold label"] = LABELS[label]
    return out


def tag_features(features):
    """Human-readable tags of a pair's features, for the failure-case report."""
    tags = []
    if features["has_negation"]:
        tags.append("negation in hypothesis")
    tags.append(f"{overlap_bucket(features['word_overlap'])} overlap ({features['word_overlap']:.0%})")
    tags.append(f"{length_bucket(features['hypothesis_length'])} hypothesis ({features['hypothesis_length']} words)")
    new = features["new_words"]
    if new:
        tags.append(f"{len(new)} new word{'s' if len(new) > 1 else ''}: {', '.join(new)}")
    else:
        tags.append("no new words")
    return tags


def error_rates_by_slice(rows):
    """Error rate of each model on every slice value, plus the overall ("all") row first.

    rows: dicts with premise, hypothesis, label, baseline_correct, finetuned_correct.
    Returns [{slice, value, n, baseline_errors, finetuned_errors, baseline_error, finetuned_error}] (counts and
    rates), values in a fixed order, empty slices left out.
    """
    groups = {("all", "all"): []}
    for row in rows:
        feats = pair_features(row["premise"], row["hypothesis"])
        for name, value in slices_of(feats, row["label"]).items():
            groups.setdefault((name, value), []).append(row)
    order = {"overlap": ("low", "mid", "high"), "negation": ("yes", "no"),
             "length": ("short", "medium", "long"), "gold label": LABELS}
    out = [_error_row("all", "all", rows)]
    for name, values in order.items():
        out += [_error_row(name, v, groups[(name, v)]) for v in values if groups.get((name, v))]
    return out


def _error_row(name, value, rows):
    n = len(rows)
    baseline_errors = sum(not r["baseline_correct"] for r in rows)
    finetuned_errors = sum(not r["finetuned_correct"] for r in rows)
    return {
        "slice": name,
        "value": value,
        "n": n,
        "baseline_errors": baseline_errors,  # counts too: a change computed from rounded rates would be off
        "finetuned_errors": finetuned_errors,
        "baseline_error": round(baseline_errors / n, 4) if n else None,
        "finetuned_error": round(finetuned_errors / n, 4) if n else None,
    }


def error_change(s):
    """Fine-tuned minus baseline error rate of a slice row, from its error counts (exact, not a difference of roundings)."""
    return round((s["finetuned_errors"] - s["baseline_errors"]) / s["n"], 4)


def confusion_pairs(gold, pred):
    """Counts of "gold -> predicted" over wrong predictions, most frequent first; unparseable output is "invalid"."""
    counts = {}
    for g, p in zip(gold, pred):
        if p != g:
            key = f"{LABELS[g]} -> {'invalid' if p is None else LABELS[p]}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def explain(case_slices, slice_table, model, min_gap=EVIDENCE_MIN_GAP, min_n=EVIDENCE_MIN_N):
    """One sentence of evidence: which of this case's slices have an error rate clearly above the overall one.

    A slice counts as evidence when it holds at least min_n pairs and the model's error rate on it exceeds the
    overall rate by at least min_gap; otherwise the sentence says the features do not explain the error.
    model: "baseline" or "finetuned", the model whose error is being explained.
    """
    key = f"{model}_error"
    rates = {(r["slice"], r["value"]): r for r in slice_table}
    overall = rates[("all", "all")][key]
    evidence = []
    for name, value in case_slices.items():
        r = rates.get((name, value))
        if r and r["n"] >= min_n and round(r[key] - overall, 4) >= min_gap:  # rounded: 0.3 - 0.2 < 0.1 in floats
            evidence.append((r[key] - overall, f"{name} = {value} ({r['n']} pairs) {r[key]:.0%}"))
    who = "fine-tuned" if model == "finetuned" else "baseline"
    if not evidence:
        return (f"No slice of this pair has a {who} error rate {100 * min_gap:.0f}+ points above the overall "
                f"{overall:.0%}; the measured features do not explain this error.")
    evidence.sort(key=lambda e: -e[0])
    cited = "; ".join(e[1] for e in evidence)
    return f"{who.capitalize()} error rate on this pair's slices: {cited} vs {overall:.0%} overall."

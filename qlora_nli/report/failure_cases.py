"""reports/failure_cases.md: the failure cases rendered as Markdown."""
import logging

from qlora_nli.analysis.failure_cases import MEANING
from qlora_nli.analysis.features import (
    EVIDENCE_MIN_GAP,
    EVIDENCE_MIN_N,
    LENGTH_BOUNDS,
    OVERLAP_BOUNDS,
)
from qlora_nli.report import markdown as md

log = logging.getLogger("failure_cases")


def case_markdown(c):
    def answer(v):
        conf = "" if v["confidence"] is None else f" (confidence {v['confidence']:.2f})"
        return f"{v['pred_label']}{conf}"

    return (f"**#{c['id']}** gold: {c['gold_label']} · baseline: {answer(c['baseline'])} · "
            f"fine-tuned: {answer(c['finetuned'])}\n\n"
            f"> Premise: {c['premise']}\n>\n> Hypothesis: {c['hypothesis']}\n\n"
            f"Tags: {'; '.join(c['tags'])}.\n\n"
            f"Evidence: {c['explanation']}\n")


def report_markdown(result, comparison, examples):
    counts = result["counts"]
    lines = [
        "# Failure cases: baseline vs fine-tuned\n",
        f"Test pairs: {result['n']}. Accuracy {md.pct(comparison['baseline_accuracy'])} (baseline) -> "
        f"{md.pct(comparison['finetuned_accuracy'])} (fine-tuned): {md.pp(comparison['difference'])}, "
        f"95% CI {md.ci(comparison['difference_ci95'], md.pp)}, "
        f"exact McNemar p = {md.pvalue(comparison['mcnemar_p'])}.\n",
        md.table(["category", "meaning", "pairs"], [(k, MEANING[k], counts[k]) for k in MEANING]),
        "## Error rate by feature slice\n",
        f"Slices: word overlap of hypothesis content words with the premise (low < {OVERLAP_BOUNDS[0]} <= mid < "
        f"{OVERLAP_BOUNDS[1]} <= high), negation word in the hypothesis, hypothesis length "
        f"(short <= {LENGTH_BOUNDS[0]} < medium <= {LENGTH_BOUNDS[1]} < long words), gold label. "
        "Change = fine-tuned minus baseline error.\n",
        md.slice_table(result["slices"]),
        "## Most frequent confusions (gold -> predicted, wrong predictions only)\n",
    ]
    pairs = result["confusion_pairs"]
    keys = sorted(set(pairs["baseline"]) | set(pairs["finetuned"]),
                  key=lambda k: (-pairs["finetuned"].get(k, 0), -pairs["baseline"].get(k, 0), k))
    lines.append(md.table(["confusion", "baseline", "fine-tuned"],
                          [(k, pairs["baseline"].get(k, 0), pairs["finetuned"].get(k, 0)) for k in keys]))
    lines += ["## What the probes show\n", *(f"- {claim}" for claim in result["evidence"]["claims"]), "",
              "## Examples\n", f"Selection rule: {result['selection_rule']}\n",
              "Evidence sentences compare the error rate of the slices a pair falls in with the overall error rate "
              f"(a slice is cited when it has at least {EVIDENCE_MIN_N} pairs and an error rate at least "
              f"{100 * EVIDENCE_MIN_GAP:.0f} percentage points above overall).\n"]
    for category in ("corrected", "not_corrected", "regressed"):
        shown = examples[category]
        lines.append(f"### {category.replace('_', ' ').capitalize()}: {len(shown)} of {counts[category]} "
                     f"({MEANING[category]})\n")
        lines += [case_markdown(c) for c in shown] or ["None.\n"]
    return "\n".join(lines)

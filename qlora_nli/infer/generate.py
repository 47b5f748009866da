"""Greedy generation of the answer and parsing it into a label (evaluate.method: generate)."""
import logging
import re

import torch
from tqdm import tqdm

from qlora_nli.forward import left_pad
from qlora_nli.infer.scoring import length_sorted_batches
from qlora_nli.prompts import LABELS, encode_prompts
from qlora_nli.runtime import threads
from qlora_nli.runtime.distributed import SINGLE, gather_by_index

log = logging.getLogger(__name__)


def parse_label(text):
    """Label id from a generated answer, or None. Only the first word counts: "Entailment." -> 0, but
    "not entailment" -> None, because a reader could not tell which of the other two labels was meant."""
    words = re.findall(r"[a-z]+", (text or "").lower())
    return LABELS.index(words[0]) if words and words[0] in LABELS else None


@torch.no_grad()
def generate_answers(model, tokenizer, prompts, batch_size, max_new_tokens, desc="generating", ranks=SINGLE):
    """Greedy continuation of each prompt, decoded to text (special tokens dropped). Each rank generates its share
    of the batches and every rank gets all the texts."""
    device = model.device
    prompt_ids = encode_prompts(tokenizer, prompts)
    mine = {}
    for idx in tqdm(ranks.share(length_sorted_batches(prompt_ids, batch_size)), desc=desc, unit="batch", leave=False):
        threads.adapt()
        input_ids, mask, _ = left_pad([prompt_ids[i] for i in idx], tokenizer.pad_token_id, device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for i, row in zip(idx, out[:, input_ids.size(1):]):
            mine[i] = tokenizer.decode(row, skip_special_tokens=True)
    every = gather_by_index(ranks, mine)
    return [every[i] for i in range(len(prompts))]

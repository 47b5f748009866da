"""Fine-tuning changes the model: on a task a tiny model can learn, the training loop drives the loss down and the
validation accuracy far above chance, and the LoRA weights move. Identical reruns or resumes would not show this:
a no-op optimizer step gives those too."""
import random

import pytest
import torch
from tiny import OBJECTS, SUBJECTS, make_tiny_model

from qlora_nli.infer.scoring import score_labels
from qlora_nli.model import adapters, loading
from qlora_nli.prompts import LABELS, encode_answers, encode_prompts
from qlora_nli.train.batches import length_grouped_batches
from qlora_nli.train.examples import Examples
from qlora_nli.train.loop import (
    TrainingSetup,
    make_optimizer,
    make_scheduler,
    set_seed,
    train_one_epoch,
)

# The label is given away by the verb of the hypothesis (one short word each); premises are noise.
CUE_VERBS = ("runs", "paints", "climbs")
TEMPLATE = "Premise: {premise}\nHypothesis: {hypothesis}\nRelation:"  # short: the test stays fast


def cue_pairs(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.randrange(len(LABELS))
        premise = f"{rng.choice(SUBJECTS)} {rng.choice(CUE_VERBS)} {rng.choice(OBJECTS)}."
        rows.append({"premise": premise, "hypothesis": f"{rng.choice(SUBJECTS)} {CUE_VERBS[label]}.", "label": label})
    return rows


@pytest.fixture(scope="module")
def learnable_model_dir(tmp_path_factory):
    """A tiny Llama (the embedded model's architecture) initialised larger than usual: at the default scale (std 0.02)
    the final norm and the frozen output head keep every logit near zero, so no adapter in the blocks could make an
    answer likely. (The tiny Phi learns the same task more slowly: more epochs than this test should take.)"""
    return make_tiny_model("llama", tmp_path_factory.mktemp("learnable"), initializer_range=0.2)


def test_training_learns_a_task_given_away_by_one_word(learnable_model_dir):
    set_seed(0)
    # not 4-bit: the same training loop, several times faster on CPU
    model = loading.load_base_model({"name": str(learnable_model_dir), "load_in_4bit": False,
                                      "compute_dtype": "float32"}, "cpu")
    model = adapters.attach_lora(model, {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear",
                                         "layers": "all"})
    tokenizer = loading.load_tokenizer(str(learnable_model_dir))
    answers = encode_answers(tokenizer)
    train, val = cue_pairs(48, seed=1), cue_pairs(30, seed=2)
    prompt_ids = encode_prompts(tokenizer, [TEMPLATE.format(**r) for r in train])
    answer_ids = [answers[r["label"]] for r in train]
    val_prompts, val_labels = [TEMPLATE.format(**r) for r in val], torch.tensor([r["label"] for r in val])

    def val_accuracy():
        model.eval()
        predicted = score_labels(model, tokenizer, val_prompts, batch_size=16).argmax(1)
        return (predicted == val_labels).float().mean().item()

    lora = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in name for name in lora)
    chance = max(torch.bincount(val_labels).tolist()) / len(val)  # always answering the most frequent label
    accuracy_before = val_accuracy()

    t = {"learning_rate": 1e-2, "weight_decay": 0.0, "micro_batch_tokens": 4096, "max_grad_norm": 1.0}
    epochs, batch_size = 6, 8
    optimizer, _ = make_optimizer(model, t, "cpu")
    scheduler = make_scheduler(optimizer, epochs * -(-len(train) // batch_size), warmup_ratio=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    setup = TrainingSetup(model, optimizer, "adamw", scheduler, scaler, {}, {})
    examples = Examples(prompt_ids, answer_ids, tokenizer.pad_token_id)
    lengths = [len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)]
    step_losses, epoch_losses = [], []
    for epoch in range(1, epochs + 1):
        batches = length_grouped_batches(lengths, batch_size, seed=epoch)
        epoch_losses.append(train_one_epoch(setup, examples, batches, t, torch.float32,
                                            on_step=lambda loss, lr: step_losses.append(loss)))
    accuracy_after = val_accuracy()

    # the loss of the first step is the untrained model's; the last epoch's mean is far below it
    assert epoch_losses[-1] < 0.25 * step_losses[0], (step_losses[0], epoch_losses)
    assert accuracy_after >= 0.8 > chance + 0.3, (accuracy_before, accuracy_after, chance)
    for name, before in lora.items():  # every adapter matrix was trained, not just some
        assert not torch.equal(dict(model.named_parameters())[name].detach(), before), name

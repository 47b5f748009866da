"""bench_train.py's "naive" side, run in its own child process: the assignment-notebook recipe.
transformers.Trainer + DataCollatorForLanguageModeling(mlm=False) on the full "prompt + answer" text padded to one
fixed length (the longest tokenized example of the sample, its fairest value), loss over ALL tokens, evaluation by
greedy `model.generate` (max_new_tokens = evaluate.max_new_tokens, length-sorted batches of evaluate.batch_size) +
scoring.parse_label (an unparseable answer counts as wrong). params.yaml values only (`--set` does not touch it).
"""
import logging
import tempfile
import time

from common import rss_peak_mb
from flops import model_dims
from train_shared import finish_side, start_side, train_summary

log = logging.getLogger("bench_train")


def _load_model(params):
    """The naive side's model: 4-bit base + LoRA with the same seed, config and loaders as the pipeline's."""
    from qlora_nli.model import adapters, loading
    from qlora_nli.train.loop import set_seed

    set_seed(params["train"]["seed"])  # LoRA init is random: same seed, same start on both sides
    model = loading.load_base_model(params["model"], "cpu")
    total = loading.count_parameters(model)["total"]
    model = adapters.attach_lora(model, params["lora"], params["train"]["gradient_checkpointing"])
    return model, model_dims(model, total, loading.count_parameters(model)["trainable"], params)



def child_naive(spec):
    """The notebook recipe: HF Trainer, fixed-length padding, loss over all tokens, generate + parse."""
    import torch
    from transformers import (
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from qlora_nli.prompts import answer_text
    from qlora_nli.runtime.resources import ResourceMonitor

    params, t = spec["params"], spec["params"]["train"]
    result, tokenizer, train_rows, (prompts, prompt_ids, answer_ids, lengths), test_rows, test_prompts = \
        start_side(spec)

    # The notebook way: tokenize "prompt + answer" as one text, pad everything to one length. Its fairest value is
    # the longest example of the sample (nothing truncated, no padding beyond what the sample needs).
    texts = [p + answer_text(r["label"]) for p, r in zip(prompts, train_rows)]
    joined = [tokenizer(x).input_ids for x in texts]
    fixed_length = max(len(ids) for ids in joined)
    encoded = tokenizer(texts, padding="max_length", max_length=fixed_length, truncation=True)
    result["tokenization"] = {
        "fixed_length": fixed_length, "padding_side": tokenizer.padding_side,
        # 0 means the joined text tokenizes exactly as prompt ids + answer ids: the real-token counts agree
        "examples_tokenized_differently": sum(j != p + a for j, p, a in zip(joined, prompt_ids, answer_ids)),
    }
    dataset = [{"input_ids": ids, "attention_mask": mask, "n_real": n, "n_answer": len(a)}
               for ids, mask, n, a in zip(encoded["input_ids"], encoded["attention_mask"], lengths, answer_ids)]

    class CountingCollator:
        """DataCollatorForLanguageModeling(mlm=False) (labels = input ids, padding -> -100); remembers which
        examples went into each batch, for the token counts."""

        def __init__(self):
            self.inner = DataCollatorForLanguageModeling(tokenizer, mlm=False)
            self.batches = []

        def __call__(self, features):
            self.batches.append([(f["n_real"], f["n_answer"]) for f in features])
            return self.inner([{"input_ids": f["input_ids"], "attention_mask": f["attention_mask"]} for f in features])

    class StepClock(TrainerCallback):
        """Seconds of each optimizer step; with spec["train_seconds_limit"] (bench_contention), training stops after
        the step that passes it (at least two steps)."""

        def __init__(self, limit):
            self.limit, self.seconds = limit, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begun = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.seconds.append(now - self.step_start)
            if self.limit and len(self.seconds) >= 2 and now - self.begun > self.limit:
                control.should_training_stop = True

    class LossLog(TrainerCallback):
        def __init__(self):
            self.losses = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    accumulation = 1  # the whole batch in one pass: the notebooks' way, and its fastest on CPU
    with ResourceMonitor() as monitor, tempfile.TemporaryDirectory(prefix="bench_naive.") as output_dir:
        model, result["model_dims"] = _load_model(params)  # same 4-bit base, LoRA config and seed as ours
        result["rss_mb_after_load"] = rss_peak_mb()
        collator, loss_log, clock = CountingCollator(), LossLog(), StepClock(spec.get("train_seconds_limit"))
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=t["batch_size"],
            gradient_accumulation_steps=accumulation,
            num_train_epochs=t["epochs"],
            max_steps=spec["max_batches"] * t["epochs"] if spec["max_batches"] else -1,
            learning_rate=t["learning_rate"],
            warmup_steps=t["warmup_ratio"],  # transformers 5: a float < 1 is a ratio of the total steps
            lr_scheduler_type="linear",
            weight_decay=t["weight_decay"],
            max_grad_norm=t["max_grad_norm"],
            seed=t["seed"],
            data_seed=t["seed"],
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            dataloader_num_workers=0,
            dataloader_pin_memory=False,  # no GPU to pin for
            remove_unused_columns=False,  # our examples carry n_real/n_answer for the counts; the collator drops them
            logging_steps=10,
            disable_tqdm=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=[loss_log, clock])
        result["optimizer"] = getattr(args.optim, "value", str(args.optim))
        log.info("naive: training %d epoch(s) with transformers.Trainer, fixed length %d", t["epochs"], fixed_length)
        start = time.perf_counter()
        output = trainer.train()
        train_seconds = time.perf_counter() - start
        result["rss_mb_peak_after_train"] = rss_peak_mb()
        result["torch_threads_after_train"] = torch.get_num_threads()  # Trainer/accelerate must not change it
        result["step_seconds"] = [round(s, 3) for s in clock.seconds]

        # Batches that were trained on (with --max-batches the dataloader may have collated one more).
        trained = collator.batches[: trainer.state.global_step * accumulation] if spec["max_batches"] \
            else collator.batches
        examples = [e for batch in trained for e in batch]
        result["step_examples"] = [len(batch) for batch in trained]
        counts = {
            "examples": len(examples),
            "real_tokens": sum(n for n, _ in examples),
            "answer_tokens": sum(a for _, a in examples),
            "attn_pairs_real": sum(n * (n + 1) // 2 for n, _ in examples),
            "lm_head_positions_model": sum(n - 1 for n, _ in examples),  # every real token but the first is a target
            "executed_positions": len(examples) * fixed_length,
            "lm_head_positions_executed": len(examples) * fixed_length,
            "attn_pairs_executed": len(examples) * fixed_length * fixed_length,
        }
        # Trainer reports one mean over the run (per-epoch means would need a callback per epoch)
        result.update(train_summary(counts, train_seconds, [output.training_loss],
                                     "mean cross-entropy over all non-padding tokens (not comparable with ours)",
                                     t["gradient_checkpointing"]))
        result["train_loss_logged_every_10_steps"] = [round(x, 5) for x in loss_log.losses]
        del trainer
        finish_side(result, model, tokenizer, test_prompts, test_rows, params, "generate", "score", spec["cross_eval"],
                monitor)
    return result

"""Tiny, randomly initialised models and a made-up NLI data set, so tests run in seconds without downloads."""
import json
import random
from pathlib import Path

SUBJECTS = ["a man", "a woman", "two kids", "the dog", "an old cook", "three girls", "a tall player", "the band"]
VERBS = ["runs across", "sits near", "paints", "climbs", "waits beside", "jumps over", "cleans", "watches"]
# The instruction-first template of params.yaml, as tests write it into their prompts
TEMPLATE = ("Classify the relation of the hypothesis to the premise as entailment, neutral or contradiction.\n"
            "Premise: {premise}\nHypothesis: {hypothesis}\nRelation:")
OBJECTS = ["the fence", "a red car", "the river", "a small boat", "the old bridge", "a green door", "the stage"]


def made_up_pairs(n, seed):
    """Pairs whose label follows from their construction (no SNLI text)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s, v, o = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
        label = i % 3
        premise = f"{s} {v} {o} in the morning."
        if label == 0:
            hypothesis = f"{s} {v} {o}."
        elif label == 1:
            hypothesis = f"{s} {v} {o} because it is late."
        else:
            hypothesis = f"{s} does not {v.split()[0].rstrip('s')} anything."
        rows.append({"premise": premise, "hypothesis": hypothesis, "label": label})
    return rows


def write_nli_dir(path, n_train=24, n_val=9, n_test=12, unlabeled=2):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for split, n, seed in [("train", n_train, 1), ("validation", n_val, 2), ("test", n_test, 3)]:
        rows = made_up_pairs(n, seed)
        rows += [{"premise": "a cat sleeps.", "hypothesis": "a cat.", "label": -1}] * unlabeled
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tokenizer():
    """A small byte-level BPE: the label words split into several tokens, as with real tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"{r['premise']} {r['hypothesis']}" for r in made_up_pairs(200, 0)]
    corpus += ["Premise: Hypothesis: Relation (entailment, neutral or contradiction):"] * 5
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def make_tiny_model(arch, path, seed=0, **overrides):
    """Save a tiny random `llama` or `phi` causal LM with the test tokenizer into `path`; `overrides` change the
    model config (e.g. initializer_range)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, PhiConfig

    tokenizer = make_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides)
    config = LlamaConfig(**common) if arch == "llama" else PhiConfig(**common, partial_rotary_factor=0.5)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


# The smallest valid safetensors file, written by hand from the format (8-byte little-endian header length, the JSON
# header, the data): one float32 zero named "w". For fixtures whose weights are checked as readable, not loaded.
_HEADER = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
TINY_SAFETENSORS = len(_HEADER).to_bytes(8, "little") + _HEADER + bytes(4)


LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "layers": "all"}


def make_adapter(model_dir, out_dir, seed=0):
    """A LoRA adapter that changes the model: peft starts B at zero (a no-op), so B gets random values."""
    import torch

    from qlora_nli.model import adapters, loading

    base = loading.load_base_model(model_params(model_dir, load_in_4bit=False), "cpu")
    model = adapters.attach_lora(base, LORA)
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.1
    model.save_pretrained(out_dir)
    return out_dir


def model_params(model_dir, load_in_4bit):
    return {"name": str(model_dir), "load_in_4bit": load_in_4bit, "compute_dtype": "float32"}


def lora_model(path, layers="all", dropout=0.0):
    """The tiny model at `path` (float32, not 4-bit) with LoRA on every linear layer of the `layers` last blocks, in
    training mode. peft starts lora_B at zero; random values here give every adapter a gradient that depends on the
    whole forward path."""
    import torch

    from qlora_nli.model import adapters, loading

    torch.manual_seed(0)
    model = adapters.attach_lora(loading.load_base_model(model_params(path, False), "cpu"),
                                 {"r": 4, "alpha": 8, "dropout": dropout, "target_modules": "all-linear",
                                  "layers": layers})
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def base_plus_adapter(model_dir, adapter_dir, load_in_4bit):
    """(base + adapter, unmerged, tokenizer): 4-bit layers stay 4-bit, as on a GPU."""
    from qlora_nli.model import adapters, loading

    model = loading.load_base_model(model_params(model_dir, load_in_4bit), "cpu")
    return adapters.load_adapter(model, str(adapter_dir)), loading.load_tokenizer(str(model_dir))

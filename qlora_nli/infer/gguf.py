"""The merged model as one GGUF file, the format of llama.cpp, Ollama and `llm` (where the embedded base came from).

Written with the `gguf` package (llama.cpp's own writer) for Llama-architecture models (SmolLM2, the embedded base;
Llama, Mistral-style checkpoints saved as `llama`). Tensor types follow `--dtype`: float32 writes every tensor as
F32 (the merged float32 weights bit for bit); float16 and bfloat16 write the matrices as F16 / BF16 and keep the
1-D tensors (norms) in F32, as llama.cpp's converter does, since they are tiny and sensitive to rounding. No k-quant
or 4-bit type: re-quantizing would round the merged weights a second time, away from the model the report measured
(llama.cpp's `llama-quantize` does it afterwards, for whoever wants a smaller file).

llama.cpp keeps each attention head's rotary halves interleaved in q and k, where Hugging Face keeps them in two
halves: q and k are permuted as llama.cpp's converter does, and readers (transformers' GGUF loader included) undo it.
The tokenizer is written as a byte-level BPE (`gpt2`: tokens, merges, token types, special ids) from the Hugging
Face tokenizer the pipeline scores with.
"""
import json
import logging
from pathlib import Path

import numpy as np
import torch

from qlora_nli.runtime.errors import ArtifactError

log = logging.getLogger(__name__)


# In a folder of its own inside the export: transformers' GGUF tokenizer reader, given a directory that also holds
# tokenizer_config.json, takes the special tokens from neither file.
FILE = "gguf/model.gguf"
ARCHITECTURES = ("llama",)  # model_type values written (the tensor layout and metadata below are Llama's)
CONTROL, NORMAL = 3, 1  # gguf.TokenType values: special tokens are CONTROL


def check_exportable(config):
    """Refuse, before any merging, a model whose architecture this writer does not lay out."""
    if config.model_type not in ARCHITECTURES:
        raise ArtifactError(f"--gguf: the base model is '{config.model_type}', and GGUF export writes "
                            f"{', '.join(ARCHITECTURES)} models only; leave out --gguf and convert the exported "
                            f"directory with llama.cpp's convert_hf_to_gguf.py")


def permute_rotary(w, n_heads):
    """Hugging Face's q/k rows (per head: first rotary half, second half) in llama.cpp's interleaved order."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model):
    """(GGUF name, float32 numpy array) for every weight of the merged Llama model, q and k permuted."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp uses token_embd as the output layer when output is absent
    for name, tensor in state.items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ArtifactError(f"--gguf: no GGUF name for the weight '{name}'; leave out --gguf and convert the "
                                f"exported directory with llama.cpp's convert_hf_to_gguf.py")
        data = tensor.detach().to(torch.float32).numpy()
        if name.endswith("q_proj.weight"):
            data = permute_rotary(data, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = permute_rotary(data, config.num_key_value_heads)
        yield gguf_name, data


def tensor_type(data, dtype):
    import gguf

    if data.ndim == 1 or dtype == "float32":
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType.F16 if dtype == "float16" else gguf.GGMLQuantizationType.BF16


def add_tokenizer(writer, tokenizer):
    """The Hugging Face byte-level BPE tokenizer as GGUF tokenizer metadata."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise ArtifactError(f"--gguf: the tokenizer is {backend['model']['type']}, and GGUF export writes byte-level "
                            f"BPE tokenizers only; leave out --gguf and use llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ArtifactError("--gguf: the tokenizer's ids are not contiguous; leave out --gguf")
    special = set(tokenizer.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex: what a ByteLevel pre-tokenizer with its regex applies
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if t in special else NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_add_bos_token(False)  # the pipeline's prompts are tokenized without a BOS token
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id,
                          tokenizer.eos_token_id), (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model, tokenizer, name, path, dtype):
    """Write the merged `model` with `tokenizer` to `path`; returns what EXPORT.json records of it."""
    import gguf

    config = model.config
    check_exportable(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(Path(path), "llama")
    writer.add_name(str(name))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None)
                                    or (config.rope_parameters or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_types = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                  "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}
    writer.add_file_type(file_types[dtype])
    add_tokenizer(writer, tokenizer)
    types = {}
    for gguf_name, data in gguf_tensors(model):
        kind = tensor_type(data, dtype)
        if kind == gguf.GGMLQuantizationType.F16:
            data = data.astype(np.float16)
        elif kind == gguf.GGMLQuantizationType.BF16:
            data = gguf.quants.quantize(data, kind)
        writer.add_tensor(gguf_name, data, raw_dtype=kind)
        types[kind.name] = types.get(kind.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote %s (%s)", path, ", ".join(f"{n} {k}" for k, n in sorted(types.items())))
    return {"file": FILE, "tensor_types": dict(sorted(types.items()))}

"""The embedded model's conversion keeps the GGUF file's weights: converted tensors equal the ones dequantized straight
from the file with the `gguf` package (the reference reader of the format), for several blocks."""
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from qlora_nli.model import embedded

ALIAS = "embedded:smollm2-135m-instruct"
BLOCKS = (0, 14, 29)
BLOCK_TENSORS = {  # GGUF name in block i -> Hugging Face name in layer i
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The conversion the pipeline runs, into an empty per-test cache (as tests/test_modeling.py does)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        path = embedded.resolve_model_path(ALIAS)
    weights = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


@pytest.fixture(scope="module")
def gguf_file():
    import gguf

    reader = gguf.GGUFReader(embedded.embedded_gguf_path(ALIAS))
    tensors = {t.name: t for t in reader.tensors}

    def field(name):
        f = reader.fields[name]
        return int(f.parts[f.data[0]][0])

    def dequantized(name):
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])

    return dequantized, field("llama.attention.head_count"), field("llama.attention.head_count_kv")


def unpermute(w, n_heads):
    """llama.cpp stores q and k with each head's two rotary halves interleaved; Hugging Face keeps them in halves."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.slow
def test_converted_weights_equal_the_gguf_tensors(converted, gguf_file):
    dequantized, n_heads, n_kv_heads = gguf_file
    embeddings = dequantized("token_embd.weight")
    assert embeddings.shape == converted["model.embed_tokens.weight"].shape
    np.testing.assert_array_equal(converted["model.embed_tokens.weight"], embeddings)
    for i in BLOCKS:
        for gguf_name, hf_name in BLOCK_TENSORS.items():
            expected = dequantized(f"blk.{i}.{gguf_name}.weight")
            if gguf_name in ("attn_q", "attn_k"):
                raw = expected
                expected = unpermute(raw, n_heads if gguf_name == "attn_q" else n_kv_heads)
                assert not np.array_equal(raw, expected)  # the permutation matters: comparing raw would fail
            got = converted[f"model.layers.{i}.{hf_name}.weight"]
            assert got.shape == expected.shape, (i, hf_name)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=f"layer {i} {hf_name}")
    np.testing.assert_array_equal(converted["model.norm.weight"], dequantized("output_norm.weight"))

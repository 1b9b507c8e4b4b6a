"""Writing a Hugging Face Llama and its byte-level BPE tokenizer as a GGUF file, as llama.cpp's converter does
(the ``gguf`` package's writer; transformers reads GGUF but does not write it)."""

from __future__ import annotations

import json

import numpy as np
from transformers import LlamaForCausalLM


def _rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for the rotary halves of Q/K (the GGUF reader undoes it)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_llama_gguf(model: LlamaForCausalLM, tokenizer, path) -> None:
    """Write a Llama (tied embeddings) and its byte-level BPE tokenizer as llama.cpp does, in float32."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
                            for token, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in model.model.state_dict().items():
        parts = name.removesuffix(".weight").split(".")
        data = tensor.float().numpy()
        if parts[0] == "layers":
            kind = names[".".join(parts[2:])]
            if kind in ("attn_q", "attn_k"):
                data = _rope_permute(data, config.num_attention_heads if kind == "attn_q"
                                     else config.num_key_value_heads)
            writer.add_tensor(f"blk.{parts[1]}.{kind}.weight", data)
        else:
            writer.add_tensor(f"{names[parts[0]]}.weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

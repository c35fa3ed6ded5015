"""Language-model shapes the benchmarks build, and the Qwen2.5-VL config that carries them.

A benchmark that trains "a 7B-shaped model cut to a few layers" builds it here: the language model
has the named model's real shapes, the vision tower is tiny (one block), the weights are random.
"""

from __future__ import annotations

# The language model's shapes: hidden size, attention heads, K/V heads, MLP width, vocabulary.
QWEN2_0_5B = {"hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
              "intermediate_size": 4864, "vocab_size": 151936}
QWEN2_5_7B = {"hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
              "intermediate_size": 18944, "vocab_size": 152064}
TOY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
       "intermediate_size": 128, "vocab_size": 1000}
# Decoder layers of the whole models (what a figure measured on a few layers extrapolates to).
FULL_LAYERS = {"0.5b": 24, "7b": 28, "toy": 4}
SHAPES = {"0.5b": QWEN2_0_5B, "7b": QWEN2_5_7B, "toy": TOY}


def decoder_config(shapes: dict, layers: int):
    """A Qwen2.5-VL config: the language model with `shapes` and `layers`, a one-block vision tower."""
    from transformers import Qwen2_5_VLConfig

    head_dim = shapes["hidden_size"] // shapes["num_attention_heads"]
    quarter = head_dim // 8
    # M-RoPE's temporal/height/width split of the rotary half, in Qwen2.5-VL's proportions (1:1.5:1.5).
    text = {**shapes, "num_hidden_layers": layers, "max_window_layers": layers, "max_position_embeddings": 1 << 20,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                "mrope_section": [quarter, (head_dim // 2 - quarter) // 2,
                                                  head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2]}}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
              "out_hidden_size": shapes["hidden_size"], "fullatt_block_indexes": [0]}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)

"""InternLM2-chat-7b stand-in: remote code (``InternLM2ForCausalLM``) written by this project.

``make_config`` maps the generic stand-in sizes onto the field names and values of the real
``config.json`` (rope_theta 1e6, dynamic NTK rope scaling x2, no biases, eager attention,
grouped-query attention). The builder copies :data:`FILES` next to the weights, and
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads them through
:data:`AUTO_MAP`, as it does for the real checkpoint.
"""

from .configuration_internlm2 import InternLM2Config
from .modeling_internlm2 import InternLM2ForCausalLM

__all__ = ["FILES", "AUTO_MAP", "ARCHITECTURE", "MODEL_CLASS", "make_config"]

FILES = ("configuration_internlm2.py", "modeling_internlm2.py")
AUTO_MAP = {  # the keys of the real config.json
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
}
ARCHITECTURE = "InternLM2ForCausalLM"
MODEL_CLASS = InternLM2ForCausalLM


def make_config(*, vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
                max_positions, bos_token_id, eos_token_id, pad_token_id, init_range, rms_norm_eps):
    """An :class:`InternLM2Config` with these sizes and the real chat-7b's other settings."""
    return InternLM2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        initializer_range=init_range,
        rms_norm_eps=rms_norm_eps,
        use_cache=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
        bias=False,
        rope_theta=1000000,
        rope_scaling={"type": "dynamic", "factor": 2.0},
        attn_implementation="eager",
        auto_map=dict(AUTO_MAP),
        architectures=[ARCHITECTURE],
    )

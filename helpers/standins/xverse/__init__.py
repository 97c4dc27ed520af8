"""XVERSE-7B-Chat stand-in: remote code (``XverseForCausalLM``) written by this project.

``make_config`` maps the generic stand-in sizes onto the field names of the real ``config.json``
(a Llama-like decoder with full multi-head attention: ``num_kv_heads`` is ignored, as XVERSE has
no such field). The builder copies :data:`FILES` next to the weights, and
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads them through
:data:`AUTO_MAP`, as it does for the real checkpoint.
"""

from .configuration_xverse import XverseConfig
from .modeling_xverse import XverseForCausalLM

__all__ = ["FILES", "AUTO_MAP", "ARCHITECTURE", "MODEL_CLASS", "make_config"]

FILES = ("configuration_xverse.py", "modeling_xverse.py")
AUTO_MAP = {  # the keys of the real config.json
    "AutoConfig": "configuration_xverse.XverseConfig",
    "AutoModelForCausalLM": "modeling_xverse.XverseForCausalLM",
}
ARCHITECTURE = "XverseForCausalLM"
MODEL_CLASS = XverseForCausalLM


def make_config(*, vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
                max_positions, bos_token_id, eos_token_id, pad_token_id, init_range, rms_norm_eps):
    """An :class:`XverseConfig` with these sizes (``num_kv_heads`` is ignored: XVERSE uses full MHA)."""
    del num_kv_heads  # every query head has its own key/value head in XVERSE
    return XverseConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        initializer_range=init_range,
        rms_norm_eps=rms_norm_eps,
        use_cache=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
        auto_map=dict(AUTO_MAP),
        architectures=[ARCHITECTURE],
    )

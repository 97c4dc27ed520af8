"""MiniCPM-2B-sft stand-in: remote code (``MiniCPMForCausalLM``) written by this project.

``make_config`` maps the generic stand-in sizes onto the field names and values of the real
``config.json`` (scale_emb 12, dim_model_base 256, scale_depth 1.4, tied embeddings, full
multi-head attention: ``num_kv_heads`` is ignored, MiniCPM-2B has as many key/value heads as
query heads). The builder copies :data:`FILES` next to the weights, and
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads them through
:data:`AUTO_MAP`, as it does for the real checkpoint.
"""

from .configuration_minicpm import MiniCPMConfig
from .modeling_minicpm import MiniCPMForCausalLM

__all__ = ["FILES", "AUTO_MAP", "ARCHITECTURE", "MODEL_CLASS", "make_config"]

FILES = ("configuration_minicpm.py", "modeling_minicpm.py")
# The real config.json also maps AutoModelForSeq2SeqLM (to MiniCPMForCausalLM) and
# AutoModelForSequenceClassification; the stand-in has no sequence-classification class.
AUTO_MAP = {
    "AutoConfig": "configuration_minicpm.MiniCPMConfig",
    "AutoModel": "modeling_minicpm.MiniCPMModel",
    "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
}
ARCHITECTURE = "MiniCPMForCausalLM"
MODEL_CLASS = MiniCPMForCausalLM


def make_config(*, vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
                max_positions, bos_token_id, eos_token_id, pad_token_id, init_range, rms_norm_eps):
    """A :class:`MiniCPMConfig` with these sizes and MiniCPM-2B's scalings (``num_kv_heads`` ignored)."""
    del num_kv_heads  # MiniCPM-2B: num_key_value_heads == num_attention_heads
    return MiniCPMConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        initializer_range=init_range,
        rms_norm_eps=rms_norm_eps,
        use_cache=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rope_scaling=None,
        scale_emb=12,
        dim_model_base=256,
        scale_depth=1.4,
        auto_map=dict(AUTO_MAP),
        architectures=[ARCHITECTURE],
    )

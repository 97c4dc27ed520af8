"""BlueLM-7B-Chat stand-in: a small remote-code model with the vendor's interface.

``FILES`` are copied into a checkpoint folder next to ``config.json`` (the remote-code tokenizer,
``tokenization_bluelm.py``, is added by the builder); ``AUTO_MAP`` and ``ARCHITECTURE`` are what
the vendor's ``config.json`` says; :func:`make_config` maps generic sizes onto the vendor's config
field names.
"""

from .configuration_bluelm import BlueLMConfig
from .modeling_bluelm import BlueLMForCausalLM

__all__ = ["ARCHITECTURE", "AUTO_MAP", "FILES", "MODEL_CLASS", "BlueLMConfig", "make_config"]

FILES = ("configuration_bluelm.py", "modeling_bluelm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_bluelm.BlueLMConfig",
    "AutoModelForCausalLM": "modeling_bluelm.BlueLMForCausalLM",
}
ARCHITECTURE = "BlueLMForCausalLM"
MODEL_CLASS = BlueLMForCausalLM


def make_config(*, vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
                max_positions, bos_token_id, eos_token_id, pad_token_id, init_range, rms_norm_eps) -> BlueLMConfig:
    """A :class:`BlueLMConfig` for the given sizes, with BlueLM-7B-Chat's other settings.

    ``num_kv_heads`` is ignored: BlueLM-7B has no grouped-query attention (its modeling code uses
    as many key/value heads as query heads), so ``num_key_value_heads`` = ``num_heads``.
    """
    del num_kv_heads  # no GQA in BlueLM-7B
    return BlueLMConfig(
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
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pretraining_tp=1,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=None,
        use_stable_embedding=True,
        auto_map=dict(AUTO_MAP),
        architectures=[ARCHITECTURE],
    )

"""Configuration of the InternLM2 stand-in (remote code written by this project for its tests).

Field names, defaults and behaviour follow the ``InternLM2Config`` that InternLM2-chat-7b ships as
remote code, so a checkpoint built with it has the same ``config.json`` keys as the real one
(``bias``, ``rope_theta``, ``rope_scaling``, ``attn_implementation``, ``num_key_value_heads``, ...).
"""

from transformers.configuration_utils import PretrainedConfig


class InternLM2Config(PretrainedConfig):
    """InternLM2 model configuration (defaults describe the vendor's 7B base shape).

    ``attn_implementation`` is a plain field here, as in the vendor's class: ``"eager"`` or
    ``"flash_attention_2"`` (the stand-in implements eager attention only). ``from_pretrained``
    hands it ``None`` (transformers pops the key for itself), which falls back to ``"eager"``.
    ``rope_scaling`` is ``None`` or ``{"type": "linear" | "dynamic", "factor": float >= 1}``.
    """

    model_type = "internlm2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=103168,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        bias=True,
        rope_theta=10000,
        rope_scaling=None,
        attn_implementation="eager",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # Without the field the model has as many key/value heads as query heads (no GQA).
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self._check_rope_scaling()
        self.attn_implementation = attn_implementation if attn_implementation is not None else "eager"
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _check_rope_scaling(self):
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict) or set(scaling) != {"type", "factor"}:
            raise ValueError(f"`rope_scaling` must be a dict with the two fields `type` and `factor`, got {scaling}")
        if scaling["type"] not in ("linear", "dynamic"):
            raise ValueError(f"`rope_scaling` type must be 'linear' or 'dynamic', got {scaling['type']!r}")
        factor = scaling["factor"]
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 1.0:
            raise ValueError(f"`rope_scaling` factor must be a number >= 1, got {factor!r}")

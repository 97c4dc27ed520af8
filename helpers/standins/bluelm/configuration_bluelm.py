"""Configuration of the BlueLM-7B-Chat stand-in.

Written by this project (not the vendor's file). Field names, meaning and defaults follow the
vendor's ``BlueLMConfig`` (model type ``BlueLM``): Llama's names (``hidden_size``,
``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
``hidden_act``, ``max_position_embeddings``, ``rms_norm_eps``, ``rope_theta``, ``rope_scaling``,
``pretraining_tp``) plus ``use_stable_embedding`` (a LayerNorm right after the token embedding).
"""

from transformers import PretrainedConfig


class BlueLMConfig(PretrainedConfig):
    model_type = "BlueLM"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=100096,
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
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
        pretraining_tp=1,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=None,
        use_stable_embedding=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.use_stable_embedding = use_stable_embedding
        # kept for config compatibility; the model itself has as many key/value heads as query heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.pretraining_tp = pretraining_tp
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self._check_rope_scaling()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _check_rope_scaling(self):
        """``rope_scaling`` is None or ``{"type": "linear" | "dynamic", "factor": float > 1}``."""
        if self.rope_scaling is None:
            return
        scaling = self.rope_scaling
        if not isinstance(scaling, dict) or len(scaling) != 2:
            raise ValueError(f"`rope_scaling` must be a dict with the fields `type` and `factor`, got {scaling}")
        if scaling.get("type") not in ("linear", "dynamic"):
            raise ValueError(f"`rope_scaling`'s type must be 'linear' or 'dynamic', got {scaling.get('type')}")
        factor = scaling.get("factor")
        if not isinstance(factor, float) or factor <= 1.0:
            raise ValueError(f"`rope_scaling`'s factor must be a float > 1, got {factor}")

"""Configuration of the MiniCPM stand-in (remote code written by this project for its tests).

Field names and defaults follow the ``MiniCPMConfig`` that MiniCPM-2B-sft ships as remote code: a
Llama configuration plus the muP-style scalings ``scale_emb`` (embeddings are multiplied by it),
``scale_depth`` (each residual branch is multiplied by ``scale_depth / sqrt(num_hidden_layers)``)
and ``dim_model_base`` (the last hidden state is divided by ``hidden_size / dim_model_base`` before
the LM head), with tied input/output embeddings by default.
"""

from transformers.configuration_utils import PretrainedConfig


class MiniCPMConfig(PretrainedConfig):
    """MiniCPM model configuration. ``rope_scaling``: ``None`` or ``{"type": "linear" | "dynamic",
    "factor": float > 1}``. ``pretraining_tp`` must stay 1 in the stand-in."""

    model_type = "minicpm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
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
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        scale_emb=1,
        dim_model_base=1,
        scale_depth=1,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.pretraining_tp = pretraining_tp
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self._check_rope_scaling()
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.scale_emb = scale_emb
        self.dim_model_base = dim_model_base
        self.scale_depth = scale_depth
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
        if not isinstance(factor, float) or factor <= 1.0:
            raise ValueError(f"`rope_scaling` factor must be a float > 1, got {factor!r}")

"""Configuration of the XVERSE stand-in (remote code written by this project for its tests).

Field names and defaults follow the ``XverseConfig`` that XVERSE-7B-Chat ships as remote code:
a Llama-like decoder with as many key/value heads as query heads (there is no
``num_key_value_heads`` field), no ``rope_theta``/``rope_scaling`` fields (rotary base 10000),
plus the vendor's ``quantization_bit`` and ``initializer_weight`` fields (kept for the same
``config.json`` keys; the stand-in does not quantize).
"""

from transformers.configuration_utils import PretrainedConfig


class XverseConfig(PretrainedConfig):
    """XVERSE model configuration (defaults describe the vendor's 13B shape)."""

    model_type = "xverse"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=100278,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        hidden_act="silu",
        max_position_embeddings=8192,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        quantization_bit=0,
        initializer_weight=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.quantization_bit = quantization_bit
        self.initializer_weight = initializer_weight
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

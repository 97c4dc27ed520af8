"""Qwen-7B-Chat (v1) stand-in: a small remote-code model with the vendor's interface.

``FILES`` are copied into a checkpoint folder next to ``config.json``; ``AUTO_MAP`` and
``ARCHITECTURE`` are what the vendor's ``config.json`` says; :func:`make_config` maps generic sizes
onto the vendor's config field names.
"""

from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel

__all__ = ["ARCHITECTURE", "AUTO_MAP", "FILES", "MODEL_CLASS", "QWenConfig", "make_config"]

FILES = ("configuration_qwen.py", "modeling_qwen.py")
AUTO_MAP = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}
ARCHITECTURE = "QWenLMHeadModel"
MODEL_CLASS = QWenLMHeadModel
# The model picks its precision and attention when it is built and writes the choice into its
# config; the vendor's config.json leaves them open, so the saved one does too.
CONFIG_ON_DISK = {"bf16": False, "fp16": False, "fp32": False, "use_flash_attn": "auto"}


def make_config(*, vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
                max_positions, bos_token_id, eos_token_id, pad_token_id, init_range, rms_norm_eps) -> QWenConfig:
    """A :class:`QWenConfig` for the given sizes, with Qwen-7B-Chat v1.1's other settings.

    ``intermediate_size`` is the width of one MLP branch (Llama's sense); Qwen's config stores twice
    that (22016 for Qwen-7B, whose ``w1``/``w2`` are 11008 wide). ``num_kv_heads`` is ignored:
    Qwen v1 has no grouped-query attention (as many key/value heads as query heads).
    ``max_positions`` becomes both ``max_position_embeddings`` and ``seq_length`` (8192 each in
    the real config); dynamic NTK and logn scaling are on, as there, and act only beyond it.
    """
    del num_kv_heads  # no GQA in Qwen v1
    if hidden_size % num_heads:
        raise ValueError("hidden_size must be a multiple of num_heads")
    return QWenConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        kv_channels=hidden_size // num_heads,
        intermediate_size=2 * intermediate_size,
        max_position_embeddings=max_positions,
        seq_length=max_positions,
        layer_norm_epsilon=rms_norm_eps,
        initializer_range=init_range,
        emb_dropout_prob=0.0,
        attn_dropout_prob=0.0,
        scale_attn_weights=True,
        rotary_pct=1.0,
        rotary_emb_base=10000,
        use_dynamic_ntk=True,
        use_logn_attn=True,
        use_flash_attn="auto",
        no_bias=True,
        bf16=False,
        fp16=False,
        fp32=False,
        use_cache_quantization=False,
        use_cache_kernel=False,
        softmax_in_fp32=False,
        use_cache=True,
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        auto_map=dict(AUTO_MAP),
        architectures=[ARCHITECTURE],
    )

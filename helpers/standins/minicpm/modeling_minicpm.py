"""MiniCPM stand-in: a small causal LM written by this project for its tests, loaded as remote code.

It reproduces what an inference engine touches in MiniCPM-2B-sft's own remote code (its
``modeling_minicpm.py``, a Llama of the transformers 4.36 era plus muP scalings), not its text:

* ``MiniCPMForCausalLM.forward(input_ids, attention_mask, position_ids, past_key_values,
  inputs_embeds, labels, use_cache, output_attentions, output_hidden_states, return_dict)``,
  no ``**kwargs``;
* rotary positions come from ``position_ids`` (default: counted on from the cache length); the
  cos/sin table is cut to the key length before it is indexed, so a position id at or beyond
  ``past + new`` tokens raises ``IndexError`` as in the vendor's code; the rotation runs in float32;
* the KV cache is a transformers ``Cache`` inside the model. With ``use_cache``, a legacy tuple
  (or ``None``) is turned into a ``DynamicCache`` with ``DynamicCache.from_legacy_cache`` and the
  model returns ``to_legacy_cache()``, i.e. tuples ``[batch, kv_heads, seq, head_dim]`` (sequence on
  dim 2); a ``Cache`` passed in is updated in place and returned as is. The cache length comes
  from ``Cache.get_usable_length`` (in the model and in every attention layer), and keys/values
  are stored with ``Cache.update(key, value, layer_idx, {"sin": ..., "cos": ...})``;
* ``prepare_inputs_for_generation`` calls, on a ``Cache``, ``get_seq_length()``, the
  ``seen_tokens`` property and ``get_max_length()`` as the vendor's does. ``_supports_cache_class``
  is set, so ``generate()`` on transformers 4.48 hands the model a ``DynamicCache``; 4.48 warns that
  ``seen_tokens`` and ``get_max_length`` are deprecated, and 4.49 removed ``get_max_length``, which
  is the ``AttributeError`` the real model raises there;
* ``_supports_sdpa``: loaded with ``from_pretrained`` the model uses
  ``torch.nn.functional.scaled_dot_product_attention`` ("sdpa"), built directly it uses eager attention;
* a 2-D ``attention_mask`` must cover ``past + new`` tokens (a shorter one raises ``ValueError``);
* Llama-shaped weight names (``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj``,
  ``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``model.norm``,
  ``lm_head``), the LM head tied to the embeddings (``tie_word_embeddings``);
* the scalings: embeddings x ``scale_emb``, each residual branch x ``scale_depth /
  sqrt(num_hidden_layers)``, logits = ``lm_head(hidden / (hidden_size / dim_model_base))`` in float32.

One deliberate difference: ``_init_weights`` draws the linear layers 4x wider than
``initializer_range`` (see there), so that random weights do not just echo the input token.

Like the vendor's class it derives from ``PreTrainedModel`` only; ``AutoModelForCausalLM`` adds
``GenerationMixin`` on load.
"""

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_minicpm import MiniCPMConfig


def _attention_bias(attention_mask, batch, q_len, past_len, dtype, device):
    """Additive mask ``[batch, 1, q_len, past_len + q_len]``: causal, plus the 2-D padding mask."""
    kv_len = past_len + q_len
    if attention_mask is None:
        attention_mask = torch.ones((batch, kv_len), dtype=torch.bool, device=device)
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, kv_len):
        raise ValueError(
            f"Attention mask should be of size {(batch, kv_len)} (past {past_len} + new {q_len} tokens), "
            f"but is {tuple(attention_mask.shape)}"
        )
    rows = torch.arange(q_len, device=device).view(-1, 1) + past_len
    cols = torch.arange(kv_len, device=device).view(1, -1)
    allowed = (cols <= rows)[None, None] & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


class MiniCPMRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(dim=-1, keepdim=True)
        return (hidden_states * torch.rsqrt(variance + self.variance_epsilon)).to(dtype) * self.weight


class MiniCPMRotaryEmbedding(nn.Module):
    """Rotate-half RoPE in float32; returns the cos/sin tables for positions ``0 .. seq_len - 1``.
    ``scaling_type`` "linear" divides the positions by the factor; "dynamic" (NTK) grows the base
    once a sequence is longer than ``max_position_embeddings`` (and keeps it grown)."""

    def __init__(self, dim, max_position_embeddings=2048, base=10000, scaling_type=None, scaling_factor=1.0):
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.scaling_type = scaling_type
        self.scaling_factor = scaling_factor
        self.register_buffer("inv_freq", self._inv_freq(base), persistent=False)
        self._build(max_position_embeddings, device=self.inv_freq.device)

    def _inv_freq(self, base, device=None):
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def _build(self, seq_len, device):
        if self.scaling_type == "dynamic" and seq_len > self.max_position_embeddings:
            grown = self.scaling_factor * seq_len / self.max_position_embeddings - (self.scaling_factor - 1)
            base = self.base * grown ** (self.dim / (self.dim - 2))
            self.register_buffer("inv_freq", self._inv_freq(base, device), persistent=False)
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        if self.scaling_type == "linear":
            positions = positions / self.scaling_factor
        freqs = torch.outer(positions, self.inv_freq.to(device=device, dtype=torch.float32))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)
        self.max_seq_len_cached = seq_len

    def forward(self, x, seq_len):
        if seq_len > self.max_seq_len_cached:
            self._build(seq_len, device=x.device)
        return self.cos_cached[:seq_len], self.sin_cached[:seq_len]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(q, k, cos, sin, position_ids):
    """Rotate in float32 and give back the inputs' dtype."""
    dtype = k.dtype
    cos = cos[position_ids].unsqueeze(1)  # [batch, 1, seq, dim]
    sin = sin[position_ids].unsqueeze(1)
    q32, k32 = q.float(), k.float()
    return (q32 * cos + _rotate_half(q32) * sin).to(dtype), (k32 * cos + _rotate_half(k32) * sin).to(dtype)


def _repeat_kv(x, times):
    """``[batch, kv_heads, seq, dim]`` -> ``[batch, kv_heads * times, seq, dim]`` (each head repeated in place)."""
    if times == 1:
        return x
    batch, heads, seq, dim = x.shape
    return x[:, :, None].expand(batch, heads, times, seq, dim).reshape(batch, heads * times, seq, dim)


class MiniCPMMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MiniCPMAttention(nn.Module):
    """Attention over a transformers ``Cache``; eager or SDPA after ``config._attn_implementation``."""

    def __init__(self, config: MiniCPMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.attention_dropout = config.attention_dropout
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        bias = config.attention_bias
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=bias)
        scaling = config.rope_scaling or {}
        self.rotary_emb = MiniCPMRotaryEmbedding(
            self.head_dim,
            max_position_embeddings=config.max_position_embeddings,
            base=config.rope_theta,
            scaling_type=scaling.get("type"),
            scaling_factor=scaling.get("factor", 1.0),
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_value: Optional[Cache] = None,
        output_attentions: bool = False,
        use_cache: bool = False,
        **kwargs,
    ):
        bsz, q_len, _ = hidden_states.size()
        query_states = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim)
        key_states = key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim)
        value_states = value_states.transpose(1, 2)

        kv_seq_len = key_states.shape[-2]
        if past_key_value is not None:
            kv_seq_len += past_key_value.get_usable_length(kv_seq_len, self.layer_idx)
        cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)
        query_states, key_states = _apply_rotary(query_states, key_states, cos, sin, position_ids)

        if past_key_value is not None:
            key_states, value_states = past_key_value.update(key_states, value_states, self.layer_idx,
                                                             {"sin": sin, "cos": cos})

        key_states = _repeat_kv(key_states, self.num_key_value_groups)
        value_states = _repeat_kv(value_states, self.num_key_value_groups)
        dropout = self.attention_dropout if self.training else 0.0

        if self.config._attn_implementation == "sdpa" and not output_attentions:
            out = F.scaled_dot_product_attention(query_states, key_states, value_states, attn_mask=attention_mask,
                                                 dropout_p=dropout)
            weights = None
        else:
            scores = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(self.head_dim)
            if attention_mask is not None:
                scores = scores + attention_mask
            weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query_states.dtype)
            weights = F.dropout(weights, p=dropout, training=self.training)
            out = torch.matmul(weights, value_states)
        out = out.transpose(1, 2).reshape(bsz, q_len, self.hidden_size)
        return self.o_proj(out), (weights if output_attentions else None), past_key_value


class MiniCPMDecoderLayer(nn.Module):
    def __init__(self, config: MiniCPMConfig, layer_idx: int):
        super().__init__()
        if config._attn_implementation not in ("eager", "sdpa"):
            raise ValueError(f"this stand-in implements eager and sdpa attention only, "
                             f"not {config._attn_implementation!r}")
        self.hidden_size = config.hidden_size
        self.self_attn = MiniCPMAttention(config, layer_idx)
        self.mlp = MiniCPMMLP(config)
        self.input_layernorm = MiniCPMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MiniCPMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.scale_depth = config.scale_depth
        self.num_hidden_layers = config.num_hidden_layers

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, **kwargs):
        branch_scale = self.scale_depth / math.sqrt(self.num_hidden_layers)
        attn_out, attn_weights, present = self.self_attn(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_value=past_key_value,
            output_attentions=output_attentions,
            use_cache=use_cache,
        )
        hidden_states = hidden_states + attn_out * branch_scale
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)) * branch_scale
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (attn_weights,)
        if use_cache:
            outputs += (present,)
        return outputs


class MiniCPMPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMConfig
    base_model_prefix = "model"
    _no_split_modules = ["MiniCPMDecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True
    _supports_cache_class = True

    # Stand-in only (random weights): projections are drawn 4x wider than ``initializer_range``.
    # With the LM head tied to the embeddings and the embeddings multiplied by ``scale_emb``, small
    # random layers leave the last hidden state close to the input token's own embedding, and the
    # model would only ever predict the token it was just fed (one token repeated forever).
    _linear_init_gain = 4.0

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std * self._linear_init_gain)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()


class MiniCPMModel(MiniCPMPreTrainedModel):
    """The decoder stack (``embed_tokens``, ``layers``, ``norm``) without the LM head."""

    def __init__(self, config: MiniCPMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MiniCPMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MiniCPMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[List[torch.FloatTensor]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[Tuple, BaseModelOutputWithPast]:
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else config.use_cache
        return_dict = return_dict if return_dict is not None else config.use_return_dict

        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
        if input_ids is not None:
            batch_size, seq_length = input_ids.shape[:2]
        elif inputs_embeds is not None:
            batch_size, seq_length = inputs_embeds.shape[:2]
        else:
            raise ValueError("You have to specify either input_ids or inputs_embeds")

        # As in the vendor's code, the cache is only looked at (and converted) when use_cache is on.
        past_length = 0
        use_legacy_cache = False
        if use_cache:
            use_legacy_cache = not isinstance(past_key_values, Cache)
            if use_legacy_cache:
                past_key_values = DynamicCache.from_legacy_cache(past_key_values)
            past_length = past_key_values.get_usable_length(seq_length)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * config.scale_emb
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + seq_length, dtype=torch.long,
                                        device=inputs_embeds.device).unsqueeze(0)
        mask = _attention_bias(attention_mask, batch_size, seq_length, past_length, inputs_embeds.dtype,
                               inputs_embeds.device)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        next_cache = None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            outputs = layer(
                hidden_states,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_value=past_key_values,
                output_attentions=output_attentions,
                use_cache=use_cache,
            )
            hidden_states = outputs[0]
            if use_cache:
                next_cache = outputs[2 if output_attentions else 1]
            if output_attentions:
                all_attentions += (outputs[1],)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        if use_cache and use_legacy_cache:
            next_cache = next_cache.to_legacy_cache()
        if not return_dict:
            return tuple(v for v in (hidden_states, next_cache, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=next_cache,
                                       hidden_states=all_hidden_states, attentions=all_attentions)


class MiniCPMForCausalLM(MiniCPMPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        if config.pretraining_tp != 1:
            raise ValueError("this stand-in implements pretraining_tp == 1 only")
        self.model = MiniCPMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def set_decoder(self, decoder):
        self.model = decoder

    def get_decoder(self):
        return self.model

    def forward(
        self,
        input_ids: torch.LongTensor = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[List[torch.FloatTensor]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[Tuple, CausalLMOutputWithPast]:
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        width_scale = self.config.hidden_size / self.config.dim_model_base
        logits = self.lm_head(outputs[0] / width_scale).float()

        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].reshape(-1, self.config.vocab_size)
            shift_labels = labels[..., 1:].reshape(-1).to(shift_logits.device)
            loss = CrossEntropyLoss()(shift_logits, shift_labels)

        if not return_dict:
            output = (logits,) + tuple(outputs[1:])
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, **kwargs):
        if past_key_values is not None:
            if isinstance(past_key_values, Cache):
                # the vendor's three calls (seen_tokens and get_max_length: deprecated in 4.48, the
                # latter gone in 4.49)
                cache_length = past_key_values.get_seq_length()
                past_length = past_key_values.seen_tokens
                max_cache_length = past_key_values.get_max_length()
            else:
                cache_length = past_length = past_key_values[0][0].shape[2]
                max_cache_length = None

            # keep the tokens the cache has not processed yet
            if attention_mask is not None and attention_mask.shape[1] > input_ids.shape[1]:
                input_ids = input_ids[:, -(attention_mask.shape[1] - past_length):]
            elif past_length < input_ids.shape[1]:
                input_ids = input_ids[:, past_length:]
            # a cache with a maximum length keeps only that much of the mask
            if (max_cache_length is not None and attention_mask is not None
                    and cache_length + input_ids.shape[1] > max_cache_length):
                attention_mask = attention_mask[:, -max_cache_length:]

        position_ids = kwargs.get("position_ids")
        if attention_mask is not None and position_ids is None:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)
            if past_key_values:
                position_ids = position_ids[:, -input_ids.shape[1]:]

        if inputs_embeds is not None and past_key_values is None:
            model_inputs = {"inputs_embeds": inputs_embeds}
        else:
            model_inputs = {"input_ids": input_ids}
        model_inputs.update({
            "position_ids": position_ids,
            "past_key_values": past_key_values,
            "use_cache": kwargs.get("use_cache"),
            "attention_mask": attention_mask,
        })
        return model_inputs

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        return tuple(tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer) for layer in past_key_values)

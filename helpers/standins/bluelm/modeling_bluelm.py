"""A small remote-code model with the interface of BlueLM-7B-Chat (``BlueLMForCausalLM``).

Written by this project for tests: it is not the vendor's code. It reproduces what an inference
engine, a weight converter or ``model.generate`` touches in the vendor's ``modeling_bluelm.py``:

* ``forward`` keyword arguments, exactly: input_ids, attention_mask, past_key_values,
  inputs_embeds, labels, use_cache, output_attentions, output_hidden_states, return_dict. There is
  **no** ``position_ids``: passing it raises ``TypeError``, as with the real model.
* Positions come from the cache length: the new tokens are rotated for positions
  ``offset ... offset + q_len - 1`` with ``offset = past_key_values[layer][0].shape[1]``.
* KV cache: a tuple with one ``(key, value)`` pair per layer, each ``[batch, seq, heads, head_dim]``
  (sequence on dim 1); keys are stored after the rotary embedding.
* Masks: a 2-D ``attention_mask`` ``[batch, kv_len]`` (all ones when omitted) is inverted into
  ``finfo.min`` over the masked columns and added to a causal mask (built only when more than one
  token is new); the scores get that sum and are clamped at ``finfo.min``; softmax in float32. A
  mask whose width is not the cache length plus the new tokens fails (``ValueError``).
* Architecture: Llama plus a LayerNorm after the token embedding (``use_stable_embedding``;
  applied only to embeddings looked up from ``input_ids``). Weight names: ``model.embed_tokens``
  (``padding_idx`` = ``pad_token_id``), ``model.embed_layer_norm`` (LayerNorm, eps
  ``rms_norm_eps``), ``model.layers.N.self_attn.{q,k,v,o}_proj`` (no bias),
  ``model.layers.N.mlp.{gate,up,down}_proj`` (SiLU-gated), ``model.layers.N.input_layernorm`` /
  ``post_attention_layernorm`` (RMSNorm), ``model.norm``, ``lm_head`` (not tied).
* Rotary embedding in the rotate-half form; every attention layer has its own
  ``rotary_emb`` (buffer ``inv_freq``, all equal), applied in the activations' dtype.
* ``prepare_inputs_for_generation`` feeds the last token once a cache exists and always passes the
  2-D attention mask; the cache stays a legacy tuple (no ``Cache`` class support).

Left out: xformers attention (used by the vendor only in training), the ``quantize`` method,
``chat``/``build_prompt`` (prompt building lives in the project), gradient checkpointing, dropout.
The vendor builds its rotary table with base 10000 and ignores ``rope_scaling``; the stand-in
uses ``rope_theta`` (10000.0, the same value) and ignores ``rope_scaling`` too. The vendor has no
grouped-query attention (``num_key_value_heads`` only lives in the config); neither has this.

Weights are random: :meth:`BlueLMPreTrainedModel._init_weights` draws every weight, bias and norm
scale at random (std ``initializer_range``; the padding row of the embedding is zero; the
embedding LayerNorm's gain is small so that outputs depend on positions), so that a converter that
drops or swaps a tensor, or an engine that gets positions wrong, changes the output.
"""

import math
from typing import List, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_bluelm import BlueLMConfig

logger = logging.get_logger(__name__)


def _causal_mask(batch: int, q_len: int, past: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[batch, 1, q_len, past + q_len]``: 0 where a new token may look, ``finfo.min`` elsewhere."""
    mask = torch.full((q_len, q_len), torch.finfo(dtype).min, device=device)
    mask = mask.triu(diagonal=1).to(dtype)
    if past > 0:
        mask = torch.cat([torch.zeros(q_len, past, dtype=dtype, device=device), mask], dim=-1)
    return mask[None, None].expand(batch, 1, q_len, past + q_len)


def _padding_mask(mask: torch.Tensor, dtype: torch.dtype, q_len: int) -> torch.Tensor:
    """``[batch, src]`` of 1/0 -> ``[batch, 1, q_len, src]``: 0 for kept columns, ``finfo.min`` for masked."""
    batch, src = mask.shape
    inverted = 1.0 - mask[:, None, None, :].expand(batch, 1, q_len, src).to(dtype)
    return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)


class BlueLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class BlueLMRotaryEmbedding(nn.Module):
    """cos/sin tables ``[1, seq, 1, dim]`` for positions ``0 .. seq - 1``, grown on demand."""

    def __init__(self, dim: int, max_position_embeddings: int = 2048, base: float = 10000.0, device=None):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(max_position_embeddings)

    def _build(self, length: int) -> None:
        self.max_seq_len_cached = length
        positions = torch.arange(length, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        angles = torch.outer(positions, self.inv_freq)
        emb = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos_cached", emb.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin_cached", emb.sin()[None, :, None, :], persistent=False)

    def forward(self, x: torch.Tensor, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.max_seq_len_cached:
            self._build(seq_len)
        return (self.cos_cached[:, :seq_len].to(dtype=x.dtype, device=x.device),
                self.sin_cached[:, :seq_len].to(dtype=x.dtype, device=x.device))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rotary(q, k, cos, sin, offset: int = 0):
    """``q``/``k`` ``[batch, q_len, heads, dim]`` rotated for positions ``offset .. offset + q_len - 1``."""
    cos = cos[:, offset:offset + q.shape[1]]
    sin = sin[:, offset:offset + q.shape[1]]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class BlueLMMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class BlueLMAttention(nn.Module):
    def __init__(self, config: BlueLMConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(f"hidden_size must be divisible by num_heads (got `hidden_size`: {self.hidden_size}"
                             f" and `num_heads`: {self.num_heads}).")
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(self.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, self.hidden_size, bias=False)
        self.rotary_emb = BlueLMRotaryEmbedding(self.head_dim, base=config.rope_theta)

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_value: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        output_attentions: bool = False,
        use_cache: bool = False,
    ):
        bsz, q_len, _ = hidden_states.size()
        shape = (bsz, q_len, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape)
        key = self.k_proj(hidden_states).view(shape)
        value = self.v_proj(hidden_states).view(shape)

        offset = past_key_value[0].shape[1] if past_key_value is not None else 0
        kv_seq_len = q_len + offset
        cos, sin = self.rotary_emb(value, seq_len=kv_seq_len)
        query, key = _apply_rotary(query, key, cos, sin, offset=offset)

        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=1)
            value = torch.cat([past_key_value[1], value], dim=1)
        present = (key, value) if use_cache else None

        # [bsz, heads, q_len, kv_len]
        weights = torch.matmul(query.transpose(1, 2), key.permute(0, 2, 3, 1)) / math.sqrt(self.head_dim)
        if weights.size() != (bsz, self.num_heads, q_len, kv_seq_len):
            raise ValueError(f"Attention weights should be of size {(bsz, self.num_heads, q_len, kv_seq_len)},"
                             f" but is {weights.size()}")
        if attention_mask is not None:
            if attention_mask.size() != (bsz, 1, q_len, kv_seq_len):
                raise ValueError(f"Attention mask should be of size {(bsz, 1, q_len, kv_seq_len)},"
                                 f" but is {attention_mask.size()}")
            weights = weights + attention_mask
            weights = torch.max(weights, torch.tensor(torch.finfo(weights.dtype).min, device=weights.device))
        weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(weights, value.transpose(1, 2)).transpose(1, 2)
        out = self.o_proj(out.reshape(bsz, q_len, self.hidden_size))
        return out, (weights if output_attentions else None), present


class BlueLMDecoderLayer(nn.Module):
    def __init__(self, config: BlueLMConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = BlueLMAttention(config)
        self.mlp = BlueLMMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = BlueLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BlueLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, use_cache=False,
                past_key_value=None):
        attn_out, weights, present = self.self_attn(
            self.input_layernorm(hidden_states),
            past_key_value=past_key_value,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            use_cache=use_cache,
        )
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (weights,)
        if use_cache:
            outputs += (present,)
        return outputs


class BlueLMPreTrainedModel(PreTrainedModel):
    config_class = BlueLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["BlueLMDecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"decoder\.version"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.normal_(mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            # The embedding LayerNorm's gain is drawn small (around 2 * std): with a gain near 1 the
            # normalized embeddings drown the attention output in the residual stream, and the tiny
            # model's logits barely depend on positions, so a batching bug (wrong positions after
            # padding or trimming) would go unnoticed.
            module.weight.data.normal_(mean=2 * std, std=std / 2)
            module.bias.data.normal_(mean=0.0, std=std / 5)
        elif isinstance(module, BlueLMRMSNorm):
            module.weight.data.normal_(mean=1.0, std=std)


class BlueLMModel(BlueLMPreTrainedModel):
    def __init__(self, config: BlueLMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        if config.use_stable_embedding:
            self.embed_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:
            self.embed_layer_norm = None
        self.layers = nn.ModuleList([BlueLMDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = BlueLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _decoder_mask(self, attention_mask, batch, q_len, dtype, device, past):
        mask = None
        if q_len > 1:
            mask = _causal_mask(batch, q_len, past, dtype, device)
        if attention_mask is not None:
            padding = _padding_mask(attention_mask, dtype, q_len).to(device)
            mask = padding if mask is None else padding + mask
        return mask

    def forward(
        self,
        input_ids: torch.LongTensor = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[List[torch.FloatTensor]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[Tuple, BaseModelOutputWithPast]:
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict

        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both decoder_input_ids and decoder_inputs_embeds at the same time")
        if input_ids is not None:
            batch_size, seq_length = input_ids.shape
        elif inputs_embeds is not None:
            batch_size, seq_length, _ = inputs_embeds.shape
        else:
            raise ValueError("You have to specify either decoder_input_ids or decoder_inputs_embeds")

        past_length = past_key_values[0][0].shape[1] if past_key_values is not None else 0
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
            if self.embed_layer_norm is not None:
                inputs_embeds = self.embed_layer_norm(inputs_embeds)
        if attention_mask is None:
            attention_mask = torch.ones((batch_size, seq_length + past_length), dtype=torch.bool,
                                        device=inputs_embeds.device)
        attention_mask = self._decoder_mask(attention_mask, batch_size, seq_length, inputs_embeds.dtype,
                                            inputs_embeds.device, past_length)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        all_self_attns = () if output_attentions else None
        next_cache = () if use_cache else None
        for idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            layer_outputs = layer(
                hidden_states,
                attention_mask=attention_mask,
                past_key_value=past_key_values[idx] if past_key_values is not None else None,
                output_attentions=output_attentions,
                use_cache=use_cache,
            )
            hidden_states = layer_outputs[0]
            if use_cache:
                next_cache += (layer_outputs[2 if output_attentions else 1],)
            if output_attentions:
                all_self_attns += (layer_outputs[1],)

        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        if not return_dict:
            return tuple(v for v in (hidden_states, next_cache, all_hidden_states, all_self_attns) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=next_cache,
            hidden_states=all_hidden_states,
            attentions=all_self_attns,
        )


class BlueLMForCausalLM(BlueLMPreTrainedModel):
    def __init__(self, config: BlueLMConfig):
        super().__init__(config)
        self.model = BlueLMModel(config)
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
        past_key_values: Optional[List[torch.FloatTensor]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[Tuple, CausalLMOutputWithPast]:
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        logits = self.lm_head(outputs[0])

        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous().view(-1, self.config.vocab_size)
            shift_labels = labels[..., 1:].contiguous().view(-1).to(shift_logits.device)
            loss = CrossEntropyLoss()(shift_logits, shift_labels)

        if not return_dict:
            output = (logits,) + tuple(outputs[1:])
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, **kwargs):
        if past_key_values:
            input_ids = input_ids[:, -1:]
        if inputs_embeds is not None and past_key_values is None:
            model_inputs = {"inputs_embeds": inputs_embeds}
        else:
            model_inputs = {"input_ids": input_ids}
        model_inputs.update({
            "past_key_values": past_key_values,
            "use_cache": kwargs.get("use_cache"),
            "attention_mask": attention_mask,
        })
        return model_inputs

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        return tuple(tuple(state.index_select(0, beam_idx) for state in layer_past) for layer_past in past_key_values)

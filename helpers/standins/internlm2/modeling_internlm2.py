"""InternLM2 stand-in: a small causal LM written by this project for its tests, loaded as remote code.

It reproduces what an inference engine touches in InternLM2-chat-7b's own remote code (the
``modeling_internlm2.py`` of that checkpoint), not its text:

* ``InternLM2ForCausalLM.forward(input_ids, attention_mask, position_ids, past_key_values,
  inputs_embeds, labels, use_cache, output_attentions, output_hidden_states, return_dict)``,
  no ``**kwargs``;
* rotary positions come from ``position_ids`` (default: counted on from the cache length); the
  cos/sin table is cut to the key length before it is indexed, so a position id at or beyond
  ``past + new`` tokens raises ``IndexError`` as in the vendor's code;
* the KV cache is the legacy format: a tuple with one ``(key, value)`` pair per layer, each
  ``[batch, num_key_value_heads, seq, head_dim]`` (sequence on dim 2), holding the key/value heads
  before they are repeated for grouped-query attention;
* a 2-D ``attention_mask`` must cover ``past + new`` tokens (a shorter one raises ``ValueError``);
* weight names: ``model.tok_embeddings``, ``model.layers.N.attention.wqkv`` (one fused matrix,
  grouped per key/value head: the rows of that head's query heads, then its key, then its value),
  ``attention.wo``, ``feed_forward.w1`` (gate) / ``w3`` (up) / ``w2`` (down), ``attention_norm``,
  ``ffn_norm``, ``model.norm`` and the head ``output``;
* generation: the vendor's ``prepare_inputs_for_generation`` (positions from the attention mask's
  cumulative sum, the prompt cut by the cache length) and no ``Cache`` class support, so
  ``generate()`` on transformers 4.48 runs on legacy tuples. Like the vendor's class it derives
  from ``PreTrainedModel`` only; ``AutoModelForCausalLM`` adds ``GenerationMixin`` on load.
* ``rope_scaling`` ``{"type": "dynamic"}`` (NTK) changes nothing up to ``max_position_embeddings``;
  beyond it the rotary base grows, and (as in the vendor's code) stays grown for later calls.

Like the vendor's file it needs ``einops``.
"""

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_internlm2 import InternLM2Config


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


class InternLM2RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class InternLM2RotaryEmbedding(nn.Module):
    """Rotate-half RoPE; returns the cos/sin tables for positions ``0 .. seq_len - 1``."""

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
        return self.cos_cached[:seq_len].to(x.dtype), self.sin_cached[:seq_len].to(x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(q, k, cos, sin, position_ids):
    cos = cos[position_ids].unsqueeze(1)  # [batch, 1, seq, dim]
    sin = sin[position_ids].unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _repeat_kv(x, times):
    """``[batch, kv_heads, seq, dim]`` -> ``[batch, kv_heads * times, seq, dim]`` (each head repeated in place)."""
    if times == 1:
        return x
    batch, heads, seq, dim = x.shape
    return x[:, :, None].expand(batch, heads, times, seq, dim).reshape(batch, heads * times, seq, dim)


class InternLM2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # down
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class InternLM2Attention(nn.Module):
    """Grouped-query attention with the fused, per-group ``wqkv`` projection."""

    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_key_value_groups * self.num_key_value_heads != self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_key_value_heads "
                             f"{self.num_key_value_heads}")
        self.wqkv = nn.Linear(self.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim,
                              bias=config.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=config.bias)
        scaling = config.rope_scaling or {}
        self.rotary_emb = InternLM2RotaryEmbedding(
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
        past_key_value: Optional[Tuple[torch.Tensor]] = None,
        output_attentions: bool = False,
        use_cache: bool = False,
        **kwargs,
    ):
        bsz, q_len, _ = hidden_states.size()
        # wqkv rows, per key/value head h: [query heads of group h ..., key h, value h], head_dim rows each
        qkv = rearrange(self.wqkv(hidden_states), "b q (h gs d) -> b q h gs d",
                        gs=self.num_key_value_groups + 2, d=self.head_dim)
        query_states = rearrange(qkv[..., : self.num_key_value_groups, :], "b q h gs d -> b q (h gs) d")
        query_states = query_states.transpose(1, 2)
        key_states = qkv[..., -2, :].transpose(1, 2)
        value_states = qkv[..., -1, :].transpose(1, 2)

        kv_seq_len = q_len + (past_key_value[0].shape[-2] if past_key_value is not None else 0)
        cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)
        query_states, key_states = _apply_rotary(query_states, key_states, cos, sin, position_ids)

        if past_key_value is not None:
            key_states = torch.cat([past_key_value[0], key_states], dim=2)
            value_states = torch.cat([past_key_value[1], value_states], dim=2)
        present = (key_states, value_states) if use_cache else None

        key_states = _repeat_kv(key_states, self.num_key_value_groups)
        value_states = _repeat_kv(value_states, self.num_key_value_groups)
        scores = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(self.head_dim)
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query_states.dtype)
        out = torch.matmul(weights, value_states).transpose(1, 2).reshape(bsz, q_len, self.hidden_size)
        return self.wo(out), (weights if output_attentions else None), present


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        if config.attn_implementation != "eager":
            raise ValueError(f"this stand-in implements eager attention only, not {config.attn_implementation!r}")
        self.attention = InternLM2Attention(config)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, **kwargs):
        attn_out, attn_weights, present = self.attention(
            self.attention_norm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_value=past_key_value,
            output_attentions=output_attentions,
            use_cache=use_cache,
        )
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states))
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (attn_weights,)
        if use_cache:
            outputs += (present,)
        return outputs


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    base_model_prefix = "model"
    _no_split_modules = ["InternLM2DecoderLayer"]
    _skip_keys_device_placement = "past_key_values"

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()


class InternLM2Model(InternLM2PreTrainedModel):
    """The decoder stack (``tok_embeddings``, ``layers``, ``norm``) without the output head."""

    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([InternLM2DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

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

        past_length = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + seq_length, dtype=torch.long,
                                        device=inputs_embeds.device).unsqueeze(0)
        mask = _attention_bias(attention_mask, batch_size, seq_length, past_length, inputs_embeds.dtype,
                               inputs_embeds.device)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        next_cache = () if use_cache else None
        for idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            outputs = layer(
                hidden_states,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_value=past_key_values[idx] if past_key_values is not None else None,
                output_attentions=output_attentions,
                use_cache=use_cache,
            )
            hidden_states = outputs[0]
            if use_cache:
                next_cache += (outputs[2 if output_attentions else 1],)
            if output_attentions:
                all_attentions += (outputs[1],)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        if not return_dict:
            return tuple(v for v in (hidden_states, next_cache, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=next_cache,
                                       hidden_states=all_hidden_states, attentions=all_attentions)


class InternLM2ForCausalLM(InternLM2PreTrainedModel):
    _tied_weights_keys = ["output.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, new_embeddings):
        self.output = new_embeddings

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
        logits = self.output(outputs[0]).float()

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
            past_length = past_key_values[0][0].shape[2]
            # keep the tokens the cache has not seen (or just the last one, if the caller already cut them)
            cut = past_length if input_ids.shape[1] > past_length else input_ids.shape[1] - 1
            input_ids = input_ids[:, cut:]

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

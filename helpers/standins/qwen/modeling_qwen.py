"""A small remote-code model with the interface of Qwen-7B-Chat v1 (``QWenLMHeadModel``).

Written by this project for tests: it is not the vendor's code. It reproduces what an inference
engine, a weight converter or ``model.generate`` touches in the vendor's ``modeling_qwen.py``
(Qwen-7B-Chat v1.1):

* ``forward`` keyword arguments: input_ids, past_key_values, attention_mask, token_type_ids,
  position_ids, head_mask, inputs_embeds, encoder_hidden_states, encoder_attention_mask, labels,
  use_cache, output_attentions, output_hidden_states, return_dict. ``position_ids`` (like
  ``token_type_ids``, ``head_mask`` and the encoder arguments) is accepted and ignored.
* Positions come from the cache length: with ``kv_len`` = cached tokens + new tokens, the new
  tokens are rotated for positions ``kv_len - q_len ... kv_len - 1`` whatever the padding.
* KV cache: a tuple with one ``(key, value)`` pair per layer, each ``[batch, seq, heads, head_dim]``
  (sequence on dim 1); keys are stored after the rotary embedding.
* A 2-D ``attention_mask`` ``[batch, kv_len]`` (cached columns + new ones) becomes an additive
  mask (``(1 - mask) * finfo.min``) over those columns, combined with a causal mask for the new
  rows; ``prepare_inputs_for_generation`` drops the mask when the batch has one row. (Revisions
  of the vendor file from late November 2023 on fail with ``AttributeError`` when a mask comes
  with cached tokens, i.e. in batched decoding, see QwenLM/Qwen issues 731 and 1231; earlier v1.1
  revisions slice the causal mask from a full-size table and work. The stand-in works.)
* Rotary embedding in the rotate-half form, one table for the whole model
  (``transformer.rotary_emb``, buffer ``inv_freq``, base ``rotary_emb_base``).
* Dynamic NTK (``use_dynamic_ntk``) and logn attention scaling (``use_logn_attn``) are
  implemented as in the vendor's code; both only act beyond ``seq_length`` tokens. As there, the
  NTK factors chosen at a prefill are kept on the rotary module and reused by the decoding steps
  that follow.
* Weight names: ``transformer.wte``, ``transformer.h.N.ln_1``, ``.attn.c_attn`` (fused q/k/v, with
  bias), ``.attn.c_proj`` (no bias), ``.ln_2``, ``.mlp.w1``, ``.mlp.w2`` (each
  ``intermediate_size // 2`` wide), ``.mlp.c_proj``; ``transformer.ln_f`` (RMSNorm); ``lm_head``.
  MLP output: ``c_proj(w1(x) * silu(w2(x)))``.
* Precision chosen at construction when ``bf16``/``fp16``/``fp32`` are all False (bf16 on a GPU
  that supports it, else fp16 on compute capability >= 7, else fp32), written back into the config.
* ``generate`` accepts ``stop_words_ids`` (token sequences after which EOS is forced).

Left out: flash-attention (the stand-in always uses PyTorch's scaled_dot_product_attention, the
vendor's path on CPU and without flash-attn), KV-cache quantization, ``chat``/``chat_stream``
(prompt building lives in the project), gradient checkpointing, dropout.

Weights are random: :meth:`QWenPreTrainedModel._init_weights` draws every weight, bias and norm
scale at random (std ``initializer_range``), so that a converter that drops or swaps a tensor
changes the output.
"""

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_qwen import QWenConfig

logger = logging.get_logger(__name__)

_CUDA = torch.cuda.is_available()
_CUDA_BF16 = _CUDA and torch.cuda.is_bf16_supported()
_CUDA_FP16 = _CUDA and torch.cuda.get_device_capability(0)[0] >= 7


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``t`` ``[batch, seq, heads, dim]`` (in float32)."""
    width = cos.shape[-1]
    t32 = t.float()
    turned, rest = t32[..., :width], t32[..., width:]
    turned = turned * cos + _rotate_half(turned) * sin
    return torch.cat((turned, rest), dim=-1).type_as(t)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions ``0 .. seq_len - 1``, shaped ``[1, seq_len, 1, dim]``.

    ``inv_freq`` is recomputed (in float32) whenever the table grows or the NTK factor changes,
    with the base scaled by ``ntk_alpha ** (dim / (dim - 2))``.
    """

    def __init__(self, dim: int, base: float = 10000):
        super().__init__()
        self.dim = dim
        self.base = base
        self.register_buffer("inv_freq", self._frequencies(1.0), persistent=False)
        self._cached_len = 0
        self._cached_alpha = 1.0
        self._table = None
        self._ntk_alpha_cached_list = [1.0]  # the factors of the last prefill, reused while decoding

    def _frequencies(self, ntk_alpha: float, device=None) -> torch.Tensor:
        base = self.base * ntk_alpha ** (self.dim / (self.dim - 2))
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def forward(self, seq_len: int, ntk_alpha: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
        if (self._table is None or seq_len > self._cached_len or ntk_alpha != self._cached_alpha
                or self._table[0].device != self.inv_freq.device):
            self.inv_freq = self._frequencies(ntk_alpha, self.inv_freq.device)
            self._cached_len = max(2 * seq_len, 16)
            self._cached_alpha = ntk_alpha
            positions = torch.arange(self._cached_len, device=self.inv_freq.device, dtype=torch.float32)
            angles = torch.outer(positions, self.inv_freq)
            emb = torch.cat((angles, angles), dim=-1)[None, :, None, :]
            self._table = (emb.cos(), emb.sin())
        cos, sin = self._table
        return cos[:, :seq_len], sin[:, :seq_len]


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.projection_size = config.kv_channels * config.num_attention_heads
        if self.projection_size != self.hidden_size or self.head_dim != config.kv_channels:
            raise ValueError("kv_channels * num_attention_heads must equal hidden_size (as in Qwen v1)")
        self.seq_length = config.seq_length
        self.use_logn_attn = config.use_logn_attn
        self.c_attn = nn.Linear(config.hidden_size, 3 * self.projection_size)
        self.c_proj = nn.Linear(self.projection_size, config.hidden_size, bias=not config.no_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary_pos_emb_list: List[Tuple[torch.Tensor, torch.Tensor]],
        layer_past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        use_cache: bool = False,
    ):
        batch, q_len, _ = hidden_states.shape
        query, key, value = self.c_attn(hidden_states).split(self.hidden_size, dim=2)
        shape = (batch, q_len, self.num_heads, self.head_dim)
        query, key, value = query.view(shape), key.view(shape), value.view(shape)

        # the new tokens take the last q_len positions of the table (built for kv_len positions)
        if len(rotary_pos_emb_list) == 1:
            cos, sin = (part[:, -q_len:] for part in rotary_pos_emb_list[0])
        else:  # one NTK factor per row (a padded prefill beyond seq_length, and its decoding steps)
            if len(rotary_pos_emb_list) < batch:
                raise RuntimeError(f"{len(rotary_pos_emb_list)} rotary tables for a batch of {batch} rows")
            cos = torch.cat([c[:, -q_len:] for c, _ in rotary_pos_emb_list[:batch]], dim=0)
            sin = torch.cat([s[:, -q_len:] for _, s in rotary_pos_emb_list[:batch]], dim=0)
        query = _apply_rotary(query, cos, sin)
        key = _apply_rotary(key, cos, sin)

        if layer_past is not None:
            key = torch.cat((layer_past[0], key), dim=1)
            value = torch.cat((layer_past[1], value), dim=1)
        present = (key, value) if use_cache else None
        kv_len = key.shape[1]

        if self.use_logn_attn and kv_len > self.seq_length and not self.training:
            # query at 0-based position p is scaled by log(p + 1) / log(seq_length) beyond seq_length
            count = torch.arange(kv_len - q_len + 1, kv_len + 1, device=query.device, dtype=torch.float32)
            scale = torch.where(count > self.seq_length, count.log() / math.log(self.seq_length),
                                torch.ones_like(count))
            query = query * scale[None, :, None, None].type_as(query)

        # row i of the new tokens sees columns 0 .. kv_len - q_len + i
        causal = torch.ones((kv_len, kv_len), dtype=torch.bool, device=query.device).tril()
        causal = causal[kv_len - q_len:].view(1, 1, q_len, kv_len)
        if attention_mask is not None:
            mask = attention_mask.expand(-1, -1, q_len, -1).masked_fill(~causal, torch.finfo(query.dtype).min)
        else:
            mask = causal
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
        ).transpose(1, 2)
        out = self.c_proj(out.reshape(batch, q_len, self.projection_size))
        return out, present


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        width = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.c_proj = nn.Linear(width, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, hidden_states, rotary_pos_emb_list, layer_past=None, attention_mask=None, use_cache=False):
        attn_out, present = self.attn(self.ln_1(hidden_states), rotary_pos_emb_list, layer_past=layer_past,
                                      attention_mask=attention_mask, use_cache=use_cache)
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, present


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    is_parallelizable = False
    supports_gradient_checkpointing = False
    _no_split_modules = ["QWenBlock"]
    _skip_keys_device_placement = "past_key_values"

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                module.bias.data.normal_(mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            module.weight.data.normal_(mean=1.0, std=std)


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig):
        super().__init__(config)
        if config.use_cache_quantization:
            raise ValueError("the Qwen stand-in does not implement use_cache_quantization")
        self.seq_length = config.seq_length
        self.use_dynamic_ntk = config.use_dynamic_ntk
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        rotary_dim = config.kv_channels if config.rotary_pct == 1.0 else int(config.kv_channels * config.rotary_pct)
        self.rotary_emb = RotaryEmbedding(rotary_dim, base=config.rotary_emb_base)
        self.h = nn.ModuleList([QWenBlock(config) for _ in range(config.num_hidden_layers)])
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def get_ntk_alpha(self, true_seq_len: int) -> float:
        context_value = math.log(true_seq_len / self.seq_length, 2) + 1
        return max(2 ** math.ceil(context_value) - 1, 1)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Tuple[Tuple[torch.Tensor]]] = None,
        attention_mask: Optional[torch.FloatTensor] = None,
        token_type_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        head_mask: Optional[torch.FloatTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        # token_type_ids, position_ids, head_mask and the encoder arguments are accepted and
        # ignored, as in the vendor's code: positions follow the cache length.
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if output_attentions:
            raise ValueError("Cannot output attentions while using scaled_dot_product_attention")

        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
        if input_ids is not None:
            input_shape = input_ids.size()
            input_ids = input_ids.view(-1, input_shape[-1])
            inputs_embeds = self.wte(input_ids)
        elif inputs_embeds is not None:
            input_shape = inputs_embeds.size()[:-1]
        else:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        batch_size, q_len = inputs_embeds.shape[0], inputs_embeds.shape[1]

        if past_key_values is None or past_key_values[0] is None:
            past_key_values = (None,) * len(self.h)
            past_length = 0
        else:
            past_length = past_key_values[0][0].shape[1]  # [batch, seq, heads, head_dim]
        kv_seq_len = q_len + past_length

        true_lengths = None
        if attention_mask is not None:
            if batch_size <= 0:
                raise ValueError("batch_size has to be defined and > 0")
            attention_mask = attention_mask.view(batch_size, -1)
            true_lengths = (attention_mask != 0).sum(dim=-1)
            attention_mask = attention_mask[:, None, None, :].to(dtype=self.dtype)
            attention_mask = (1.0 - attention_mask) * torch.finfo(self.dtype).min

        # dynamic NTK: chosen at a prefill from the (true) lengths, kept for the decoding steps
        if self.training or not self.use_dynamic_ntk:
            ntk_alpha_list = [1.0]
        elif kv_seq_len != q_len:
            ntk_alpha_list = self.rotary_emb._ntk_alpha_cached_list
        elif true_lengths is not None and kv_seq_len > self.seq_length:
            ntk_alpha_list = [self.get_ntk_alpha(int(n)) for n in true_lengths.tolist()]
        else:
            ntk_alpha_list = [self.get_ntk_alpha(kv_seq_len)]
        self.rotary_emb._ntk_alpha_cached_list = ntk_alpha_list
        rotary_pos_emb_list = [self.rotary_emb(kv_seq_len, ntk_alpha=alpha) for alpha in ntk_alpha_list]

        hidden_states = inputs_embeds
        presents = () if use_cache else None
        all_hidden_states = () if output_hidden_states else None
        for block, layer_past in zip(self.h, past_key_values, strict=True):
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
            hidden_states, present = block(hidden_states, rotary_pos_emb_list, layer_past=layer_past,
                                           attention_mask=attention_mask, use_cache=use_cache)
            if use_cache:
                presents = presents + (present,)

        hidden_states = self.ln_f(hidden_states)
        hidden_states = hidden_states.view(input_shape + (hidden_states.size(-1),))
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)

        if not return_dict:
            return tuple(v for v in (hidden_states, presents, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=presents,
            hidden_states=all_hidden_states,
            attentions=None,
        )


class StopWordsLogitsProcessor(LogitsProcessor):
    """Forces ``eos_token_id`` right after a row ends with one of ``stop_words_ids``."""

    def __init__(self, stop_words_ids: List[List[int]], eos_token_id: int):
        self.stop_words_ids = [list(words) for words in stop_words_ids if list(words) != [eos_token_id]]
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, ids in enumerate(input_ids.tolist()):
            if any(words and ids[-len(words):] == words for words in self.stop_words_ids):
                scores[row, self.eos_token_id] = float(2**15)
        return scores


class QWenLMHeadModel(QWenPreTrainedModel):
    _keys_to_ignore_on_load_missing = [r"h\.\d+\.attn\.rotary_emb\.inv_freq"]
    _keys_to_ignore_on_load_unexpected = [r"h\.\d+\.attn\.masked_bias"]

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        if config.bf16 + config.fp16 + config.fp32 > 1:
            raise ValueError('Only one of "bf16", "fp16", "fp32" can be true')
        if config.bf16 + config.fp16 + config.fp32 == 0:  # precision picked from the hardware
            if _CUDA_BF16:
                config.bf16 = True
            elif _CUDA_FP16:
                config.fp16 = True
            else:
                config.fp32 = True
        if config.use_flash_attn == "auto":
            # resolved as by the vendor; the stand-in itself never uses flash-attention
            config.use_flash_attn = bool(config.bf16 or config.fp16)

        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.bf16:
            self.transformer.bfloat16()
            self.lm_head.bfloat16()
        if config.fp16:
            self.transformer.half()
            self.lm_head.half()
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        if past_key_values:
            input_ids = input_ids[:, -1].unsqueeze(-1)
        # one row: no mask at all (the vendor's choice); several rows: the 2-D mask as given
        attention_mask = None if input_ids.size(0) == 1 else kwargs.get("attention_mask")
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

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Tuple[Tuple[torch.Tensor]]] = None,
        attention_mask: Optional[torch.FloatTensor] = None,
        token_type_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        head_mask: Optional[torch.FloatTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[Tuple, CausalLMOutputWithPast]:
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        outputs = self.transformer(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        lm_logits = self.lm_head(outputs[0])

        loss = None
        if labels is not None:
            labels = labels.to(lm_logits.device)
            shift_logits = lm_logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))

        if not return_dict:
            output = (lm_logits,) + tuple(outputs[1:])
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss,
            logits=lm_logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx: torch.Tensor):
        return tuple(
            tuple(state.index_select(0, beam_idx.to(state.device)) for state in layer_past)
            for layer_past in past_key_values
        )

    def generate(self, inputs=None, generation_config=None, logits_processor=None, **kwargs):
        generation_config = generation_config if generation_config is not None else self.generation_config
        stop_words_ids = kwargs.pop("stop_words_ids", None)
        if stop_words_ids is None:
            stop_words_ids = getattr(generation_config, "stop_words_ids", None)
        if stop_words_ids is not None:
            eos = generation_config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
            processor = StopWordsLogitsProcessor(stop_words_ids=stop_words_ids, eos_token_id=eos)
            if logits_processor is None:
                logits_processor = LogitsProcessorList([processor])
            else:
                logits_processor.append(processor)
        return super().generate(inputs, generation_config=generation_config, logits_processor=logits_processor,
                                **kwargs)

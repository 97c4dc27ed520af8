"""Qwen-7B-Chat (v1, ``QWenLMHeadModel``) weights in the Qwen2 architecture, for vLLM.

vLLM dropped Qwen v1 after 0.23, but its layers are the Qwen2 layers under other names: a fused
``c_attn`` (query, key and value stacked, with bias) becomes ``q_proj``/``k_proj``/``v_proj``,
``c_proj`` becomes ``o_proj``, the MLP's ``w2`` (the branch that goes through SiLU) and ``w1``
become ``gate_proj`` and ``up_proj``, ``mlp.c_proj`` becomes ``down_proj``; the norms and embeddings
only change names. Rotary embeddings are the same (rotate-half over the whole head, base
``rotary_emb_base``). What Qwen2 does not have is Qwen v1's dynamic NTK and logn scaling, which act
only beyond the training length (``seq_length``, 8192): the converted model's context is capped
there, and within it the two give the same numbers.

The tokenizer files are copied as they are (Qwen's tiktoken tokenizer is remote code: serve the
folder with ``--trust-remote-code``). Shards are converted one at a time, so the memory needed is
one shard, not the model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin")
SKIP_FILES = {"config.json", "modeling_qwen.py", "configuration_qwen.py", "cpp_kernels.py",
              "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def qwen2_config(config: dict) -> dict:
    """The Qwen2 ``config.json`` for a Qwen v1 one."""
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    if config.get("kv_channels", hidden // heads) * heads != hidden:
        raise ValueError("kv_channels x num_attention_heads must equal hidden_size")
    if float(config.get("rotary_pct", 1.0)) != 1.0:
        raise ValueError("only rotary_pct 1.0 (rotary over the whole head) maps onto Qwen2")
    context = int(config.get("seq_length") or config.get("max_position_embeddings"))
    out = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": config["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": config["intermediate_size"] // 2,  # Qwen v1 counts both MLP branches
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "hidden_act": "silu",
        "max_position_embeddings": context,  # dynamic NTK / logn (beyond it) have no Qwen2 equivalent
        "rope_theta": float(config.get("rotary_emb_base", 10000)),
        "rms_norm_eps": config.get("layer_norm_epsilon", 1e-6),
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "initializer_range": config.get("initializer_range", 0.02),
        "torch_dtype": config.get("torch_dtype", "bfloat16"),
        "use_cache": True,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            out[key] = config[key]
    return out


def rename(name: str, tensor, hidden: int) -> list[tuple[str, object]]:
    """The Qwen2 tensors for one Qwen v1 tensor (``c_attn`` gives three)."""
    if name == "transformer.wte.weight":
        return [("model.embed_tokens.weight", tensor)]
    if name == "transformer.ln_f.weight":
        return [("model.norm.weight", tensor)]
    if name == "lm_head.weight":
        return [(name, tensor)]
    parts = name.split(".")
    if parts[:2] != ["transformer", "h"]:
        raise ValueError(f"unexpected tensor {name!r} in a Qwen v1 checkpoint")
    layer, rest = parts[2], ".".join(parts[3:])
    prefix = f"model.layers.{layer}."
    if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = tensor.split(hidden, dim=0)
        return [(f"{prefix}self_attn.{p}_proj.{kind}", t.contiguous()) for p, t in (("q", q), ("k", k), ("v", v))]
    simple = {
        "ln_1.weight": "input_layernorm.weight",
        "ln_2.weight": "post_attention_layernorm.weight",
        "attn.c_proj.weight": "self_attn.o_proj.weight",
        "mlp.w2.weight": "mlp.gate_proj.weight",   # silu(w2(x)) * w1(x): w2 is the gate
        "mlp.w1.weight": "mlp.up_proj.weight",
        "mlp.c_proj.weight": "mlp.down_proj.weight",
    }
    if rest not in simple:
        raise ValueError(f"unexpected tensor {name!r} in a Qwen v1 checkpoint")
    return [(prefix + simple[rest], tensor)]


def _read(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=True)


def convert_qwen(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the Qwen2 version of the Qwen v1 folder ``src`` into ``dst`` (new folder); returns it."""
    from safetensors.torch import save_file

    src, dst = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if "QWenLMHeadModel" not in (config.get("architectures") or []):
        raise ValueError(f"{src} is not a Qwen v1 checkpoint (architectures: {config.get('architectures')})")
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dst} is not empty (pass overwrite=True / --overwrite)")
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shards = sorted(p for p in src.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not shards:
        raise FileNotFoundError(f"no weights (*.safetensors or *.bin) in {src}")
    hidden = config["hidden_size"]
    index: dict[str, str] = {}
    for number, shard in enumerate(shards, 1):
        tensors = {}
        for name, tensor in _read(shard).items():
            for new, value in rename(name, tensor, hidden):
                tensors[new] = value.contiguous()
        out_name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(dst / out_name), metadata={"format": "pt"})
        index.update({name: out_name for name in tensors})
    if len(shards) > 1:
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": dict(sorted(index.items()))}, indent=2) + "\n", encoding="utf-8")
    (dst / "config.json").write_text(json.dumps(qwen2_config(config), indent=2, sort_keys=True) + "\n",
                                     encoding="utf-8")
    for item in src.iterdir():  # tokenizer, generation config, licence, stand-in marker ...
        if item.is_file() and item.suffix not in WEIGHT_SUFFIXES and item.name not in SKIP_FILES:
            shutil.copy2(item, dst / item.name)
    return dst

"""Load a chat model and its tokenizer, with each family's quirks handled in one place."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .formats import ChatFormat, get_chat_format
from .registry import FAMILIES, ModelSpec, spec_for_family


class LoadError(RuntimeError):
    """The model could not be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    """Everything the engine needs to generate with one model."""

    name: str
    path: str
    family: str
    tokenizer: Any
    model: Any
    chat_format: ChatFormat
    device: str
    dtype: Any
    context_length: int
    generation_defaults: dict = field(default_factory=dict)
    stop_ids: list[int] = field(default_factory=list)
    pad_id: int | None = None
    load_seconds: float = 0.0
    standin: bool = False  # a tiny random-weight stand-in (tests, demo), not the real weights

    def memory_gb(self) -> float | None:
        """GPU memory allocated by torch in GB (None on the CPU)."""
        import torch

        if self.device.startswith("cuda") and torch.cuda.is_available():
            return torch.cuda.memory_allocated() / 1024**3
        return None

    def describe(self) -> str:
        mem = self.memory_gb()
        mem_text = f", GPU memory {mem:.1f} GB" if mem is not None else ""
        kind = " [tiny random-weight stand-in]" if self.standin else ""
        return (f"{self.name}{kind} ({self.family}) on {self.device} in {str(self.dtype).replace('torch.', '')}"
                f", context {self.context_length} tokens{mem_text}, loaded in {self.load_seconds:.1f} s")

    def unload(self) -> None:
        """Free the model's memory (stop any engine or server using it first).

        The weights are emptied in place, so the memory comes back even where something else still
        holds the model (a variable in the notebook, an old traceback); ``self.model`` becomes None.
        Load the model again to use it again."""
        import gc
        import itertools

        import torch

        model, self.model = self.model, None
        if model is not None:
            with torch.no_grad():
                for tensor in itertools.chain(model.parameters(), model.buffers()):
                    tensor.data = torch.empty(0, dtype=tensor.dtype)
            del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def unloaded(self) -> bool:
        return self.model is None


# --------------------------------------------------------------------------- dtype / device


def pick_device(device: str | None = None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(policy: str = "auto", device: str = "cpu"):
    """bf16 on GPUs with compute capability >= 8.0 (Ampere: RTX 30xx/40xx, A100), fp16 on older
    GPUs (bf16 is emulated and slow there), fp32 on the CPU."""
    import torch

    named = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if policy != "auto":
        try:
            return named[policy]
        except KeyError:
            raise ValueError(f"dtype must be 'auto' or one of {', '.join(named)}, not {policy!r}") from None
    if not device.startswith("cuda"):
        return torch.float32
    major, _ = torch.cuda.get_device_capability(torch.device(device))
    return torch.bfloat16 if major >= 8 else torch.float16


# --------------------------------------------------------------------------- family detection


def detect_family(path: str | os.PathLike) -> str:
    """The chat family of a model folder: from a stand-in's marker or the config's model_type."""
    path = Path(path)
    marker = path / "tiny_standin.json"
    if marker.exists():
        return json.loads(marker.read_text(encoding="utf-8"))["family"]
    config_file = path / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        text = " ".join([str(config.get("model_type", ""))] + list(config.get("architectures") or [])).lower()
        for family in ("internlm2", "xverse", "bluelm", "minicpm", "qwen"):
            if family in text:
                return family
    raise LoadError(f"cannot tell which chat format {path} uses: pass family= (one of {', '.join(FAMILIES)})")


def _require_modules(spec: ModelSpec | None) -> None:
    missing = [m for m in (spec.requires if spec else ()) if _missing_module(m)]
    if missing:
        pkgs = {"google.protobuf": "protobuf"}
        names = " ".join(pkgs.get(m, m) for m in missing)
        raise LoadError(f"{spec.display_name} needs {', '.join(missing)}: run `pip install {names}` "
                        "(or `pip install -r requirements.txt`) and restart the kernel")


def _missing_module(name: str) -> bool:
    """True if ``name`` (dotted names too: its parents are looked up first) cannot be imported."""
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:
        return True


# --------------------------------------------------------------------------- tokenizer quirks


def _load_tokenizer(path: str, family: str):
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except AttributeError as exc:
        # "... has no attribute 'sp_model'" (or, on transformers 4.4x, "... has no attribute
        # vocab_size", the property that touches sp_model) from a remote SentencePiece tokenizer
        if not any(word in str(exc) for word in ("sp_model", "vocab_size", "get_vocab")):
            raise
        tokenizer = _load_sp_tokenizer_set_early(path, **kwargs)
    _fix_special_tokens(tokenizer, family)
    return tokenizer


def _load_sp_tokenizer_set_early(path: str, **kwargs):
    """BlueLM's remote tokenizer assigns ``self.sp_model`` after ``super().__init__()``, which on
    transformers >= 4.34 already asks for the vocabulary: AttributeError 'sp_model'. Load the same
    class with the SentencePiece model assigned before its own ``__init__`` runs."""
    import sentencepiece as spm
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = json.loads((Path(path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    ref = (config.get("auto_map") or {}).get("AutoTokenizer")
    if not ref:
        raise LoadError(f"{path}: tokenizer failed with an sp_model error and has no remote tokenizer class")
    cls = get_class_from_dynamic_module(ref[0] if isinstance(ref, list) else ref, path)
    original_init = cls.__init__
    if not getattr(original_init, "_sp_model_set_early", False):
        def __init__(self, vocab_file, *args, **kw):
            self.vocab_file = vocab_file
            self.sp_model = spm.SentencePieceProcessor(**(kw.get("sp_model_kwargs") or {}))
            self.sp_model.Load(vocab_file)
            original_init(self, vocab_file, *args, **kw)

        __init__._sp_model_set_early = True
        cls.__init__ = __init__
    return cls.from_pretrained(path, **kwargs)


def _fix_special_tokens(tokenizer, family: str) -> None:
    """Qwen v1's tokenizer sets no eos/pad token; batching and generate() need a pad id."""
    fmt = get_chat_format(family)
    if tokenizer.pad_token_id is None:
        stops = fmt.stop_ids(tokenizer)
        # Qwen pads with <|endoftext|> (its eod token), the others with their eos
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (stops[-1] if stops else None)
        if pad is not None:
            try:
                tokenizer.pad_token_id = pad
            except Exception:  # some remote tokenizers refuse; the engine passes pad ids explicitly
                pass


# --------------------------------------------------------------------------- main entry


def load_model(model: str | os.PathLike, *, family: str | None = None, device: str | None = None,
               dtype: str = "auto", name: str | None = None) -> LoadedModel:
    """Load a model folder (or a registry name whose weights are already downloaded: pass the
    folder returned by ``download``). Prints what it does; returns a ``LoadedModel``."""
    import torch
    from transformers import AutoModelForCausalLM

    path = os.path.abspath(os.path.expanduser(str(model)))
    if not os.path.isdir(path):
        raise LoadError(f"{path} is not a folder: download the model first (helpers.download) "
                        "and pass the folder it returns")
    family = family or detect_family(path)
    spec = spec_for_family(family)
    remote = _has_remote_code(path)
    if remote and "." in os.path.basename(path.rstrip("/")):
        raise LoadError(f"the folder name {os.path.basename(path)!r} contains a dot, which breaks the import of "
                        f"the model's own code: rename it (e.g. to {os.path.basename(path).replace('.', '_')!r})")
    if remote:
        _require_modules(spec)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype if dtype != "auto" else spec.dtype, device)
    started = time.perf_counter()
    print(f"Loading {path} ({family}) on {device} in {str(torch_dtype).replace('torch.', '')} ...", flush=True)
    tokenizer = _load_tokenizer(path, family)
    kwargs: dict[str, Any] = {"trust_remote_code": True, "torch_dtype": torch_dtype, "low_cpu_mem_usage": True}
    if device.startswith("cuda"):
        kwargs["device_map"] = device if ":" in device else "auto"
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except torch.cuda.OutOfMemoryError as exc:
        raise LoadError(f"out of GPU memory while loading ({exc}); {spec.display_name} needs about "
                        f"{spec.gpu_memory_gb:.0f} GB: stop other kernels (nvidia-smi) and try again") from exc
    if not device.startswith("cuda"):
        hf_model.to(device)
    hf_model.eval()
    loaded = _assemble(path, family, name, tokenizer, hf_model.config.to_dict(), model=hf_model, device=device,
                       dtype=torch_dtype, load_seconds=time.perf_counter() - started)
    print(loaded.describe(), flush=True)
    return loaded


def _assemble(path: str, family: str, name: str | None, tokenizer, config: dict, **rest) -> LoadedModel:
    """A LoadedModel: the family's chat format and stop ids, the context (the config's, at most the
    registry's), vendor defaults, pad id; ``rest`` is model, device, dtype (and load time)."""
    spec = spec_for_family(family)
    fmt = get_chat_format(family)
    stop_ids = fmt.stop_ids(tokenizer)
    context = int(config.get("max_position_embeddings") or config.get("seq_length") or 0)
    context = min(context, spec.context_length) if context > 0 else spec.context_length
    return LoadedModel(
        name=name or spec.name, path=path, family=family, tokenizer=tokenizer, chat_format=fmt,
        context_length=context, generation_defaults=dict(spec.generation), stop_ids=stop_ids,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0),
        standin=(Path(path) / "tiny_standin.json").exists(), **rest,
    )


def load_tokenizer_side(model: str | os.PathLike, *, family: str | None = None,
                        name: str | None = None) -> LoadedModel:
    """The tokenizer and chat format of a model folder, without its weights: for a generator that
    runs elsewhere (``helpers.upstream.UpstreamGenerator``, a vLLM server), so that prompts are built
    and encoded here exactly as for the built-in engine. ``loaded.model`` is None."""
    path = os.path.abspath(os.path.expanduser(str(model)))
    if not os.path.isdir(path):
        raise LoadError(f"{path} is not a folder: download the model first (helpers.download)")
    family = family or detect_family(path)
    spec = spec_for_family(family)
    if _has_remote_code(path):
        _require_modules(spec)
    tokenizer = _load_tokenizer(path, family)
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return _assemble(path, family, name, tokenizer, config, model=None, device="vllm", dtype=None)


def _has_remote_code(path: str) -> bool:
    for name in ("config.json", "tokenizer_config.json"):
        f = Path(path) / name
        if f.exists() and "auto_map" in json.loads(f.read_text(encoding="utf-8")):
            return True
    return False

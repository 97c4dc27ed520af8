"""The five models of the series: where they come from and how they want to be run.

Everything here is data. A lesson picks a spec by name (``get_spec("qwen-7b-chat")``); the
download, loading and generation steps read what they need from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    name: str                 # short registry name, used on the command line and as the API model id
    model_id: str             # ModelScope id
    family: str               # chat format family: qwen | internlm2 | xverse | bluelm | minicpm
    revision: str | None = None
    display_name: str = ""
    # dtype policy: "auto" = bf16 on GPUs with compute capability >= 8.0, else fp16; fp32 on CPU.
    dtype: str = "auto"
    gpu_memory_gb: float = 0.0  # rough GPU memory for the weights + a few requests, in GB
    download_gb: float = 0.0    # rough download size
    context_length: int = 4096
    license: str = ""
    # Generation defaults taken from the vendors' own chat() / demos.
    generation: dict[str, Any] = field(default_factory=dict)
    # Extra python modules the remote code imports (checked before loading, with a clear message).
    requires: tuple[str, ...] = ()

    @property
    def folder_name(self) -> str:
        """A folder name without dots: remote code is imported as a module named after its folder."""
        return self.model_id.split("/")[-1].replace(".", "_")


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="qwen-7b-chat",
            model_id="qwen/Qwen-7B-Chat",
            revision="v1.1.4",
            family="qwen",
            display_name="Qwen-7B-Chat",
            gpu_memory_gb=17.0,
            download_gb=15.4,
            context_length=8192,
            license="Tongyi Qianwen LICENSE AGREEMENT",
            generation={"temperature": 1.0, "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1,
                        "max_new_tokens": 512},
            requires=("tiktoken", "einops", "transformers_stream_generator"),
        ),
        ModelSpec(
            name="xverse-7b-chat",
            model_id="xverse/XVERSE-7B-Chat",
            family="xverse",
            display_name="XVERSE-7B-Chat",
            gpu_memory_gb=17.0,
            download_gb=14.6,  # 7,299,846,144 parameters x 2 bytes (bf16)
            context_length=8192,
            license="XVERSE MODEL_LICENSE (commercial use after registering with XVERSE)",
            generation={"temperature": 0.5, "top_p": 0.85, "top_k": 30, "repetition_penalty": 1.1,
                        "max_new_tokens": 2048},
        ),
        ModelSpec(
            name="bluelm-7b-chat",
            model_id="vivo-ai/BlueLM-7B-Chat",
            family="bluelm",
            display_name="BlueLM-7B-Chat",
            gpu_memory_gb=16.0,
            download_gb=14.6,  # 7,296,266,240 parameters x 2 bytes (bf16)
            context_length=2048,
            license="OpenAtom Model License 1.0 since 2024-12-25 (before: vivo_BlueLM model license)",
            generation={"temperature": 0.7, "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1,
                        "max_new_tokens": 512},
            requires=("sentencepiece",),
        ),
        ModelSpec(
            name="internlm2-chat-7b",
            model_id="Shanghai_AI_Laboratory/internlm2-chat-7b",
            family="internlm2",
            display_name="InternLM2-chat-7b",
            gpu_memory_gb=16.0,
            download_gb=15.5,
            context_length=32768,
            license="Apache-2.0 per README since 2025-01 (before: commercial use on application)",
            generation={"temperature": 0.8, "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.0,
                        "max_new_tokens": 1024},
            requires=("sentencepiece", "google.protobuf"),
        ),
        ModelSpec(
            name="minicpm-2b-sft",
            model_id="OpenBMB/MiniCPM-2B-sft-fp32",
            family="minicpm",
            display_name="MiniCPM-2B-sft",
            # the checkpoint is fp32 (11 GB); it is run in bf16 (fp16 on older GPUs)
            gpu_memory_gb=7.0,
            download_gb=10.9,
            context_length=4096,
            license="Apache-2.0 per README since 2025-06 (before: MiniCPM model license)",
            generation={"temperature": 0.5, "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.02,
                        "max_new_tokens": 1024},
        ),
    ]
}

FAMILIES = ("qwen", "internlm2", "xverse", "bluelm", "minicpm")


def get_spec(name: str) -> ModelSpec:
    """Find a model by registry name, ModelScope id or display name (case-insensitive)."""
    key = name.strip().lower()
    for spec in MODELS.values():
        if key in (spec.name, spec.model_id.lower(), spec.display_name.lower()):
            return spec
    known = ", ".join(MODELS)
    raise KeyError(f"unknown model {name!r}; known models: {known} (or pass a local folder)")


def spec_for_family(family: str) -> ModelSpec:
    for spec in MODELS.values():
        if spec.family == family:
            return spec
    raise KeyError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")

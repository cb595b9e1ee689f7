"""LLaMA skeletons of GaLore's sizes, to plan without a model at hand (``plan("7B")``, ``--preset``): the parameters of
each layer in HF's layout on the meta device, and nothing else (no forward)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocab: int = 32000


# GaLore's configs/llama_*.json. Nominal names as in the paper; GaLore's "1B" config has 1.34B parameters.
PRESETS: dict[str, LlamaConfig] = {
    "60M": LlamaConfig(512, 1376, 8, 8),
    "130M": LlamaConfig(768, 2048, 12, 12),
    "350M": LlamaConfig(1024, 2736, 16, 24),
    "1B": LlamaConfig(2048, 5461, 32, 24),
    "7B": LlamaConfig(4096, 11008, 32, 32),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, **factory: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **factory))


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, **factory: Any) -> None:
        super().__init__()
        h = cfg.hidden
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h, bias=False, **factory) for _ in range(4))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, **factory: Any) -> None:
        super().__init__()
        h, i = cfg.hidden, cfg.intermediate
        self.gate_proj = nn.Linear(h, i, bias=False, **factory)
        self.up_proj = nn.Linear(h, i, bias=False, **factory)
        self.down_proj = nn.Linear(i, h, bias=False, **factory)


class LlamaLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, **factory: Any) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, **factory)
        self.mlp = LlamaMLP(cfg, **factory)
        self.input_layernorm = RMSNorm(cfg.hidden, **factory)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, **factory)


class LlamaSkeleton(nn.Module):
    """The parameters of a LLaMA decoder (HF layout: embeddings, q/k/v/o and gate/up/down projections without bias,
    two RMSNorms per layer, a final norm and an untied ``lm_head``). No forward: it exists to be planned."""

    def __init__(self, cfg: LlamaConfig, **factory: Any) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden, **factory)
        self.layers = nn.ModuleList(LlamaLayer(cfg, **factory) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, **factory)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False, **factory)


def llama_preset(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "meta") -> LlamaSkeleton:
    """A LLaMA skeleton of GaLore's size ``name`` (60M, 130M, 350M, 1B, 7B), on the meta device by default."""
    key = {k.lower(): k for k in PRESETS}.get(str(name).lower())
    if key is None:
        raise ValueError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return LlamaSkeleton(PRESETS[key], dtype=dtype, device=device)

"""Module groups (attention, MLP, embeddings, other): which group a module's parameters are reported under."""

from __future__ import annotations

from torch import nn

# Module groups, by module type first, then by the deepest part of the qualified name that names one.
GROUPS = ("attention", "mlp", "embeddings", "other")
GROUP_LABELS = {"attention": "Attention", "mlp": "MLP", "embeddings": "Embeddings", "other": "Other"}
ATTENTION_WORDS = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")
MLP_WORDS = ("mlp", "fc", "ffn", "gate_proj", "up_proj", "down_proj", "feed_forward")


def module_group(name: str, module: nn.Module | None = None) -> str:
    """``embeddings`` for an ``nn.Embedding``/``nn.EmbeddingBag``; else ``attention`` or ``mlp`` from the deepest
    part of the qualified name that contains one of their words (``blocks.0.attn.q_proj`` -> attention,
    ``blocks.0.mlp.fc1`` -> mlp); else ``other``."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embeddings"
    for part in reversed(name.lower().split(".")):
        if any(word in part for word in ATTENTION_WORDS):
            return "attention"
        if any(word in part for word in MLP_WORDS):
            return "mlp"
    return "other"

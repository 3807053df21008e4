"""Width pruning of a Llama-shaped student, Minitron-style (Muralidharan et al., 2024).

Channels are ranked by their mean activation magnitude on calibration token sequences
(the teacher's own answers to logged prompts), and the least active are cut:

- ``intermediate_size``: per layer, the MLP channels (the input of ``down_proj``,
  ``act(gate(x)) * up(x)``) with the largest mean ``|activation|`` are kept: rows of
  ``gate_proj``/``up_proj``, columns of ``down_proj``;
- ``hidden_size``: the embedding channels with the largest mean ``|output|`` of the
  RMSNorms (every layer's two and the final one, summed) are kept, across the whole model:
  columns of the embedding, of ``q/k/v_proj``, ``gate/up_proj`` and an untied head, rows of
  ``o_proj`` and ``down_proj``, entries of every norm. Attention keeps its heads
  (``head_dim`` is written into the config, so ``heads * head_dim`` may differ from the
  hidden size).

The pruned model is a plain ``transformers`` folder; knowledge distillation from the
teacher (stage 4) recovers what the cut cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

__all__ = ["PruneError", "channel_importance", "prune_width"]


class PruneError(ValueError):
    """The model cannot be pruned to the asked shape."""


def channel_importance(
    model: Any, calibration: Sequence[Sequence[int]]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Mean ``|activation|`` per MLP channel (one tensor per layer) and per hidden channel,
    over every token of ``calibration`` (token id sequences)."""
    import torch

    if not calibration:
        raise PruneError("width pruning needs at least one calibration sequence")
    layers = model.model.layers
    inter = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    hidden = torch.zeros(model.config.hidden_size)
    tokens = 0
    hooks = []

    def on_down(i: int) -> Any:
        def hook(_m: Any, args: tuple[torch.Tensor, ...]) -> None:
            inter[i].add_(args[0].detach().abs().reshape(-1, args[0].shape[-1]).sum(0))

        return hook

    def on_norm(_m: Any, _args: Any, output: torch.Tensor) -> None:
        hidden.add_(output.detach().abs().reshape(-1, output.shape[-1]).sum(0))

    for i, layer in enumerate(layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        hooks.append(layer.input_layernorm.register_forward_hook(on_norm))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
    hooks.append(model.model.norm.register_forward_hook(on_norm))
    try:
        model.eval()
        with torch.no_grad():
            for ids in calibration:
                model(input_ids=torch.tensor([list(ids)], dtype=torch.long))
                tokens += len(ids)
    finally:
        for h in hooks:
            h.remove()
    return [t / tokens for t in inter], hidden / tokens


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    import torch

    return torch.sort(torch.topk(scores, k).indices).values


def _linear(weight: torch.Tensor, rows: Any = None, cols: Any = None) -> torch.nn.Linear:
    import torch

    w = weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    lin.weight = torch.nn.Parameter(w.clone().contiguous())
    return lin


def prune_width(
    model: Any,
    calibration: Sequence[Sequence[int]],
    *,
    intermediate_size: int | None = None,
    hidden_size: int | None = None,
) -> Any:
    """Prune ``model`` (a ``LlamaForCausalLM``-shaped model, in place) to the given MLP
    and hidden widths; returns it, its config updated."""
    import torch

    cfg = model.config
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise PruneError("width pruning supports bias-free attention and MLP only")
    if intermediate_size is not None and not 1 <= intermediate_size <= cfg.intermediate_size:
        raise PruneError(
            f"intermediate_size must be in 1..{cfg.intermediate_size} (got {intermediate_size})"
        )
    if hidden_size is not None and not 1 <= hidden_size <= cfg.hidden_size:
        raise PruneError(f"hidden_size must be in 1..{cfg.hidden_size} (got {hidden_size})")
    heads = cfg.num_attention_heads
    if hidden_size is not None and hidden_size % heads:
        # The heads keep their width (head_dim goes into the config), but transformers
        # refuses to save a config whose hidden size is not a multiple of the heads.
        below, above = hidden_size // heads * heads, -(-hidden_size // heads) * heads
        near = " or ".join(str(n) for n in (below, above) if 1 <= n <= cfg.hidden_size)
        raise PruneError(
            f"hidden_size must be a multiple of the {heads} attention heads "
            f"(got {hidden_size}; nearest: {near})"
        )
    inter_scores, hidden_scores = channel_importance(model, calibration)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers = model.model.layers
    if intermediate_size is not None and intermediate_size < cfg.intermediate_size:
        for layer, scores in zip(layers, inter_scores, strict=True):
            keep = _top(scores, intermediate_size)
            mlp = layer.mlp
            mlp.gate_proj = _linear(mlp.gate_proj.weight, rows=keep)
            mlp.up_proj = _linear(mlp.up_proj.weight, rows=keep)
            mlp.down_proj = _linear(mlp.down_proj.weight, cols=keep)
        cfg.intermediate_size = intermediate_size
    if hidden_size is not None and hidden_size < cfg.hidden_size:
        keep = _top(hidden_scores, hidden_size)
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        emb = model.model.embed_tokens
        new_emb = torch.nn.Embedding(
            emb.num_embeddings, hidden_size, padding_idx=emb.padding_idx, dtype=emb.weight.dtype
        )
        new_emb.weight = torch.nn.Parameter(emb.weight.detach()[:, keep].clone().contiguous())
        model.model.embed_tokens = new_emb
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.q_proj = _linear(attn.q_proj.weight, cols=keep)
            attn.k_proj = _linear(attn.k_proj.weight, cols=keep)
            attn.v_proj = _linear(attn.v_proj.weight, cols=keep)
            attn.o_proj = _linear(attn.o_proj.weight, rows=keep)
            mlp.gate_proj = _linear(mlp.gate_proj.weight, cols=keep)
            mlp.up_proj = _linear(mlp.up_proj.weight, cols=keep)
            mlp.down_proj = _linear(mlp.down_proj.weight, rows=keep)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight = torch.nn.Parameter(norm.weight.detach()[keep].clone())
        model.model.norm.weight = torch.nn.Parameter(model.model.norm.weight.detach()[keep].clone())
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        else:
            model.lm_head = _linear(model.lm_head.weight, cols=keep)
        cfg.head_dim = head_dim
        cfg.hidden_size = hidden_size
    return model

"""Qwen3.5 / Qwen3.5-MoE for training on packed rows: the vision-language model and the text-only one.

``Qwen35ForConditionalGeneration`` has exactly transformers' ``Qwen3_5(Moe)ForConditionalGeneration`` module tree
and ``state_dict()`` keys (``model.visual.*``, ``model.language_model.*``, ``lm_head.weight``);
``Qwen35ForCausalLM`` those of the text-only ``Qwen3_5(Moe)ForCausalLM`` (``model.*``, ``lm_head.weight``). HF
weights therefore load with ``load_state_dict(strict=True)`` and export is a key copy.

The vision path is Qwen3-VL's, unchanged but for DeepStack, which Qwen3.5 does not have: the tower is
``Qwen3VLVisionModel`` with no DeepStack mergers (the same parameters as transformers' ``Qwen3_5VisionModel``),
and the vision-language model inherits ``Qwen3VLForConditionalGeneration``'s forward (embed, run the tower once
over the row's images and videos, write the merged features at the pad tokens, decoder, load-balancing loss)
including its context-parallel frame split; only the decoder (``text.TextModel``) and the init plan differ.

Generation: both models decode incrementally (``supports_cache``, ``forward(batch, cache=)``); their cache
(``new_cache``) is a ``cache.HybridCache``: keys / values of the full-attention layers, recurrent state and
convolution window of the DeltaNet layers. The vision-language model's cached forward is Qwen3-VL's (a continuation
row is text only: the tower does not run for it).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn

from rynnscale.batch import PackedBatch
from rynnscale.models.causal_lm import CausalLM, LMHead
from rynnscale.models.lora import LoRALinear, expert_lora_init_plan
from rynnscale.models.qwen3_5.args import Qwen35Args
from rynnscale.models.qwen3_5.cache import HybridCache
from rynnscale.models.qwen3_5.text import GatedDeltaNet, RMSNorm, RMSNormGated, TextModel
from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
from rynnscale.models.qwen3_vl.moe import CountsReducer, GroupedExperts, TopKRouter, load_balancing_loss
from rynnscale.models.spec import ModelOutput


class Qwen35Model(nn.Module):
    """HF's ``model`` of the vision-language variant: ``visual`` + ``language_model``."""

    def __init__(self, args: Qwen35Args, attn_backend: str = "auto", gemm_backend: str = "auto"):
        super().__init__()
        from rynnscale.models.qwen3_vl.vision import Qwen3VLVisionModel

        self.visual = Qwen3VLVisionModel(args.vision.tower_args(), attn_backend=attn_backend)
        self.language_model = TextModel(args.text, attn_backend=attn_backend, gemm_backend=gemm_backend)


def a_log_init(a_log: torch.Tensor) -> torch.Tensor:
    """transformers' ``A_log`` init: ``log(A)``, ``A ~ U(0.01, 16)`` per value head (decay rates kept away
    from 0 and from very fast)."""
    return a_log.copy_(torch.empty_like(a_log).uniform_(0.01, 16).log_())


def decoder_init_plan(lm: nn.Module, prefix: str,
                      std: float) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """transformers' init of the decoder as ``(parameter name, in-place init)`` in RNG order: normal(0, std) for
    linear / conv / embedding / router / expert weights, zero biases, zero-centred RMSNorms to 0, the DeltaNet
    output norms to 1, ``dt_bias`` to 1, ``A_log`` = log U(0.01, 16); LoRA adapters by their own plan."""
    normal = partial(nn.init.normal_, mean=0.0, std=std)
    plan: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = []
    for name, mod in lm.named_modules(prefix=prefix):
        if isinstance(mod, (nn.Linear, nn.Conv1d)):
            plan.append((f"{name}.weight", normal))
            if mod.bias is not None:
                plan.append((f"{name}.bias", nn.init.zeros_))
            if isinstance(mod, LoRALinear):
                plan += mod.init_plan(f"{name}.")
        elif isinstance(mod, (nn.Embedding, TopKRouter)):
            plan.append((f"{name}.weight", normal))
        elif isinstance(mod, GroupedExperts):
            plan += [(f"{name}.gate_up_proj", normal), (f"{name}.down_proj", normal)]
            plan += expert_lora_init_plan(mod, f"{name}.")
        elif isinstance(mod, RMSNorm):
            plan.append((f"{name}.weight", nn.init.zeros_))
        elif isinstance(mod, RMSNormGated):
            plan.append((f"{name}.weight", nn.init.ones_))
        elif isinstance(mod, GatedDeltaNet):
            plan += [(f"{name}.dt_bias", nn.init.ones_), (f"{name}.A_log", a_log_init)]
    return plan


def _check_plan(model: nn.Module, plan: list) -> list:
    uncovered = sorted({n for n, _ in model.named_parameters()} - {n for n, _ in plan})
    if uncovered:
        raise RuntimeError(f"init_plan has no rule for {len(uncovered)} parameter(s): {uncovered[:10]}")
    return plan


def moe_output(args: Qwen35Args, hidden_lh: torch.Tensor, stats: list, cp,
               counts_reducer: CountsReducer | None) -> ModelOutput:
    """``ModelOutput`` with the load-balancing loss of the MoE layers (Qwen3-VL's definition and scaling:
    ``router_aux_loss_coef * top_k * mean_l E * sum_e f_e P_e``, see ``qwen3_vl/moe.py``)."""
    if not stats:
        return ModelOutput(hidden_lh, hidden_lh.new_zeros((), dtype=torch.float32), None, cp)
    prob_mean_le = torch.stack([s.prob_mean_e for s in stats])
    counts_le = torch.stack([s.counts_e for s in stats])
    lb = load_balancing_loss(prob_mean_le, counts_le, counts_reducer)
    coef = args.text.router_aux_loss_coef * args.text.num_experts_per_tok
    return ModelOutput(hidden_lh, lb * coef, counts_le, cp)


class Qwen35ForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Dense or MoE Qwen3.5 with a vision tower (``args.vision`` set), HF's parameter names. Construction, ties,
    ``always_run_vision`` and ``forward(batch, counts_reducer=None, cache=None)`` as Qwen3-VL's (module docstring)."""

    supports_cache = True

    def __init__(self, args: Qwen35Args, attn_backend: str = "auto", gemm_backend: str = "auto"):
        CausalLM.__init__(self)
        if args.vision is None:
            raise ValueError("Qwen35ForConditionalGeneration needs vision args; a text-only model is Qwen35ForCausalLM")
        args.validate()
        self.args = args
        self.model = Qwen35Model(args, attn_backend, gemm_backend)
        self.lm_head = LMHead(args.text.hidden_size, args.text.vocab_size)
        self.tie_weights()

    def init_plan(self, std: float = 0.02) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """The decoder's plan (``decoder_init_plan``), the untied ``lm_head``, then the vision tower's; raises
        naming any parameter no rule covers."""
        plan = decoder_init_plan(self.model.language_model, "model.language_model", std)
        if self.lm_head.weight is not self.model.language_model.embed_tokens.weight:
            plan.append(("lm_head.weight", partial(nn.init.normal_, mean=0.0, std=std)))
        plan += self.model.visual.init_plan(std, prefix="model.visual.")
        return _check_plan(self, plan)

    def new_cache(self, batch_size: int, capacity: int) -> HybridCache:
        """An empty generation cache (module docstring) of ``batch_size`` sequences of up to ``capacity`` tokens."""
        return HybridCache(self.args.text.layer_types, batch_size, capacity)


class Qwen35ForCausalLM(CausalLM):
    """Text-only Qwen3.5 / Qwen3.5-MoE (transformers' ``Qwen3_5(Moe)ForCausalLM``: ``model.*`` + ``lm_head``)."""

    supports_cache = True

    def __init__(self, args: Qwen35Args, attn_backend: str = "auto", gemm_backend: str = "auto"):
        super().__init__()
        if args.vision is not None:
            raise ValueError("Qwen35ForCausalLM is the text-only model; args with vision build "
                             "Qwen35ForConditionalGeneration")
        args.validate()
        self.args = args
        self.model = TextModel(args.text, attn_backend=attn_backend, gemm_backend=gemm_backend)
        self.lm_head = LMHead(args.text.hidden_size, args.text.vocab_size)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def init_plan(self, std: float = 0.02) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        plan = decoder_init_plan(self.model, "model", std)
        if self.lm_head.weight is not self.model.embed_tokens.weight:
            plan.append(("lm_head.weight", partial(nn.init.normal_, mean=0.0, std=std)))
        return _check_plan(self, plan)

    def new_cache(self, batch_size: int, capacity: int) -> HybridCache:
        return HybridCache(self.args.text.layer_types, batch_size, capacity)

    def forward(self, batch: PackedBatch, counts_reducer: CountsReducer | None = None,
                cache: HybridCache | None = None) -> ModelOutput:
        """``cache`` (generation): the row's documents continue the cache's sequences (module docstring)."""
        for name in ("pixel_values", "pixel_values_videos"):
            if getattr(batch, name) is not None:
                raise ValueError(f"PackedBatch has {name} but {self.args.model_type} is a text-only model")
        if cache is not None:
            hidden_lh, stats = self.model(self.model.embed_tokens(batch.input_ids_l), batch.position_ids_3l,
                                          batch.cu_seqlens, batch.max_seqlen, cache=cache)
            return moe_output(self.args, hidden_lh, stats, None, counts_reducer)
        cp = self.cp_shard(batch)
        if cp is None:
            hidden_lh, stats = self.model(self.model.embed_tokens(batch.input_ids_l), batch.position_ids_3l,
                                          batch.cu_seqlens, batch.max_seqlen)
        else:
            hidden_lh, stats = self.model(self.model.embed_tokens(cp.shard(batch.input_ids_l)),
                                          cp.shard(batch.position_ids_3l, dim=1), cp.plan.cu_seqlens,
                                          cp.plan.max_seqlen, cp=cp)
        return moe_output(self.args, hidden_lh, stats, cp, counts_reducer)


def new_model(args: Qwen35Args, attn_backend: str = "auto", gemm_backend: str = "auto") -> CausalLM:
    """The model class of ``args`` (vision-language or text-only)."""
    cls = Qwen35ForCausalLM if args.vision is None else Qwen35ForConditionalGeneration
    return cls(args, attn_backend=attn_backend, gemm_backend=gemm_backend)


__all__ = ["Qwen35ForCausalLM", "Qwen35ForConditionalGeneration", "a_log_init", "new_model"]

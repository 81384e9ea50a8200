"""The model seam: what a model family gives the rest of the code (``ModelSpec``), and the contracts its
pieces follow. Everything outside ``rynnscale/models/`` asks the registry (``rynnscale.models``) for a
family's spec and never imports a family's package; ``docs/model_families.md`` says how to add one.

A family is keyed by the ``model_type`` values of its transformers ``config.json``. Its spec holds (the
callables may import the family's torch modules on first use, so that resolving a recipe stays fast):
- arguments: ``args_from_hf_config`` (a config.json dict -> the family's args object) and ``presets``
  (published architectures as config.json dicts, for planning without weights);
- ``new_model(args, attn_backend=...)`` (called on the meta device by ``rynnscale.train.build``) and its
  ``parallelize`` plan (EP, CP, activation checkpointing, compile, FSDP2 units);
- ``state_dict``: the Hugging Face tensor layout (``StateDictAdapter``) used by import, export and PEFT;
- ``step_flops``: model FLOPs of a packed step (MFU, planner), and ``cost_coefficients``: the data path's
  per-sample cost model (rank balancing) from the same FLOP ratios;
- ``data``: what the data path needs (``DataContract``: vision token ids, patch geometry, position ids);
- ``is_experts(module)``: whether a module holds fused experts (LoRA, statistics);
- ``profile_parts()``: the module classes of the step-time breakdown;
- optionally ``layer_activation_bytes`` / ``layer_backward_bytes``: the planner's per-layer activation terms for
  layers that are not Qwen3-VL-shaped (e.g. Qwen3.5's linear-attention layers and their chunk states), and
  ``cp_layer_bytes`` / ``cp_layer_traffic``: what such a layer costs under context parallelism when it does not
  split its attention heads or pass k/v around (Qwen3.5's DeltaNet state scan).

Args objects are the family's own dataclasses, named after transformers' config keys. The generic code
reads only what ``ModelArgs`` lists; models follow ``TrainableModel``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # light at run time: recipe validation resolves architectures without importing torch
    import torch
    from torch import nn

    from rynnscale.parallel.context_parallel import CPShard


class ArchConfigError(ValueError):
    """An architecture description is invalid; the message names the key."""


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint directory is unusable; the message names the file / tensors."""


@dataclass
class ModelOutput:
    """What a model's ``forward(batch)`` returns. ``hidden_ld`` [L, H] final-normed hidden states;
    ``aux_loss`` 0-dim auxiliary loss (MoE load balancing, already scaled by its coefficient; 0 for dense);
    ``expert_counts`` [n_moe_layers, E] int64 local routing counts (detached) or None;
    ``cp``: under context parallelism, the shard of the row that ``hidden_ld`` holds."""

    hidden_ld: torch.Tensor
    aux_loss: torch.Tensor
    expert_counts: torch.Tensor | None = None
    cp: CPShard | None = None


class TextShape(Protocol):
    """The decoder sizes generic code reads (transformers' ``text_config`` key names)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int              # 0: dense
    num_experts_per_tok: int

    @property
    def is_moe(self) -> bool: ...


class ModelArgs(Protocol):
    """A family's architecture arguments, as generic code sees them."""

    text: TextShape
    vision: Any                   # the vision tower's sizes, or None for a text-only family
    tie_word_embeddings: bool

    def to_hf_config(self) -> dict[str, Any]: ...

    def validate(self, where: str = "config") -> None: ...


class TrainableModel(Protocol):
    """What the build path, the step, evaluation and the statistics call on a model.

    ``forward(batch: PackedBatch, counts_reducer=None) -> ModelOutput`` runs one packed row;
    ``loss_sum(batch, output, chunk_tokens)`` is the summed next-token cross-entropy of the row;
    ``logits(hidden_ld)`` full logits (evaluation, generation). Meta-device construction then
    ``to_empty`` (which re-ties tied embeddings) and ``init_weights(seed, select=...)`` drawing
    ``init_plan()`` in the single-process order."""

    args: Any
    lm_head: nn.Module
    always_run_vision: bool

    def set_kernels(self, kernels: str) -> int: ...

    def tie_weights(self) -> None: ...

    def input_embeddings(self) -> nn.Embedding: ...

    def decoder_layers(self) -> nn.ModuleList: ...

    def vision_tower(self) -> nn.Module | None: ...

    def vision_blocks(self) -> nn.ModuleList: ...

    def activation_checkpoint_targets(self) -> list[nn.ModuleList]: ...

    def init_plan(self, std: float = 0.02) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]: ...

    def init_weights(self, seed: int = 0, std: float = 0.02, *, fill=None, select=None) -> None: ...


@dataclass(frozen=True)
class VisionGeometry:
    """How images and videos become patches for this model (the processor's patching settings)."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int


#: (input_ids_l [L], image_grid_thw [N, 3] | None, video_grid_thw [M, 3] | None) -> position ids [3, L]
PositionIdsFn = Callable[..., "torch.Tensor"]


@dataclass(frozen=True)
class DataContract:
    """What the data path needs of a model: the ids of its vision placeholder tokens, the patch geometry
    (``vision`` None: a text-only model, samples with media are refused) and the position ids of one
    encoded sample (always [3, L]: three equal rows for a model with plain 1-D positions). ``chat_template``:
    which chat template a conversation is rendered with (``rynnscale.data.encode.CHAT_TEMPLATES``)."""

    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    vision: VisionGeometry | None
    position_ids: PositionIdsFn
    chat_template: str = "qwen3_vl"


@dataclass(frozen=True)
class StateDictAdapter:
    """A family's Hugging Face tensor layout. Our models use transformers' parameter names, so import and
    export are a key mapping plus validation:

    - ``param_shapes(args, include_tied)``: every tensor of the HF state dict -> shape (the contract export
      and import validate against; experts in transformers 5's layout);
    - ``canonical_key(key)``: a checkpoint key (prefix variants transformers accepts) -> our name, or None for a
      tensor the family skips on purpose (e.g. a head transformers does not build either);
    - ``expert_kind(name)``: "gate_up" / "down" for a fused expert tensor (stored transposed by older
      checkpoints: ``rynnscale.checkpoint.hf``), else None;
    - ``embed_key`` / ``lm_head_key``: the tensors a tied embedding shares;
    - ``export_layouts``: the expert layouts an export may write for this family (``rynnscale.checkpoint.hf``),
      the first the default: the one transformers' ``save_pretrained`` writes for it ("hub", transposed, is a
      Qwen3-VL-MoE notion: transformers converts it for ``qwen3_vl_moe`` only; "per_expert" is Qwen3.5-MoE's)."""

    param_shapes: Callable[..., dict[str, tuple[int, ...]]]
    canonical_key: Callable[[str], str | None]
    expert_kind: Callable[[str], str | None]
    embed_key: str
    lm_head_key: str = "lm_head.weight"
    export_layouts: tuple[str, ...] = ("v5",)


@dataclass(frozen=True)
class ProfilePart:
    """A module class whose calls count as step-time breakdown part ``part``; ``close_on`` names a child
    whose output's gradient ends the part's backward (a tower whose input needs no gradient)."""

    module: type
    part: str
    close_on: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Everything the rest of rynnscale needs from one model family (module docstring)."""

    name: str
    model_types: tuple[str, ...]
    args_cls: type
    args_from_hf_config: Callable[..., Any]          # (cfg dict, strict=False, where="config") -> args
    new_model: Callable[..., nn.Module]              # (args, attn_backend="auto") -> model (build on meta)
    parallelize: Callable[..., nn.Module]            # (model, meshes | None, **plan options) -> model
    state_dict: StateDictAdapter
    step_flops: Callable[..., Any]                   # (args, ParamStats, doc_lens, grid_thw=None, loss_tokens=None)
    cost_coefficients: Callable[[Any], tuple[float, float, float]]   # args -> (a, b, c): balancing cost per sample
    data: Callable[[Any], DataContract]
    is_experts: Callable[[nn.Module], bool] = lambda module: False
    profile_parts: Callable[[], tuple[ProfilePart, ...]] = tuple
    presets: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    published_params: Mapping[str, dict[str, float]] = field(default_factory=dict)
    # the planner's activation terms where a family's layers differ from Qwen3-VL's (None: the planner's own
    # count): (args, layer_idx, profile, ep, tokens, doc_tokens) -> bytes decoder layer ``layer_idx`` saves for
    # backward over ``tokens`` tokens; (args, layer_idx, profile, tokens, doc_tokens) -> extra transient bytes
    # of that layer's backward
    layer_activation_bytes: Callable[..., float] | None = None
    layer_backward_bytes: Callable[..., float] | None = None
    # under context parallelism (None, or a callable returning None for a layer: the planner's Ulysses / ring count):
    # (args, layer_idx, profile, cp, row_tokens, doc_tokens) -> (saved, backward transient) bytes the layer adds on
    # the busiest rank beyond the two terms above over its row_tokens / cp tokens; (args, layer_idx, cp, row_tokens,
    # doc_tokens, recompute) -> bytes one rank sends for the layer per micro-batch
    cp_layer_bytes: Callable[..., tuple[float, float] | None] | None = None
    cp_layer_traffic: Callable[..., float | None] | None = None
    # model_type -> config.json keys ("text_config.rope_theta"; text-only types: top level) whose default differs
    # between transformers and our args: a checkpoint's config.json lacking one would give two different models,
    # so ``registry.read_hf_config`` refuses it (recipes' inline architectures keep our defaults)
    hf_keys_without_shared_default: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

"""LoRA: low-rank updates of frozen weights, for ``nn.Linear`` layers and for fused 3-D expert tensors.

- ``LoRALinear`` is an ``nn.Linear`` (same ``weight`` / ``bias`` keys, so Hugging Face loading and
  checkpoint keys are unchanged) with ``lora_A`` [r, in] and ``lora_B`` [out, r]:
  ``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T``.
- Experts (``GroupedExperts``): per expert ``e`` and fused tensor ``W [E, out, in]`` (``gate_up_proj``,
  ``down_proj``), ``{name}_lora_A [E, r, in]`` and ``{name}_lora_B [E, out, r]``; the update runs as two
  extra grouped GEMMs over the same expert offsets (never an ``[E, out, in]`` delta), and dim 0 is the
  expert, so expert parallelism and FSDP2 split the adapters with their experts.

At init ``B = 0``: a model with fresh adapters computes exactly (bitwise) what the base computes. Inside
``adapters_disabled(model)`` every adapter is skipped: the model computes its frozen base (GRPO's reference
policy of a LoRA run, with no second copy of the weights).
Adapter tensors are always named ``*lora_A`` / ``*lora_B`` (``is_adapter_param``); the PEFT export
(``rynnscale.checkpoint.adapter``) maps them to peft's keys.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from rynnscale.ops.grouped_gemm import grouped_mm

log = logging.getLogger(__name__)

#: default ``model.lora.targets``: attention q/k/v/o and dense MLP projections of the language model
DEFAULT_TARGETS = ("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.o_proj",
                   "*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj")
#: with ``model.lora.vision``: every vision block's attention and MLP projections
VISION_TARGETS = ("model.visual.blocks.*.attn.qkv", "model.visual.blocks.*.attn.proj",
                  "model.visual.blocks.*.mlp.linear_fc1", "model.visual.blocks.*.mlp.linear_fc2")
VISION_PREFIX = "model.visual."


@dataclass(frozen=True)
class LoRASpec:
    """What gets adapters. ``targets``: fnmatch patterns over module names (HF names); modules under
    ``model.visual.`` are adapted only with ``vision``; ``experts``: every MoE layer's fused experts."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    experts: bool = False
    vision: bool = False
    trainable: tuple[str, ...] = field(default=())   # parameter-name patterns that stay fully trainable

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def wants_linear(self, name: str) -> bool:
        if name.startswith(VISION_PREFIX):
            if not self.vision:
                return False
            return any(fnmatch.fnmatchcase(name, p) for p in (*self.targets, *VISION_TARGETS))
        return any(fnmatch.fnmatchcase(name, p) for p in self.targets)


def is_adapter_param(name: str) -> bool:
    """A LoRA factor's parameter name (``...lora_A`` / ``...lora_B``, e.g. ``q_proj.lora_A``,
    ``experts.gate_up_proj_lora_B``)."""
    return name.endswith(("lora_A", "lora_B"))


def _init_a(fan_in: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``A`` ~ U(-1/sqrt(in), 1/sqrt(in)): peft's default (kaiming-uniform with a = sqrt(5)) per expert."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda t: nn.init.uniform_(t, -bound, bound)


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update (module docstring). Built from an existing ``nn.Linear`` whose
    parameters it takes over (``from_linear``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.scaling, self.dropout = rank, alpha / rank, dropout
        self.lora_enabled = True   # adapters_disabled() turns it off
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=torch.float32))

    @classmethod
    def from_linear(cls, base: nn.Linear, spec: LoRASpec) -> LoRALinear:
        m = cls(base.in_features, base.out_features, base.bias is not None, spec.rank, spec.alpha, spec.dropout,
                device=base.weight.device, dtype=base.weight.dtype)
        m.weight = base.weight
        if base.bias is not None:
            m.bias = base.bias
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if not self.lora_enabled:
            return y
        x_in = F.dropout(x, self.dropout, self.training) if self.dropout else x
        a, b = self.lora_A.to(x_in.dtype), self.lora_B.to(x_in.dtype)
        return y + self.scaling * F.linear(F.linear(x_in, a), b)

    def init_plan(self, prefix: str) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        return [(f"{prefix}lora_A", _init_a(self.in_features)), (f"{prefix}lora_B", nn.init.zeros_)]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.rank}, lora_scaling={self.scaling:g}"


class ExpertLoRA:
    """LoRA factors of the fused expert tensors of one experts module (attached by ``add_expert_lora``).

    ``project(experts, name, x_sorted_tk, offsets_e) -> [T, out]``: the base grouped GEMM plus the
    low-rank update over the same expert groups."""

    def __init__(self, names: Sequence[str], rank: int, alpha: float):
        self.names, self.rank, self.scaling = tuple(names), rank, alpha / rank
        self.enabled = True   # adapters_disabled() turns it off

    def project(self, experts: nn.Module, name: str, x_tk: torch.Tensor, offsets_e: torch.Tensor,
                backend: str) -> torch.Tensor:
        y = grouped_mm(x_tk, getattr(experts, name), offsets_e, backend=backend)
        if name not in self.names or not self.enabled:
            return y
        a = getattr(experts, f"{name}_lora_A").to(x_tk.dtype)    # [E, r, in]
        b = getattr(experts, f"{name}_lora_B").to(x_tk.dtype)    # [E, out, r]
        t_tr = grouped_mm(x_tk, a, offsets_e, backend=backend)
        return y + self.scaling * grouped_mm(t_tr, b, offsets_e, backend=backend)


def add_expert_lora(experts: nn.Module, spec: LoRASpec, names: Sequence[str] = ("gate_up_proj", "down_proj")) -> None:
    """Attach ``{name}_lora_A [E, r, in]`` / ``{name}_lora_B [E, out, r]`` (fp32) for each fused expert
    tensor ``name`` [E, out, in], on its device (meta included), before any EP / FSDP sharding."""
    for name in names:
        w = getattr(experts, name)
        E, out_f, in_f = w.shape
        experts.register_parameter(f"{name}_lora_A", nn.Parameter(
            torch.empty(E, spec.rank, in_f, device=w.device, dtype=torch.float32)))
        experts.register_parameter(f"{name}_lora_B", nn.Parameter(
            torch.empty(E, out_f, spec.rank, device=w.device, dtype=torch.float32)))
    experts.lora = ExpertLoRA(names, spec.rank, spec.alpha)


def expert_lora_init_plan(experts: nn.Module, prefix: str) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    lora = getattr(experts, "lora", None)
    if lora is None:
        return []
    plan = []
    for name in lora.names:
        in_f = getattr(experts, name).shape[-1]
        plan += [(f"{prefix}{name}_lora_A", _init_a(in_f)), (f"{prefix}{name}_lora_B", nn.init.zeros_)]
    return plan


def apply_lora(model: nn.Module, spec: LoRASpec, experts_of: Callable[[nn.Module], bool]) -> list[str]:
    """Give the targeted modules of ``model`` (before checkpointing / sharding; meta is fine) their
    adapters and freeze everything else except ``spec.trainable`` patterns. ``experts_of(module)`` says
    whether a module holds fused experts. Returns the adapted module names; raises naming the patterns
    when nothing matches (a typo must not silently train nothing)."""
    if spec.rank < 1:
        raise ValueError(f"model.lora.rank={spec.rank} must be >= 1")
    adapted: list[str] = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and spec.wants_linear(full):
                setattr(module, child_name, LoRALinear.from_linear(child, spec))
                adapted.append(full)
            elif spec.experts and experts_of(child) and (spec.vision or not full.startswith(VISION_PREFIX)):
                add_expert_lora(child, spec)
                adapted.append(full)
    if not adapted:
        raise ValueError(f"model.lora: no module matches targets {list(spec.targets)}"
                         f"{' (experts on)' if spec.experts else ''}; module names look like "
                         "'model.language_model.layers.0.self_attn.q_proj'")
    adapted_linear = [n for n in adapted if isinstance(model.get_submodule(n), LoRALinear)]
    _check_targets(model, spec, adapted_linear)
    _warn_ignored_options(spec, adapted_linear, len(adapted) - len(adapted_linear))
    _warn_unadapted_layers(model, adapted)
    # every name of a parameter counts: a tied lm_head.weight is the embedding's parameter under a second name
    names_of: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), (p, []))[1].append(pname)
    matched: set[str] = set()
    for p, names in names_of.values():
        hits = {pat for pat in spec.trainable if any(fnmatch.fnmatchcase(n, pat) for n in names)}
        matched |= hits
        p.requires_grad_(any(is_adapter_param(n) for n in names) or bool(hits))
    unmatched = [pat for pat in spec.trainable if pat not in matched]
    if unmatched:
        raise ValueError(f"model.lora.trainable: {unmatched} match(es) no parameter; names look like "
                         "'model.language_model.norm.weight' or 'lm_head.weight'")
    return adapted


def _warn_ignored_options(spec: LoRASpec, adapted_linear: Sequence[str], adapted_experts: int) -> None:
    """Options that this model gives nothing to act on are said so, not silently dropped: ``experts`` on a model
    without MoE experts, ``dropout`` when only expert adapters exist (they take none)."""
    if spec.experts and not adapted_experts:
        log.warning("model.lora.experts: true, but this model has no MoE experts (a dense model): no expert "
                    "adapters are added")
    if spec.dropout and not adapted_linear:
        log.warning("model.lora.dropout=%g has no effect: it applies to the Linear adapters and this run adapts only "
                    "fused experts, which take no dropout", spec.dropout)


_DECODER_LAYER = re.compile(r"^(?!model\.visual\.)(.*\.layers\.(\d+))\.")


def _warn_unadapted_layers(model: nn.Module, adapted: Sequence[str]) -> None:
    """Decoder layers that get no adapter at all while others do are warned of, naming their projections: on a hybrid
    decoder the targets may name only one kind of layer (Qwen3.5-MoE under the default targets: the full-attention
    layers' q/k/v/o, one layer in four; its DeltaNet layers hold ``linear_attn.*`` and its MLP is experts)."""
    def layer_of(name: str) -> tuple[int, str] | None:
        m = _DECODER_LAYER.match(name)
        return (int(m.group(2)), m.group(1)) if m else None

    linears = [(layer_of(n), n) for n, m in model.named_modules() if isinstance(m, nn.Linear) and layer_of(n)]
    got = {layer_of(n) for n in adapted} - {None}
    missing = sorted({lay for lay, _ in linears} - got)
    if not got or not missing:
        return
    first = missing[0][1]
    names = [n.removeprefix(first + ".") for lay, n in linears if lay == missing[0]]
    log.warning("model.lora: %d of %d decoder layers get no adapter (%s%s): their projections (%s%s) match no "
                "model.lora.targets pattern; add patterns such as '*.%s' to adapt them", len(missing),
                len(missing) + len(got), first, ", ..." if len(missing) > 1 else "", ", ".join(names[:4]),
                ", ..." if len(names) > 4 else "", names[0])


def _check_targets(model: nn.Module, spec: LoRASpec, adapted_linear: Sequence[str]) -> None:
    """Every ``spec.targets`` pattern must adapt something: one that matches modules LoRA cannot adapt (not an
    ``nn.Linear``, e.g. ``lm_head`` or fused experts; a vision module without ``spec.vision``) is an error saying
    what to do instead; one that matches no module at all is warned of (a typo, or a recipe's pattern for another
    layout of the family: dense vs MoE) unless it is a default target."""
    modules = dict(model.named_modules())
    for pat in spec.targets:
        if any(fnmatch.fnmatchcase(n, pat) for n in adapted_linear):
            continue
        hits = [n for n in modules if n and fnmatch.fnmatchcase(n, pat)]
        if not hits:
            if pat not in DEFAULT_TARGETS:
                log.warning("model.lora.targets pattern %r matches no module of this model, so nothing is adapted "
                            "for it (a typo, or a pattern for another layout of the family, dense vs MoE? module names "
                            "look like 'model.language_model.layers.0.self_attn.q_proj')", pat)
            continue
        vision = [n for n in hits if n.startswith(VISION_PREFIX) and type(modules[n]) is nn.Linear]
        if vision and not spec.vision:
            raise ValueError(f"model.lora.targets pattern {pat!r} matches vision modules ({vision[0]}, ...), which "
                             "are adapted only with model.lora.vision: true")
        kinds = sorted({f"{n} ({type(modules[n]).__name__})" for n in hits})
        raise ValueError(f"model.lora.targets pattern {pat!r} matches {', '.join(kinds[:3])}"
                         f"{', ...' if len(kinds) > 3 else ''}: LoRA adapts nn.Linear modules only (fused MoE experts: "
                         "model.lora.experts: true; to train a tensor such as the head fully: model.lora.trainable, "
                         "e.g. ['lm_head.weight'])")


def frozen_adapters(model: nn.Module, spec: LoRASpec) -> tuple[list[str], list[str]]:
    """Adapters that do not train (``requires_grad`` off on both factors, e.g. by ``model.freeze`` after
    ``apply_lora``; with ``B = 0`` at init they never change the model): ``(options, frozen)``, the ``model.lora``
    options ALL of whose adapters are frozen (the option then does nothing) and every frozen adapter, named by its
    ``lora_A`` parameter."""
    trains: dict[str, bool] = {}
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            unit = name[:-1] + "A"
            trains[unit] = trains.get(unit, False) or p.requires_grad
    frozen = [u for u, t in trains.items() if not t]

    def all_frozen(units: list[str]) -> bool:
        return bool(units) and not any(trains[u] for u in units)

    options = []
    if spec.vision and all_frozen([u for u in trains if u.startswith(VISION_PREFIX)]):
        options.append("model.lora.vision")
    if spec.experts and all_frozen([u for u in trains if u.endswith("_lora_A")]):
        options.append("model.lora.experts")
    for pat in spec.targets:
        if all_frozen([u for u in trains if u.endswith(".lora_A") and fnmatch.fnmatchcase(u[:-len(".lora_A")], pat)]):
            options.append(f"model.lora.targets pattern {pat!r}")
    return options, frozen


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[int]:
    """Within the block every LoRA adapter of ``model`` is skipped (the base model's function); yields how many
    adapted modules were switched off (0: the model has none)."""
    switched = []
    for m in model.modules():
        if isinstance(m, LoRALinear) and m.lora_enabled:
            m.lora_enabled = False
            switched.append(m)
        lora = getattr(m, "lora", None)
        if isinstance(lora, ExpertLoRA) and lora.enabled:
            lora.enabled = False
            switched.append(lora)
    try:
        yield len(switched)
    finally:
        for m in switched:
            if isinstance(m, LoRALinear):
                m.lora_enabled = True
            else:
                m.enabled = True


def lora_spec_of(model: nn.Module) -> LoRASpec | None:
    return getattr(model, "lora_spec", None)


def lora_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``B A`` in fp32 (not yet scaled): [out, in] for a Linear's factors, [E, out, in] for experts'."""
    a, b = a.float(), b.float()
    return b @ a if a.dim() == 2 else torch.bmm(b, a)


@torch.no_grad()
def merge_lora_state(state: dict[str, torch.Tensor], spec: LoRASpec) -> dict[str, torch.Tensor]:
    """Full (unsharded) HF-named state with adapters -> the merged base state: ``W + (alpha/r) B A`` per
    adapted weight (experts per expert), adapter entries dropped, dtypes of the base kept."""
    out = {k: v for k, v in state.items() if not is_adapter_param(k)}
    for key in state:
        if not key.endswith("lora_A"):
            continue
        # Linear: prefix.lora_A -> prefix.weight; experts: prefix.{name}_lora_A -> prefix.{name}
        base = key[: -len(".lora_A")] + ".weight" if key.endswith(".lora_A") else key[: -len("_lora_A")]
        w = out[base]
        out[base] = (w.float() + spec.scaling * lora_delta(state[key], state[key[:-1] + "B"])).to(w.dtype)
    return out

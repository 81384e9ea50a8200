"""Architecture hyper-parameters of Qwen3.5 (dense and MoE; vision-language or text-only).

Field names are transformers' ``config.json`` keys (``Qwen3_5Config`` / ``Qwen3_5MoeConfig``: ``text_config`` +
``vision_config``; ``Qwen3_5TextConfig`` / ``Qwen3_5MoeTextConfig``: the text keys at the top level), so a
recipe's inline architecture, a checkpoint's config.json and our export are one document. Four ``model_type``
values map here: ``qwen3_5`` / ``qwen3_5_moe`` (vision-language, RynnBrain 1.1's layout) and ``qwen3_5_text`` /
``qwen3_5_moe_text`` (text-only ``Qwen3_5ForCausalLM``: ``Qwen35TextArgs``). ``from_hf_config`` reads one
(``strict``: unknown keys are errors naming the key) and ``to_hf_config`` writes one that
``transformers.AutoConfig`` loads.

What differs from Qwen3-VL's arguments: ``layer_types`` (``linear_attention`` = Gated DeltaNet, ``full_attention``
= gated softmax attention), the ``linear_*`` sizes of the DeltaNet layers, ``partial_rotary_factor`` (rotary on
the first quarter of each head), MoE in every layer with a shared expert (``shared_expert_intermediate_size``)
and always-renormalised top-k, and a vision tower without DeepStack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rynnscale.models.hf_config import read_rope, read_tie
from rynnscale.models.spec import ArchConfigError

MODEL_TYPES = ("qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text")
LAYER_TYPES = ("linear_attention", "full_attention")

# Keys transformers writes into every config that carry no architecture information we use.
# ``mtp_*``: the released checkpoints' multi-token-prediction head, which transformers does not build either
# (its ``mtp.*`` tensors are skipped on load, ``state_dict.canonical_key``).
_HF_BOOKKEEPING = {
    "architectures", "output_hidden_states", "return_dict", "dtype", "torch_dtype", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "_name_or_path", "model_type",
    "output_attentions", "transformers_version", "initializer_range", "use_cache", "attention_dropout",
    "pad_token_id", "bos_token_id", "eos_token_id", "output_router_logits", "tokenizer_class",
    "_attn_implementation_autoset", "quantization_config", "rope_parameters", "rope_scaling",
    "mtp_num_hidden_layers", "mtp_use_dedicated_embeddings", "full_attention_interval", "attn_output_gate",
    "rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved",
    "mamba_ssm_dtype",   # vLLM's state dtype hint in the released configs (serving only)
}
# the vision tower's rope (axial, theta 10000) is fixed by the tower; its other keys are bookkeeping
# ``deepstack_visual_indexes``: the released configs write ``[]`` (checked: DeepStack is not supported)
_VISION_BOOKKEEPING = ((_HF_BOOKKEEPING - {"mrope_section", "partial_rotary_factor", "rope_theta"})
                       | {"rope_parameters", "deepstack_visual_indexes"})

# Documented maxima (far above any published model; refused before allocation so that an absurd config.json
# fails naming the key instead of an out-of-memory kill). Same bounds as Qwen3-VL's where the key is shared.
MAX_TEXT_SIZES = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 20,
                  "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
                  "head_dim": 1024, "num_experts": 4096, "moe_intermediate_size": 1 << 18,
                  "shared_expert_intermediate_size": 1 << 20, "linear_conv_kernel_dim": 64,
                  "linear_key_head_dim": 1024, "linear_value_head_dim": 1024, "linear_num_key_heads": 1024,
                  "linear_num_value_heads": 1024}
MAX_VISION_SIZES = {"depth": 1024, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "num_heads": 1024,
                    "patch_size": 1024, "num_position_embeddings": 1 << 22}
MAX_PARAMS = 2 * 10**12
VISION_ROPE_THETA = 10_000.0
# config.json keys whose transformers default (Qwen3_5MoeTextConfig, 5.25) differs from ours: a checkpoint must set
# them (ModelSpec.hf_keys_without_shared_default); the dense types' defaults agree
_MOE_SIZES = ("hidden_size", "num_hidden_layers", "num_key_value_heads")
HF_KEYS_WITHOUT_SHARED_DEFAULT = {"qwen3_5_moe": tuple("text_config." + k for k in _MOE_SIZES),
                                  "qwen3_5_moe_text": _MOE_SIZES}


def default_layer_types(num_layers: int, interval: int = 4) -> list[str]:
    """transformers' default hybrid pattern: every ``interval``-th layer full attention, the rest DeltaNet."""
    return ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(num_layers)]


@dataclass
class TextArgs:
    """The decoder (``text_config``). ``num_experts == 0``: dense (``qwen3_5``), every layer a SwiGLU MLP of
    ``intermediate_size``; else every layer a routed MoE + shared expert (``qwen3_5_moe``)."""

    vocab_size: int = 248320
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: list[int] = field(default_factory=lambda: [11, 11, 10])
    layer_types: list[str] = field(default_factory=list)   # empty: default_layer_types(num_hidden_layers)
    # Gated DeltaNet (linear attention)
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    # MoE (0 experts: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    router_aux_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = default_layer_types(self.num_hidden_layers)

    # what the generic code and the shared MoE pieces read
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def norm_topk_prob(self) -> bool:
        """Qwen3.5's router always renormalises the top-k probabilities (no config key)."""
        return True

    def layer_is_moe(self, layer_idx: int) -> bool:
        return self.is_moe

    def is_linear(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] == "linear_attention"

    @property
    def num_linear_layers(self) -> int:
        return sum(t == "linear_attention" for t in self.layer_types)

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each attention head that are rotated (transformers: ``int(head_dim * factor)``)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        """Channels of the depthwise convolution: q, k and v of the DeltaNet layer."""
        return 2 * self.linear_key_dim + self.linear_value_dim


@dataclass
class VisionArgs:
    """The vision tower (``vision_config``): Qwen3-VL's ViT without DeepStack mergers."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304

    def tower_args(self) -> Any:
        """The Qwen3-VL tower's args with no DeepStack layers: the same module tree, names and function."""
        from rynnscale.models.qwen3_vl.args import VisionArgs as Qwen3VLVisionArgs

        return Qwen3VLVisionArgs(**dataclasses.asdict(self), deepstack_visual_indexes=[])


@dataclass
class _Qwen35ArgsBase:
    """What both layouts share; the concrete classes are ``Qwen35Args`` (vision-language, ``model.language_model.*``)
    and ``Qwen35TextArgs`` (text-only ``Qwen3_5(Moe)ForCausalLM``, ``model.*``): siblings, so that the registry
    tells their families (and tensor layouts) apart by the args' class."""

    text: TextArgs = field(default_factory=TextArgs)
    vision: VisionArgs | None = None
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    tie_word_embeddings: bool = False

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()

    @property
    def model_type(self) -> str:
        moe = "_moe" if self.text.is_moe else ""
        return f"qwen3_5{moe}" if self.vision is not None else f"qwen3_5{moe}_text"

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], strict: bool = False, where: str = "config") -> Any:
        """Build from a transformers Qwen3.5 config dict of one of ``cls.MODEL_TYPES``. ``strict`` rejects keys that
        are neither ours nor HF bookkeeping (recipes, where an unknown key is almost always a typo)."""
        if not isinstance(cfg, dict):
            raise ArchConfigError(f"{where}: expected a mapping in config.json form, got {type(cfg).__name__}")
        cfg = dict(cfg)
        model_type = str(cfg.get("model_type", cls.MODEL_TYPES[0]))
        if model_type not in cls.MODEL_TYPES:
            raise ArchConfigError(f"{where}.model_type={model_type!r}: {cls.__name__} reads {cls.MODEL_TYPES}")
        text_only = model_type.endswith("_text")
        if text_only:
            for key in ("text_config", "vision_config"):
                if key in cfg:
                    raise ArchConfigError(f"{where}.{key}: a {model_type} (text-only) config has its text keys at "
                                          f"the top level and no {key}; use model_type "
                                          f"{model_type.removesuffix('_text')!r} for the vision-language model")
            text_cfg = {k: v for k, v in cfg.items() if k not in ("tie_word_embeddings",)}
            vision_cfg = None
            top: dict[str, Any] = {}
        else:
            text_cfg = dict(cfg.pop("text_config", {}) or {})
            vision_cfg = dict(cfg.pop("vision_config", {}) or {})
            top = {k: v for k, v in cfg.items() if k not in _HF_BOOKKEEPING}
        text_where = where if text_only else f"{where}.text_config"
        read_rope(text_cfg, text_where, "Qwen3.5", ("rope_theta", "partial_rotary_factor", "mrope_section"))
        if "full_attention_interval" in text_cfg and "layer_types" not in text_cfg:
            interval = text_cfg["full_attention_interval"]
            if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
                raise ArchConfigError(f"{text_where}.full_attention_interval={interval!r} must be a positive int")
            text_cfg["layer_types"] = default_layer_types(int(text_cfg.get("num_hidden_layers", 32)), interval)
        if text_cfg.get("attn_output_gate", True) is not True:
            raise ArchConfigError(f"{text_where}.attn_output_gate={text_cfg['attn_output_gate']!r} is not supported: "
                                  "Qwen3.5's full-attention layers always gate their output (transformers too)")
        moe = "moe" in model_type
        if not moe:  # dense checkpoints carry no MoE keys; a stray one would change the model silently
            stray = sorted(k for k in ("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size")
                           if k in text_cfg)
            if stray and strict:
                raise ArchConfigError(f"{text_where}: MoE key(s) {stray} in a dense {model_type} config; "
                                      f"use model_type {model_type.replace('qwen3_5', 'qwen3_5_moe')!r}")
            text_cfg["num_experts"] = 0
        elif "num_experts" not in text_cfg:
            text_cfg["num_experts"] = 256  # transformers' Qwen3_5MoeTextConfig default
        elif text_cfg["num_experts"] == 0:
            raise ArchConfigError(f"{text_where}.num_experts=0 in a {model_type} config: an MoE model needs experts")
        tie = read_tie(cfg, text_cfg, where)
        text = _build(TextArgs, text_cfg, strict, text_where)
        vision = None if text_only else _build(VisionArgs, vision_cfg, strict, f"{where}.vision_config",
                                               bookkeeping=_VISION_BOOKKEEPING)
        if (vision_cfg or {}).get("deepstack_visual_indexes"):
            raise ArchConfigError(f"{where}.vision_config.deepstack_visual_indexes="
                                  f"{vision_cfg['deepstack_visual_indexes']!r}: Qwen3.5's tower has no DeepStack "
                                  "layers (the released configs write [])")
        if not text_only and "hidden_size" in top and top.pop("hidden_size") != text_cfg.get("hidden_size", 4096):
            raise ArchConfigError(f"{where}.hidden_size={cfg['hidden_size']!r} (top level) differs from "
                                  f"text_config.hidden_size={text_cfg.get('hidden_size')!r}")
        vision_rope = (vision_cfg or {}).get("rope_parameters") or {}
        if isinstance(vision_rope, dict) and vision_rope.get("rope_theta", VISION_ROPE_THETA) != VISION_ROPE_THETA:
            raise ArchConfigError(f"{where}.vision_config.rope_parameters.rope_theta={vision_rope['rope_theta']!r}: "
                                  f"the vision tower's 2-D rope uses {VISION_ROPE_THETA} (Qwen3-VL's tower)")
        top.pop("tie_word_embeddings", None)
        args = _build(cls, top, strict, where, skip={"text", "vision"})
        args.text, args.vision, args.tie_word_embeddings = text, vision, tie
        args.validate(where)
        return args

    def _text_config(self) -> dict[str, Any]:
        t = self.text
        text = {k: v for k, v in dataclasses.asdict(t).items()
                if k not in ("rope_theta", "partial_rotary_factor", "mrope_section")}
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": t.rope_theta,
                                   "partial_rotary_factor": t.partial_rotary_factor,
                                   "mrope_section": list(t.mrope_section), "mrope_interleaved": True}
        if not t.is_moe:
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                      "router_aux_loss_coef"):
                text.pop(k)
        text["tie_word_embeddings"] = self.tie_word_embeddings
        return text

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict that transformers' AutoConfig loads (same ``model_type`` as it was read from)."""
        moe = self.text.is_moe
        text = self._text_config()
        if self.vision is None:
            arch = "Qwen3_5MoeForCausalLM" if moe else "Qwen3_5ForCausalLM"
            return {"architectures": [arch], "model_type": self.model_type, **text}
        text["model_type"] = "qwen3_5_moe_text" if moe else "qwen3_5_text"
        vision = dataclasses.asdict(self.vision)
        vision["model_type"] = "qwen3_5_moe_vision" if moe else "qwen3_5_vision"
        return {
            "architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
            "model_type": self.model_type,
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    # ------------------------------------------------------------------ sizes
    def estimated_params(self) -> int:
        """Parameter count from the sizes alone (embeddings, mixers, MLP / experts, vision blocks): what
        ``validate`` bounds before anything is allocated."""
        t, v = self.text, self.vision
        emb = t.vocab_size * t.hidden_size * (1 if self.tie_word_embeddings else 2)
        h = t.hidden_size
        full = h * t.head_dim * (3 * t.num_attention_heads + 2 * t.num_key_value_heads)
        linear = h * (t.linear_conv_dim + t.linear_value_dim + 2 * t.linear_num_value_heads) + t.linear_value_dim * h
        if t.is_moe:
            mlp = 3 * h * (t.num_experts * t.moe_intermediate_size + t.shared_expert_intermediate_size)
        else:
            mlp = 3 * h * t.intermediate_size
        n_lin = t.num_linear_layers
        n = emb + n_lin * linear + (t.num_hidden_layers - n_lin) * full + t.num_hidden_layers * mlp
        if v is not None:
            n += v.depth * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
        return n

    def validate(self, where: str = "config") -> None:
        t, v = self.text, self.vision
        text_where = f"{where}.text_config" if v is not None else where

        def need(ok: bool, key: str, value: Any, allowed: str, prefix: str = text_where) -> None:
            if not ok:
                raise ArchConfigError(f"{prefix}.{key}={value!r} is invalid: {allowed}")
        # sizes first, before any product of them is used: a config.json is untrusted input
        for key, hi in MAX_TEXT_SIZES.items():
            lo = 0 if key == "num_experts" else 1
            val = getattr(t, key)
            need(lo <= val <= hi, key, val, f"must be in [{lo}, {hi}] (the documented maximum)")
        if v is not None:
            for key, hi in MAX_VISION_SIZES.items():
                val = getattr(v, key)
                need(1 <= val <= hi, key, val, f"must be in [1, {hi}] (the documented maximum)",
                     f"{where}.vision_config")
        n = self.estimated_params()
        need(n <= MAX_PARAMS, "num_hidden_layers", t.num_hidden_layers, f"the sizes give an estimated {n:.3g} "
             f"parameters, more than the maximum {MAX_PARAMS:.0e}; is this config.json the intended one?")
        need(len(t.layer_types) == t.num_hidden_layers, "layer_types", t.layer_types,
             f"must list one entry per layer (num_hidden_layers={t.num_hidden_layers})")
        bad = sorted({x for x in t.layer_types if x not in LAYER_TYPES})
        need(not bad, "layer_types", bad, f"each entry must be one of {LAYER_TYPES}")
        need(t.num_attention_heads % t.num_key_value_heads == 0, "num_key_value_heads", t.num_key_value_heads,
             f"must divide num_attention_heads={t.num_attention_heads}")
        need(t.linear_num_value_heads % t.linear_num_key_heads == 0, "linear_num_key_heads", t.linear_num_key_heads,
             f"must divide linear_num_value_heads={t.linear_num_value_heads}")
        need(0.0 < t.partial_rotary_factor <= 1.0 and t.rotary_dim % 2 == 0 and t.rotary_dim > 0,
             "partial_rotary_factor", t.partial_rotary_factor,
             f"must be in (0, 1] with int(head_dim * factor) even and positive (head_dim={t.head_dim})")
        # transformers applies any section (frequency j takes H if j % 3 == 1 and j < 3 * s[1], W if j % 3 == 2 and
        # j < 3 * s[2], else T) and defaults it to [11, 11, 10] whatever rotary_dim is, so no sum is required
        need(len(t.mrope_section) == 3 and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                               for s in t.mrope_section),
             "rope_parameters.mrope_section", t.mrope_section, "three non-negative ints (T, H, W frequencies)")
        need(t.hidden_act == "silu", "hidden_act", t.hidden_act, "allowed: 'silu'")
        need(t.rope_theta > 0, "rope_parameters.rope_theta", t.rope_theta, "must be positive")
        need(t.rms_norm_eps > 0, "rms_norm_eps", t.rms_norm_eps, "must be positive")
        need(t.num_experts == 0 or 1 <= t.num_experts_per_tok <= t.num_experts, "num_experts_per_tok",
             t.num_experts_per_tok, f"must be in [1, num_experts={t.num_experts}]")
        tokens = [self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id]
        if v is not None:
            need(v.out_hidden_size == t.hidden_size, "out_hidden_size", v.out_hidden_size,
                 f"must equal text_config.hidden_size={t.hidden_size}", f"{where}.vision_config")
            need(v.hidden_size % v.num_heads == 0 and (v.hidden_size // v.num_heads) % 4 == 0, "num_heads",
                 v.num_heads, f"must divide hidden_size={v.hidden_size} into heads of a multiple of 4 dims (2-D rotary)",
                 f"{where}.vision_config")
            need(all(0 <= i < t.vocab_size for i in tokens), "vocab_size", t.vocab_size,
                 f"must exceed the vision special token ids {tokens}")


@dataclass
class Qwen35Args(_Qwen35ArgsBase):
    """Qwen3.5 / Qwen3.5-MoE with the vision tower (``model_type`` ``qwen3_5`` / ``qwen3_5_moe``)."""

    vision: VisionArgs | None = field(default_factory=VisionArgs)
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen3_5", "qwen3_5_moe")


@dataclass
class Qwen35TextArgs(_Qwen35ArgsBase):
    """Text-only Qwen3.5 / Qwen3.5-MoE (``model_type`` ``qwen3_5_text`` / ``qwen3_5_moe_text``): ``vision`` is None."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen3_5_text", "qwen3_5_moe_text")


def _build(cls, values: dict[str, Any] | None, strict: bool, where: str, skip: set[str] = frozenset(),
           bookkeeping: set[str] = _HF_BOOKKEEPING):
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    unknown = sorted(k for k in values if k not in names and k not in bookkeeping)
    if unknown and strict:
        raise ArchConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: v for k, v in values.items() if k in names}
    for f in dataclasses.fields(cls):
        if f.name not in kwargs:
            continue
        val = kwargs[f.name]
        if f.type in ("int", "float", "bool", "str"):
            expected = {"int": int, "float": (int, float), "bool": bool, "str": str}[f.type]
            if isinstance(val, bool) and f.type != "bool" or not isinstance(val, expected):
                raise ArchConfigError(f"{where}.{f.name}={val!r} has type {type(val).__name__}, expected {f.type}")
            if f.type == "float":
                kwargs[f.name] = float(val)
        elif f.type.startswith("list"):
            if not isinstance(val, (list, tuple)):
                raise ArchConfigError(f"{where}.{f.name}={val!r} has type {type(val).__name__}, expected a list")
            kwargs[f.name] = list(val)
    return cls(**kwargs)

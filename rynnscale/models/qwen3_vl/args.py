"""Architecture hyper-parameters of Qwen3-VL (dense) and Qwen3-VL-MoE.

Field names are those of transformers' ``config.json`` (``text_config`` / ``vision_config``)
so that a recipe's inline architecture, a checkpoint's config.json and our export are the
same document. ``Qwen3VLArgs.from_hf_config`` reads a config.json dict (HF bookkeeping keys
are ignored; with ``strict=True`` anything else unknown is an error naming the key), and
``to_hf_config`` writes one that ``transformers.AutoConfig`` understands.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rynnscale.models.hf_config import read_rope, read_tie
from rynnscale.models.spec import ArchConfigError

# Keys transformers writes into every config that carry no architecture information.
_HF_BOOKKEEPING = {
    "architectures", "output_hidden_states", "return_dict", "dtype", "torch_dtype",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "_name_or_path", "model_type", "output_attentions", "transformers_version", "initializer_range",
    "use_cache", "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id", "sliding_window",
    "output_router_logits", "tokenizer_class", "_attn_implementation_autoset", "use_sliding_window",
    "max_window_layers", "layer_types", "quantization_config", "rope_scaling", "rope_parameters",
    "num_local_experts", "rope_theta",
}


# TextArgs' MoE fields: a dense (qwen3_vl) recipe that sets one is refused (strict), not silently made dense.
_MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
             "mlp_only_layers", "norm_topk_prob", "router_aux_loss_coef")


# Documented maxima of architecture sizes (far above any published model; refused before allocation so that an
# absurd config.json fails with the key named instead of an out-of-memory kill). See README "Troubleshooting".
MAX_TEXT_SIZES = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 20,
                  "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
                  "head_dim": 1024, "num_experts": 4096, "moe_intermediate_size": 1 << 18}
MAX_VISION_SIZES = {"depth": 1024, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "num_heads": 1024,
                    "patch_size": 1024, "num_position_embeddings": 1 << 22}
MAX_PARAMS = 2 * 10**12

# config.json keys whose transformers default (Qwen3VL(Moe)TextConfig / VisionConfig, 5.25) differs from ours:
# a checkpoint must set them (ModelSpec.hf_keys_without_shared_default)
_T = "text_config."
HF_KEYS_WITHOUT_SHARED_DEFAULT = {
    "qwen3_vl": tuple(_T + k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                       "num_key_value_heads", "rope_theta")) + ("vision_config.out_hidden_size",),
    "qwen3_vl_moe": tuple(_T + k for k in ("intermediate_size", "num_hidden_layers", "num_key_value_heads",
                                           "rope_theta", "num_experts", "num_experts_per_tok",
                                           "moe_intermediate_size")) + ("vision_config.out_hidden_size",),
}


@dataclass
class TextArgs:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144          # dense MLP width (also used by mlp_only_layers)
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [24, 20, 20])
    max_position_embeddings: int = 262144
    attention_bias: bool = False
    # MoE; num_experts == 0 means every layer is dense.
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    norm_topk_prob: bool = True            # only True (validate): transformers always renormalises the top-k
    router_aux_loss_coef: float = 0.001

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_moe(self, layer_idx: int) -> bool:
        """Same rule as transformers' Qwen3-VL-MoE decoder layer."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


@dataclass
class VisionArgs:
    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 2048
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [8, 16, 24])


@dataclass
class Qwen3VLArgs:
    text: TextArgs = field(default_factory=TextArgs)
    vision: VisionArgs = field(default_factory=VisionArgs)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], strict: bool = False, where: str = "config") -> Qwen3VLArgs:
        """Build from a transformers Qwen3-VL / Qwen3-VL-MoE config dict.

        ``strict`` rejects keys that are neither ours nor HF bookkeeping (used for recipes,
        where an unknown key is almost always a typo)."""
        cfg = dict(cfg)
        text_cfg = dict(cfg.pop("text_config", {}) or {})
        vision_cfg = dict(cfg.pop("vision_config", {}) or {})
        # rope: transformers 5 nests theta / mrope_section in rope_parameters (4.x: rope_scaling)
        read_rope(text_cfg, f"{where}.text_config", "Qwen3-VL", ("rope_theta", "mrope_section"))
        if isinstance(text_cfg.get("mrope_section"), tuple):
            text_cfg["mrope_section"] = list(text_cfg["mrope_section"])
        if "num_local_experts" in text_cfg:
            text_cfg.setdefault("num_experts", text_cfg["num_local_experts"])
        model_type = str(cfg.get("model_type", ""))
        if model_type == "qwen3_vl":  # dense checkpoints carry no MoE keys; a stray one would change the model silently
            stray = sorted(k for k in (*_MOE_KEYS, "num_local_experts") if k in text_cfg)
            if stray and strict:
                raise ArchConfigError(f"{where}.text_config: MoE key(s) {stray} in a dense {model_type} config; "
                                      "use model_type 'qwen3_vl_moe'")
            text_cfg["num_experts"] = 0
        elif model_type == "qwen3_vl_moe" and strict and not text_cfg.get("num_experts"):
            raise ArchConfigError(f"{where}.text_config.num_experts={text_cfg.get('num_experts')!r} in a {model_type} "
                                  "config: an MoE model needs experts (or use model_type 'qwen3_vl' for a dense model)")
        tie = read_tie(cfg, text_cfg, where)
        cfg.pop("tie_word_embeddings", None)
        text = _build(TextArgs, text_cfg, strict, f"{where}.text_config")
        vision = _build(VisionArgs, vision_cfg, strict, f"{where}.vision_config")
        top = {k: v for k, v in cfg.items() if k not in _HF_BOOKKEEPING}
        args = _build(cls, {**top, "tie_word_embeddings": tie}, strict, where, skip={"text", "vision"})
        args.text, args.vision = text, vision
        args.validate(where)
        return args

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict that transformers' AutoConfig loads."""
        moe = self.text.is_moe
        text = dataclasses.asdict(self.text)
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": text.pop("rope_theta"),
            "mrope_section": text.pop("mrope_section"),
            "mrope_interleaved": True,
        }
        text["tie_word_embeddings"] = self.tie_word_embeddings
        if not moe:
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
                      "mlp_only_layers", "norm_topk_prob", "router_aux_loss_coef"):
                text.pop(k)
        text["model_type"] = "qwen3_vl_moe_text" if moe else "qwen3_vl_text"
        vision = dataclasses.asdict(self.vision)
        vision["model_type"] = "qwen3_vl_moe_vision" if moe else "qwen3_vl_vision"
        return {
            "architectures": ["Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"],
            "model_type": "qwen3_vl_moe" if moe else "qwen3_vl",
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    def estimated_params(self) -> int:
        """Parameter count from the sizes alone (embeddings, attention, MLP / experts, vision blocks): what
        ``validate`` bounds before anything is allocated."""
        t, v = self.text, self.vision
        emb = t.vocab_size * t.hidden_size * (1 if self.tie_word_embeddings else 2)
        attn = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
        mlp = 3 * t.hidden_size * (t.num_experts * t.moe_intermediate_size if t.is_moe else t.intermediate_size)
        vision = v.depth * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
        return emb + t.num_hidden_layers * (attn + mlp) + vision

    def validate(self, where: str = "config") -> None:
        t, v = self.text, self.vision
        def need(ok: bool, key: str, value: Any, allowed: str) -> None:
            if not ok:
                raise ArchConfigError(f"{where}.{key}={value!r} is invalid: {allowed}")
        # sizes first, before any product of them is used: a config.json is untrusted input
        for part, obj, bounds in (("text_config", t, MAX_TEXT_SIZES), ("vision_config", v, MAX_VISION_SIZES)):
            for key, hi in bounds.items():
                lo = 0 if key == "num_experts" else 1
                val = getattr(obj, key)
                need(lo <= val <= hi, f"{part}.{key}", val, f"must be in [{lo}, {hi}] (the documented maximum)")
        n = self.estimated_params()
        need(n <= MAX_PARAMS, "text_config", f"~{n:.3g} parameters", f"the sizes give an estimated {n:.3g} "
             f"parameters, more than the maximum {MAX_PARAMS:.0e}; is this config.json the intended one?")
        need(t.num_attention_heads % t.num_key_value_heads == 0, "text_config.num_key_value_heads",
             t.num_key_value_heads, f"must divide num_attention_heads={t.num_attention_heads}")
        need(sum(t.mrope_section) * 2 == t.head_dim, "text_config.mrope_section", t.mrope_section,
             f"must sum to head_dim/2={t.head_dim // 2}")
        need(t.norm_topk_prob is True, "text_config.norm_topk_prob", t.norm_topk_prob,
             "only true: transformers' Qwen3-VL-MoE router always renormalises the top-k weights (it has no such "
             "key), so false would train a model that transformers runs differently")
        need(t.num_experts == 0 or 1 <= t.num_experts_per_tok <= t.num_experts, "text_config.num_experts_per_tok",
             t.num_experts_per_tok, f"must be in [1, num_experts={t.num_experts}]")
        need(v.out_hidden_size == t.hidden_size, "vision_config.out_hidden_size", v.out_hidden_size,
             f"must equal text_config.hidden_size={t.hidden_size}")
        need(v.hidden_size % v.num_heads == 0, "vision_config.num_heads", v.num_heads,
             f"must divide vision hidden_size={v.hidden_size}")
        need(all(0 <= i < v.depth for i in v.deepstack_visual_indexes), "vision_config.deepstack_visual_indexes",
             v.deepstack_visual_indexes, f"each must be in [0, depth={v.depth})")
        need(len(v.deepstack_visual_indexes) <= t.num_hidden_layers, "vision_config.deepstack_visual_indexes",
             v.deepstack_visual_indexes, f"at most num_hidden_layers={t.num_hidden_layers} entries")
        need(t.vocab_size > max(self.image_token_id, self.video_token_id, self.vision_end_token_id), "text_config.vocab_size",
             t.vocab_size, "must exceed the vision special token ids")


def _build(cls, values: dict[str, Any], strict: bool, where: str, skip: set[str] = frozenset()):
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    unknown = sorted(k for k in values if k not in names and k not in _HF_BOOKKEEPING)
    if unknown and strict:
        raise ArchConfigError(
            f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: v for k, v in values.items() if k in names}
    for f in dataclasses.fields(cls):
        if f.name in kwargs and f.type in ("int", "float", "bool", "str"):
            val = kwargs[f.name]
            expected = {"int": int, "float": (int, float), "bool": bool, "str": str}[f.type]
            if isinstance(val, bool) and f.type != "bool" or not isinstance(val, expected):
                raise ArchConfigError(f"{where}.{f.name}={val!r} has type {type(val).__name__}, expected {f.type}")
            if f.type == "float":
                kwargs[f.name] = float(val)
    return cls(**kwargs)

"""A second model family, registered by the tests alone: Qwen3 (text only, transformers' ``Qwen3ForCausalLM``).

It proves the seam: nothing outside this folder and the registry call (``register_family``) changes for
rynnscale to build, train, checkpoint, resume and export it. It reuses the Qwen3-VL family's text decoder
(Qwen3 is its text backbone; MRoPE over three equal position rows is plain RoPE) and parallel plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from rynnscale.models import ArchConfigError, DataContract, ModelOutput, ModelSpec, StateDictAdapter, register
from rynnscale.models.causal_lm import CausalLM, LMHead
from rynnscale.models.lora import LoRALinear
from rynnscale.models.mrope import text_position_ids
from rynnscale.models.qwen3_vl.args import TextArgs
from rynnscale.models.qwen3_vl.flops import step_flops
from rynnscale.models.qwen3_vl.parallelize import parallelize
from rynnscale.models.qwen3_vl.text import RMSNorm, TextModel

_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings", "attention_bias")
_IGNORED = {"model_type", "architectures", "dtype", "torch_dtype", "transformers_version", "bos_token_id",
            "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "attention_dropout", "layer_types",
            "use_sliding_window", "sliding_window", "max_window_layers", "rope_parameters", "rope_theta"}


@dataclasses.dataclass
class Qwen3TextArgs:
    text: TextArgs
    tie_word_embeddings: bool = False
    vision = None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], strict: bool = False, where: str = "config") -> Qwen3TextArgs:
        unknown = sorted(set(cfg) - set(_KEYS) - _IGNORED - {"tie_word_embeddings"})
        if strict and unknown:
            raise ArchConfigError(f"{where}: unknown key(s) {unknown}")
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        text = TextArgs(**{k: cfg[k] for k in _KEYS if k in cfg}, rope_theta=float(theta))
        text.mrope_section = [text.head_dim // 2, 0, 0]   # one position row: plain RoPE
        args = cls(text, bool(cfg.get("tie_word_embeddings", False)))
        args.validate(where)
        return args

    def to_hf_config(self) -> dict[str, Any]:
        t = self.text
        return {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], **{k: getattr(t, k) for k in _KEYS},
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
                "tie_word_embeddings": self.tie_word_embeddings}

    def validate(self, where: str = "config") -> None:
        t = self.text
        if t.num_attention_heads % t.num_key_value_heads or t.head_dim % 2:
            raise ArchConfigError(f"{where}: num_key_value_heads must divide num_attention_heads; head_dim even")


class Qwen3TextForCausalLM(CausalLM):
    supports_cache = True   # the shared text decoder keeps a KV cache; a text family has no tower to skip

    def __init__(self, args: Qwen3TextArgs, attn_backend: str = "auto"):
        super().__init__()
        self.args = args
        self.model = TextModel(args.text, attn_backend=attn_backend)
        self.lm_head = LMHead(args.text.hidden_size, args.text.vocab_size)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def init_plan(self, std: float = 0.02):
        normal = lambda x: nn.init.normal_(x, 0.0, std)  # noqa: E731
        plan = []
        for name, mod in self.model.named_modules(prefix="model"):
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                plan.append((f"{name}.weight", normal))
                plan += mod.init_plan(f"{name}.") if isinstance(mod, LoRALinear) else []
            elif isinstance(mod, RMSNorm):
                plan.append((f"{name}.weight", nn.init.ones_))
        return plan + ([("lm_head.weight", normal)] if not self.args.tie_word_embeddings else [])

    def forward(self, batch, counts_reducer=None, cache=None) -> ModelOutput:
        if cache is not None:
            h_lh, _ = self.model(self.model.embed_tokens(batch.input_ids_l), batch.position_ids_3l, batch.cu_seqlens,
                                 batch.max_seqlen, cache=cache)
            return ModelOutput(h_lh, h_lh.new_zeros((), dtype=torch.float32))
        cp = self.cp_shard(batch)
        shard = (lambda x, dim=0: x) if cp is None else cp.shard
        cu, mx = (batch.cu_seqlens, batch.max_seqlen) if cp is None else (cp.plan.cu_seqlens, cp.plan.max_seqlen)
        h_lh, _ = self.model(self.model.embed_tokens(shard(batch.input_ids_l)), shard(batch.position_ids_3l, dim=1),
                             cu, mx, cp=cp)
        return ModelOutput(h_lh, h_lh.new_zeros((), dtype=torch.float32), None, cp)


def param_shapes(args: Qwen3TextArgs, *, include_tied: bool = False) -> dict[str, tuple[int, ...]]:
    t, out = args.text, {"model.embed_tokens.weight": (args.text.vocab_size, args.text.hidden_size)}
    q, kv, h, i = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim, t.hidden_size, t.intermediate_size
    for n in range(t.num_hidden_layers):
        b = f"model.layers.{n}."
        out |= {b + "self_attn.q_proj.weight": (q, h), b + "self_attn.k_proj.weight": (kv, h),
                b + "self_attn.v_proj.weight": (kv, h), b + "self_attn.o_proj.weight": (h, q),
                b + "self_attn.q_norm.weight": (t.head_dim,), b + "self_attn.k_norm.weight": (t.head_dim,),
                b + "mlp.gate_proj.weight": (i, h), b + "mlp.up_proj.weight": (i, h), b + "mlp.down_proj.weight": (h, i),
                b + "input_layernorm.weight": (h,), b + "post_attention_layernorm.weight": (h,)}
        if t.attention_bias:
            out |= {b + f"self_attn.{p}_proj.bias": (d,) for p, d in (("q", q), ("k", kv), ("v", kv), ("o", h))}
    out["model.norm.weight"] = (h,)
    if include_tied or not args.tie_word_embeddings:
        out["lm_head.weight"] = (t.vocab_size, h)
    return out


def cost_coefficients(args: Qwen3TextArgs) -> tuple[float, float, float]:
    t = args.text
    per_token = t.num_hidden_layers * (2 * t.hidden_size * (t.num_attention_heads + t.num_key_value_heads) * t.head_dim
                                       + 3 * t.hidden_size * t.intermediate_size) + t.hidden_size * t.vocab_size
    return 1.0, t.num_hidden_layers * t.num_attention_heads * t.head_dim / per_token, 0.0


def register_family() -> ModelSpec:
    """Register the family (idempotent); returns its spec."""
    return register(ModelSpec(
        name="qwen3_text", model_types=("qwen3",), args_cls=Qwen3TextArgs,
        args_from_hf_config=Qwen3TextArgs.from_hf_config, new_model=Qwen3TextForCausalLM, parallelize=parallelize,
        state_dict=StateDictAdapter(param_shapes=param_shapes, canonical_key=lambda k: k, expert_kind=lambda k: None,
                                    embed_key="model.embed_tokens.weight"),
        step_flops=step_flops, cost_coefficients=cost_coefficients,
        data=lambda args: DataContract(151655, 151656, 151652, 151653, vision=None,
                                       position_ids=lambda ids_l, *_: text_position_ids(len(ids_l)))), replace=True)

"""Qwen3.5(-MoE)'s Hugging Face tensor layout (``StateDictAdapter``): transformers' names and shapes for the
vision-language (``model.language_model.*`` + ``model.visual.*``) and the text-only (``model.*``) variants.

Experts are ``mlp.experts.gate_up_proj [E, 2I, H]`` / ``mlp.experts.down_proj [E, H, I]`` (transformers 5's
modules). transformers' ``save_pretrained`` and the released checkpoints store them per expert instead
(``mlp.experts.{e}.gate_proj.weight [I, H]``, ``up_proj``, ``down_proj [H, I]``: the ``qwen2_moe`` conversion
mapping); ``rynnscale.checkpoint.hf`` fuses those on import and stores them so on export. The released
checkpoints' multi-token-prediction head (``mtp.*``), which neither transformers nor we build, is skipped
(``canonical_key`` -> None). The text-only layout also reads a vision-language checkpoint
(``text_only_canonical_key``), as transformers does.
"""

from __future__ import annotations

from rynnscale.models.qwen3_5.args import Qwen35Args, Qwen35TextArgs
from rynnscale.models.spec import StateDictAdapter

LM_HEAD = "lm_head.weight"
EMBED = "model.language_model.embed_tokens.weight"     # the vision-language layout (the adapter's embed_key)
TEXT_ONLY_EMBED = "model.embed_tokens.weight"


def decoder_prefix(args: Qwen35Args | Qwen35TextArgs) -> str:
    return "model.language_model." if args.vision is not None else "model."


def param_shapes(args: Qwen35Args | Qwen35TextArgs, *, include_tied: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF state dict implied by ``args`` -> its shape (experts fused, transformers 5).
    ``lm_head.weight`` is left out when embeddings are tied unless ``include_tied``."""
    t, v = args.text, args.vision
    out: dict[str, tuple[int, ...]] = {}

    def linear(prefix: str, n_out: int, n_in: int, bias: bool = False) -> None:
        out[prefix + ".weight"] = (n_out, n_in)
        if bias:
            out[prefix + ".bias"] = (n_out,)

    def layer_norm(prefix: str, n: int) -> None:
        out[prefix + ".weight"] = (n,)
        out[prefix + ".bias"] = (n,)

    if v is not None:
        vis, hv, merged = "model.visual.", v.hidden_size, v.hidden_size * v.spatial_merge_size ** 2
        out[vis + "patch_embed.proj.weight"] = (hv, v.in_channels, v.temporal_patch_size, v.patch_size,
                                                v.patch_size)
        out[vis + "patch_embed.proj.bias"] = (hv,)
        out[vis + "pos_embed.weight"] = (v.num_position_embeddings, hv)
        for i in range(v.depth):
            b = f"{vis}blocks.{i}."
            layer_norm(b + "norm1", hv)
            layer_norm(b + "norm2", hv)
            linear(b + "attn.qkv", 3 * hv, hv, True)
            linear(b + "attn.proj", hv, hv, True)
            linear(b + "mlp.linear_fc1", v.intermediate_size, hv, True)
            linear(b + "mlp.linear_fc2", hv, v.intermediate_size, True)
        layer_norm(vis + "merger.norm", hv)
        linear(vis + "merger.linear_fc1", merged, merged, True)
        linear(vis + "merger.linear_fc2", v.out_hidden_size, merged, True)

    lm, h, hd = decoder_prefix(args), t.hidden_size, t.head_dim
    out[lm + "embed_tokens.weight"] = (t.vocab_size, h)
    for i in range(t.num_hidden_layers):
        b = f"{lm}layers.{i}."
        if t.is_linear(i):
            la = b + "linear_attn."
            out[la + "dt_bias"] = (t.linear_num_value_heads,)
            out[la + "A_log"] = (t.linear_num_value_heads,)
            out[la + "conv1d.weight"] = (t.linear_conv_dim, 1, t.linear_conv_kernel_dim)
            out[la + "norm.weight"] = (t.linear_value_head_dim,)
            linear(la + "out_proj", h, t.linear_value_dim)
            linear(la + "in_proj_qkv", t.linear_conv_dim, h)
            linear(la + "in_proj_z", t.linear_value_dim, h)
            linear(la + "in_proj_b", t.linear_num_value_heads, h)
            linear(la + "in_proj_a", t.linear_num_value_heads, h)
        else:
            sa = b + "self_attn."
            linear(sa + "q_proj", 2 * t.num_attention_heads * hd, h, t.attention_bias)
            linear(sa + "k_proj", t.num_key_value_heads * hd, h, t.attention_bias)
            linear(sa + "v_proj", t.num_key_value_heads * hd, h, t.attention_bias)
            linear(sa + "o_proj", h, t.num_attention_heads * hd, t.attention_bias)
            out[sa + "q_norm.weight"] = (hd,)
            out[sa + "k_norm.weight"] = (hd,)
        if t.is_moe:
            e, inter, shared = t.num_experts, t.moe_intermediate_size, t.shared_expert_intermediate_size
            out[b + "mlp.gate.weight"] = (e, h)
            out[b + "mlp.experts.gate_up_proj"] = (e, 2 * inter, h)
            out[b + "mlp.experts.down_proj"] = (e, h, inter)
            linear(b + "mlp.shared_expert.gate_proj", shared, h)
            linear(b + "mlp.shared_expert.up_proj", shared, h)
            linear(b + "mlp.shared_expert.down_proj", h, shared)
            linear(b + "mlp.shared_expert_gate", 1, h)
        else:
            linear(b + "mlp.gate_proj", t.intermediate_size, h)
            linear(b + "mlp.up_proj", t.intermediate_size, h)
            linear(b + "mlp.down_proj", h, t.intermediate_size)
        out[b + "input_layernorm.weight"] = (h,)
        out[b + "post_attention_layernorm.weight"] = (h,)
    out[lm + "norm.weight"] = (h,)
    if include_tied or not args.tie_word_embeddings:
        out[LM_HEAD] = (t.vocab_size, h)
    return out


def expert_kind(name: str) -> str | None:
    """"gate_up" / "down" for a fused routed-expert tensor name, else None (the shared expert is not fused)."""
    if name.endswith(".mlp.experts.gate_up_proj"):
        return "gate_up"
    if name.endswith(".mlp.experts.down_proj"):
        return "down"
    return None


def canonical_key(key: str) -> str | None:
    """A checkpoint key -> our name, or None for a tensor to skip: the multi-token-prediction head (``mtp.*``)
    of the released checkpoints, which transformers skips too (``_keys_to_ignore_on_load_unexpected``). The
    vision-language classes accept a bare ``Qwen3_5Model`` save (``visual.*`` / ``language_model.*``)."""
    if key.startswith("mtp."):
        return None
    if key.startswith(("visual.", "language_model.")):
        return "model." + key
    return key


def text_only_canonical_key(key: str) -> str | None:
    """The text-only classes: ``mtp.*`` skipped; a vision-language checkpoint's decoder (``model.language_model.*``)
    read as ``model.*`` and its tower (``model.visual.*``) skipped, as transformers does for ``qwen3_5_text`` /
    ``qwen3_5_moe_text`` (``PrefixChange(prefix_to_remove="language_model")``): the usual way to get a text-only
    Qwen3.5 is a text config over the released weights."""
    if key.startswith(("mtp.", "model.visual.")):
        return None
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    return key


# exports store experts one by one, as transformers' save_pretrained and the released checkpoints do ("v5" on request)
EXPORT_LAYOUTS = ("per_expert", "v5")
ADAPTER = StateDictAdapter(param_shapes=param_shapes, canonical_key=canonical_key, expert_kind=expert_kind,
                           embed_key=EMBED, lm_head_key=LM_HEAD, export_layouts=EXPORT_LAYOUTS)
TEXT_ONLY_ADAPTER = StateDictAdapter(param_shapes=param_shapes, canonical_key=text_only_canonical_key,
                                     expert_kind=expert_kind, embed_key=TEXT_ONLY_EMBED, lm_head_key=LM_HEAD,
                                     export_layouts=EXPORT_LAYOUTS)

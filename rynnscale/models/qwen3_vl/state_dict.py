"""Qwen3-VL(-MoE)'s Hugging Face tensor layout (``StateDictAdapter``): transformers' names and shapes,
fused experts as ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` (transformers 5's layout; older
checkpoints store them transposed, which ``rynnscale.checkpoint.hf`` converts)."""

from __future__ import annotations

from rynnscale.models.qwen3_vl.args import Qwen3VLArgs
from rynnscale.models.spec import StateDictAdapter

LM_HEAD = "lm_head.weight"
EMBED = "model.language_model.embed_tokens.weight"


def param_shapes(args: Qwen3VLArgs, *, include_tied: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF state dict implied by ``args`` -> its shape (experts in "v5" layout).

    ``lm_head.weight`` is left out when embeddings are tied (not stored in a checkpoint) unless
    ``include_tied``. This is the contract export validates against."""
    t, v = args.text, args.vision
    out: dict[str, tuple[int, ...]] = {}
    vis = "model.visual."
    hv, merged = v.hidden_size, v.hidden_size * v.spatial_merge_size ** 2
    out[vis + "patch_embed.proj.weight"] = (hv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    out[vis + "patch_embed.proj.bias"] = (hv,)
    out[vis + "pos_embed.weight"] = (v.num_position_embeddings, hv)

    def linear(prefix: str, n_out: int, n_in: int, bias: bool) -> None:
        out[prefix + ".weight"] = (n_out, n_in)
        if bias:
            out[prefix + ".bias"] = (n_out,)

    def layer_norm(prefix: str, n: int) -> None:
        out[prefix + ".weight"] = (n,)
        out[prefix + ".bias"] = (n,)

    for i in range(v.depth):
        b = f"{vis}blocks.{i}."
        layer_norm(b + "norm1", hv)
        layer_norm(b + "norm2", hv)
        linear(b + "attn.qkv", 3 * hv, hv, True)
        linear(b + "attn.proj", hv, hv, True)
        linear(b + "mlp.linear_fc1", v.intermediate_size, hv, True)
        linear(b + "mlp.linear_fc2", hv, v.intermediate_size, True)
    # the final merger normalises before the 2x2 shuffle (width hv), the deepstack mergers after it
    for prefix, norm_width in [(vis + "merger", hv)] + [
            (f"{vis}deepstack_merger_list.{j}", merged) for j in range(len(v.deepstack_visual_indexes))]:
        layer_norm(prefix + ".norm", norm_width)
        linear(prefix + ".linear_fc1", merged, merged, True)
        linear(prefix + ".linear_fc2", v.out_hidden_size, merged, True)

    lm = "model.language_model."
    h, hd = t.hidden_size, t.head_dim
    out[lm + "embed_tokens.weight"] = (t.vocab_size, h)
    for i in range(t.num_hidden_layers):
        b = f"{lm}layers.{i}."
        linear(b + "self_attn.q_proj", t.num_attention_heads * hd, h, t.attention_bias)
        linear(b + "self_attn.k_proj", t.num_key_value_heads * hd, h, t.attention_bias)
        linear(b + "self_attn.v_proj", t.num_key_value_heads * hd, h, t.attention_bias)
        linear(b + "self_attn.o_proj", h, t.num_attention_heads * hd, t.attention_bias)
        out[b + "self_attn.q_norm.weight"] = (hd,)
        out[b + "self_attn.k_norm.weight"] = (hd,)
        if t.layer_is_moe(i):
            e, inter = t.num_experts, t.moe_intermediate_size
            out[b + "mlp.experts.gate_up_proj"] = (e, 2 * inter, h)
            out[b + "mlp.experts.down_proj"] = (e, h, inter)
            out[b + "mlp.gate.weight"] = (e, h)
        else:
            linear(b + "mlp.gate_proj", t.intermediate_size, h, False)
            linear(b + "mlp.up_proj", t.intermediate_size, h, False)
            linear(b + "mlp.down_proj", h, t.intermediate_size, False)
        out[b + "input_layernorm.weight"] = (h,)
        out[b + "post_attention_layernorm.weight"] = (h,)
    out[lm + "norm.weight"] = (h,)
    if include_tied or not args.tie_word_embeddings:
        out[LM_HEAD] = (t.vocab_size, h)
    return out



def expert_kind(name: str) -> str | None:
    """"gate_up" / "down" for a fused expert tensor name, else None."""
    if name.endswith(".mlp.experts.gate_up_proj"):
        return "gate_up"
    if name.endswith(".mlp.experts.down_proj"):
        return "down"
    return None



def canonical_key(key: str) -> str:
    """Map a checkpoint key to transformers' ``Qwen3VLForConditionalGeneration`` name.

    The one prefix variant transformers itself accepts for these classes is a bare ``Qwen3VLModel``
    save (``visual.*`` / ``language_model.*``, no ``model.``: its ``base_model_prefix`` rule). The
    Qwen3-VL classes define no other ``_checkpoint_conversion_mapping`` / conversion renames."""
    if key.startswith(("visual.", "language_model.")):
        return "model." + key
    return key


ADAPTER = StateDictAdapter(param_shapes=param_shapes, canonical_key=canonical_key, expert_kind=expert_kind,
                           embed_key=EMBED, lm_head_key=LM_HEAD, export_layouts=("v5", "hub"))

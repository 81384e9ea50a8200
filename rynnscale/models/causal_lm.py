"""What every model of a family shares: a decoder with an LM head over ONE packed row (``PackedBatch``).

``CausalLM`` is the base of our model classes (``rynnscale.models.spec.TrainableModel``): tied embeddings
that survive ``to_empty``, the element-wise kernel choice, the seeded init from the subclass's
``init_plan`` (bitwise the same draws on any layout), the context-parallel shard of a row, logits and the
fused, chunked next-token cross-entropy (``LMHead``: no [L, V] fp32 logits). A subclass builds its modules,
sets ``args`` / ``lm_head`` and writes ``input_embeddings``, ``decoder_layers``, ``init_plan`` and ``forward``.

Generation (``rynnscale.models.generate``) asks the model for a cache (``new_cache``; a ``KVCache`` over the
decoder layers by default) and runs ``model(batch, cache=cache)`` on rows whose documents continue the
cache's sequences (``generate.cached_forward`` brackets the call with ``cache.begin`` / ``end``). A family
sets ``supports_cache = True`` once its ``forward`` takes ``cache``: it gives its attention layers
``cache.layer(i)`` and skips its vision tower when ``cache.continuing``; others generate without a cache
(a full forward per token).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from rynnscale.batch import IGNORE_INDEX, PackedBatch
from rynnscale.models.kv_cache import KVCache
from rynnscale.models.spec import ModelOutput
from rynnscale.ops import fused
from rynnscale.ops.loss import linear_cross_entropy, linear_log_probs
from rynnscale.parallel.context_parallel import CPGroup, CPShard


class LMHead(nn.Linear):
    """HF's ``lm_head`` (``weight`` [V, H], no bias). ``lm_head(hidden)`` gives logits;
    ``lm_head(hidden, targets_l, chunk_tokens)`` gives the fused chunked cross-entropy SUM instead, and with
    ``log_probs=True`` the per-token log-probabilities of the targets [L] (policy gradients; ``temperature``
    divides the logits).

    The loss goes through this module's ``forward`` on purpose: wrapped by FSDP2, its unshard,
    pre-backward and reduce-scatter hooks then fire around the loss like around any other layer."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)
        self.kernels = "torch"

    def forward(self, hidden_ld: torch.Tensor, targets_l: torch.Tensor | None = None,
                chunk_tokens: int = 4096, log_probs: bool = False, temperature: float = 1.0) -> torch.Tensor:
        if targets_l is None:
            return super().forward(hidden_ld)
        if log_probs:
            return linear_log_probs(hidden_ld, self.weight, targets_l, chunk_tokens, temperature)
        return linear_cross_entropy(hidden_ld, self.weight, targets_l, chunk_tokens, kernels=self.kernels)


class CausalLM(nn.Module):
    """Base of a family's model (module docstring). ``always_run_vision`` is set by a parallel plan that shards
    a vision tower (every rank must run it in every forward); ``cp`` by the plan under context parallelism."""

    args: object
    lm_head: LMHead
    supports_cache: bool = False   # True: ``forward(batch, counts_reducer=None, cache=None)`` decodes incrementally

    def __init__(self) -> None:
        super().__init__()
        self.always_run_vision = False
        self.kernels = "torch"            # see set_kernels
        self.cp: CPGroup | None = None    # context parallelism (set by the parallel plan when parallel.cp > 1)

    # ------------------------------------------------------------------ structure
    def input_embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def vision_tower(self) -> nn.Module | None:
        return None

    def vision_blocks(self) -> nn.ModuleList:
        return nn.ModuleList()

    def activation_checkpoint_targets(self) -> list[nn.ModuleList]:
        """The per-layer block lists (decoder layers, vision blocks) that checkpointing / FSDP wrap."""
        return [self.decoder_layers(), self.vision_blocks()]

    def tie_weights(self) -> None:
        """Share ``lm_head.weight`` with the token embedding when ``tie_word_embeddings``."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.input_embeddings().weight

    def set_kernels(self, kernels: str) -> int:
        """Choose the element-wise kernels (RMSNorm, RoPE, SwiGLU, fused loss) of every module that has a
        ``kernels`` attribute: ``auto`` / ``torch`` / ``liger`` (``rynnscale.ops.fused``). Returns how
        many modules were set. The function computed is the same; only speed and memory differ."""
        fused.check_kernels(kernels)
        n = 0
        for m in self.modules():
            if hasattr(m, "kernels") and m is not self:
                m.kernels = kernels
                n += 1
        self.kernels = kernels
        return n

    def to_empty(self, *, device, recurse: bool = True) -> CausalLM:
        """``nn.Module.to_empty`` creates a new tensor per parameter slot, which unties tied
        embeddings; re-tie right away so loading or init never sees two copies."""
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    def init_plan(self, std: float = 0.02) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """``(parameter name, in-place init of the FULL tensor)`` in the order the RNG is consumed; every
        parameter once (a tied ``lm_head`` is the embedding)."""
        raise NotImplementedError

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02, *,
                     fill: Callable[[str, Callable[[torch.Tensor], torch.Tensor]], None] | None = None,
                     select: Callable[[str], bool] | None = None) -> None:
        """Run ``init_plan`` under ``torch.manual_seed(seed)``, leaving the global RNG as is. Re-ties
        embeddings first (``to_empty`` unties them). ``fill(name, init)`` applies one entry; the default
        inits this model's parameter in place. A sharded model passes one that inits the FULL tensor
        (same draws, same order) and keeps this rank's piece (``rynnscale.parallel.fsdp.init_sharded_weights``)."""
        self.tie_weights()
        plan = self.init_plan(std)
        if select is not None:  # e.g. only the LoRA adapters after loading the base: same draws on every layout
            plan = [(name, init) for name, init in plan if select(name)]
        if fill is None:
            params = dict(self.named_parameters())

            def fill(name: str, init: Callable[[torch.Tensor], torch.Tensor]) -> None:
                init(params[name])
        devices = sorted({p.device for p in self.parameters() if p.device.type not in ("cpu", "meta")}, key=str)
        with torch.random.fork_rng(devices=devices, device_type=devices[0].type if devices else "cuda"):
            torch.manual_seed(seed)
            for name, init in plan:
                fill(name, init)

    # ------------------------------------------------------------------ generation
    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``capacity`` tokens (one K/V slot per decoder
        layer); a family with other per-layer state (linear attention) overrides this."""
        return KVCache(len(self.decoder_layers()), batch_size, capacity)

    # ------------------------------------------------------------------ context parallelism, heads
    def cp_shard(self, batch: PackedBatch) -> CPShard | None:
        """This rank's ``CPShard`` of ``batch``'s row (None without context parallelism)."""
        if self.cp is None or self.cp.size == 1:
            return None
        return CPShard(self.cp.plan(batch.cu_seqlens), self.cp.rank, self.cp.group, self.cp.mode)

    def logits(self, hidden_ld: torch.Tensor) -> torch.Tensor:
        """Full logits [L, V] (tests / evaluation; training uses ``loss_sum``)."""
        return self.lm_head(hidden_ld)

    @staticmethod
    def _targets(batch: PackedBatch) -> torch.Tensor:
        """The labels shifted by one within the row: row t predicts ``labels_l[t + 1]``. The first label of
        every sample is -100 by the PackedBatch contract, so no target crosses a sample boundary (checked)."""
        labels_l = batch.labels_l
        starts = batch.cu_seqlens[1:-1].to(device=labels_l.device, dtype=torch.long)
        if starts.numel() and bool((labels_l.index_select(0, starts) != IGNORE_INDEX).any()):
            raise ValueError("PackedBatch.labels_l must be -100 at the first token of every sample "
                             f"(cu_seqlens={batch.cu_seqlens.tolist()}); a row shift would cross samples")
        return torch.cat([labels_l[1:], labels_l.new_full((1,), IGNORE_INDEX)])

    def loss_sum(self, batch: PackedBatch, output: ModelOutput, chunk_tokens: int = 4096) -> torch.Tensor:
        """Sum of next-token cross-entropy over the row (divide by the global target count yourself)."""
        targets_l = self._targets(batch)
        if output.cp is not None:  # shifted on the full row above, THEN this rank's tokens (pad: ignored)
            targets_l = output.cp.shard(targets_l, pad_value=IGNORE_INDEX)
        return self.lm_head(output.hidden_ld, targets_l, chunk_tokens)

    def token_log_probs(self, batch: PackedBatch, output: ModelOutput, chunk_tokens: int = 4096,
                        temperature: float = 1.0) -> torch.Tensor:
        """Log-probability [L] (fp32; fp64 for an fp64 model) of every labelled token given the tokens before it
        in its sample, at the token's own row (``out[t] = log p(input_ids[t] | < t)`` where ``labels_l[t] !=
        -100``; 0 elsewhere), the logits divided by ``temperature``. Fused and chunked: no [L, V] logits."""
        if output.cp is not None:
            raise NotImplementedError("per-token log-probabilities under context parallelism (parallel.cp > 1)")
        logp_l = self.lm_head(output.hidden_ld, self._targets(batch), chunk_tokens, log_probs=True,
                              temperature=temperature)
        return torch.cat([logp_l.new_zeros(1), logp_l[:-1]])   # row t - 1 predicted token t

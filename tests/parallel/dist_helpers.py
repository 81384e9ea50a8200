"""Shared pieces of the multi-process tests: a tiny MoE Qwen3-VL, deterministic packed micro-batches per
(step, rank, micro-batch), a spawner that runs a function on N gloo ranks and collects its results, and
helpers that record every rank's gradient pieces, put the full (unsharded, all-expert) gradients together
and compare tensors relative to their norm."""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rynnscale.batch import PackedBatch
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs, TextArgs, VisionArgs
from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration

IMG, VID, VS, VE = 250, 251, 252, 253
PATCH_DIM = 3 * 2 * 4 * 4  # C * temporal_patch * ps * ps


def tiny_moe_args(aux_coef: float = 0.01, num_experts: int = 8, tie: bool = True) -> Qwen3VLArgs:
    return Qwen3VLArgs(
        text=TextArgs(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, mrope_section=[1, 1, 2],
                      rope_theta=10000.0, num_experts=num_experts, num_experts_per_tok=2,
                      moe_intermediate_size=16, mlp_only_layers=[1], router_aux_loss_coef=aux_coef),
        vision=VisionArgs(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                          num_position_embeddings=16, deepstack_visual_indexes=[0], patch_size=4),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
        tie_word_embeddings=tie)


def make_model(args: Qwen3VLArgs, seed: int = 0) -> Qwen3VLForConditionalGeneration:
    model = Qwen3VLForConditionalGeneration(args, attn_backend="loop", gemm_backend="loop")
    model.init_weights(seed, std=0.1)
    return model


def _sample(gen: torch.Generator, length: int, image: bool) -> dict:
    """One sample: [VS, 4 x IMG, VE] + text when ``image`` (a 1x4x4 patch grid = 4 merged tokens)."""
    ids = torch.randint(0, 200, (length,), generator=gen)
    pix = grid = None
    if image:
        ids[1:7] = torch.tensor([VS, IMG, IMG, IMG, IMG, VE])
        pix = torch.randn(16, PATCH_DIM, generator=gen)
        grid = torch.tensor([[1, 4, 4]])
    labels = ids.clone()
    labels[: max(7, length // 3)] = -100
    return {"ids": ids, "labels": labels, "pos": torch.arange(length).expand(3, length), "pix": pix, "grid": grid}


def micro_batch(step: int, rank: int, micro: int) -> PackedBatch:
    """Deterministic packed row for (step, rank, micro-batch): 1-3 samples, uneven lengths, an image in
    some rows and not in others (so ranks without images must still run the vision tower under FSDP)."""
    gen = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    n = 1 + int(torch.randint(0, 3, (1,), generator=gen))
    with_image = (step + rank + micro) % 3 == 0
    samples = [_sample(gen, int(torch.randint(9, 24, (1,), generator=gen)), with_image and i == 0) for i in range(n)]
    lens = [s["ids"].numel() for s in samples]
    pix = [s["pix"] for s in samples if s["pix"] is not None]
    grids = [s["grid"] for s in samples if s["grid"] is not None]
    return PackedBatch(
        input_ids_l=torch.cat([s["ids"] for s in samples]), labels_l=torch.cat([s["labels"] for s in samples]),
        position_ids_3l=torch.cat([s["pos"] for s in samples], dim=1),
        cu_seqlens=torch.tensor([0] + lens).cumsum(0).to(torch.int32), max_seqlen=max(lens),
        pixel_values=torch.cat(pix) if pix else None, image_grid_thw=torch.cat(grids) if grids else None)



def prompts(rank: int, *, mrope: bool = False) -> list:
    """Rank ``rank``'s generation prompts: a text prompt and an image prompt (a 1x4x4 patch grid) of lengths that
    differ between ranks; positions are MRoPE's (``mrope``) or plain ``arange`` on all three axes."""
    from rynnscale.batch import EncodedSample
    from rynnscale.models.mrope import mrope_position_ids

    g = torch.Generator().manual_seed(50 + rank)
    out = []
    for n, image in ((5 + 3 * rank, False), (12 + rank, True)):
        ids = torch.randint(0, 200, (n,), generator=g)
        pix = grid = None
        if image:
            ids[1:7] = torch.tensor([VS, IMG, IMG, IMG, IMG, VE])
            pix, grid = torch.randn(16, PATCH_DIM, generator=g), torch.tensor([[1, 4, 4]])
        pos = (mrope_position_ids(ids, grid, None, spatial_merge_size=2, image_token_id=IMG, video_token_id=-1)
               if mrope else torch.arange(n).expand(3, n).clone())
        out.append(EncodedSample(f"p{rank}{n}", ids, torch.full_like(ids, -100), pos, pixel_values=pix,
                                 image_grid_thw=grid))
    return out

_HOSTED: list[dist.TCPStore] = []
# imported once by run_ranks' forkserver: a rank forked from it starts with them loaded instead of spending ~3-5 s
# of CPU importing them (most of a tiny rank's work; the suite starts ~50 ranks); each rank is still a new process
_RANK_PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp",
                 "torch.distributed.checkpoint", "torch._dynamo", "torch.optim", "rynnscale.models",
                 "rynnscale.parallel.mesh", "rynnscale.parallel.distributed", "rynnscale.train.step"]


def hosted_store_port() -> int:
    """Port of a fresh TCPStore server this process hosts until it exits (the kernel picks the port at bind time
    and it is never released, so no other process can take it between choosing and using, as with a bound and
    released "free" port). Ranks and torchrun agents connect to it as clients (``--rdzv-conf=is_host=0``); one
    store per job: a rendezvous must not see a previous job's keys."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=300))
    _HOSTED.append(store)
    return store.port


def _entry(rank: int, world: int, port: int, fn, out_dir: str, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result_path = Path(out_dir) / f"rank{rank}.pt"
    try:
        timeout = datetime.timedelta(seconds=120)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)   # hosted by the parent
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        result = fn(rank, world, **kwargs)
        torch.save({"ok": True, "result": result}, result_path)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, result_path)
        raise


def run_ranks(fn, world: int, tmp_path: Path, start_method: str = "forkserver", **kwargs) -> list:
    """Run ``fn(rank, world, **kwargs)`` on ``world`` new gloo rank processes; returns the per-rank results
    (``fn`` must be importable, i.e. defined at module level). Raises with the failing rank's traceback.

    ``forkserver`` (default): each rank is forked from a server that imported ``_RANK_PRELOAD`` once, so it
    starts without ~3-5 s of imports; it has the environment of the server's start, not the caller's current
    one. ``spawn``: a freshly executed interpreter that sees the caller's environment as it is now (needed for
    variables read at process start, such as glibc's ``MALLOC_*``)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if start_method == "forkserver":
        mp.set_forkserver_preload(_RANK_PRELOAD)
    try:
        mp.start_processes(_entry, args=(world, hosted_store_port(), fn, str(tmp_path), kwargs), nprocs=world,
                           join=True, start_method=start_method)
    except Exception as e:
        errors = []
        for r in range(world):
            p = tmp_path / f"rank{r}.pt"
            if p.exists():
                rec = torch.load(p, weights_only=False)
                if not rec["ok"]:
                    errors.append(f"rank {r}:\n{rec['error']}")
        raise RuntimeError("\n".join(errors) or str(e)) from e
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["result"] for r in range(world)]


# ------------------------------------------------------------------ full gradients and norm-relative checks
@torch.no_grad()
def local_grad_pieces(model: torch.nn.Module) -> dict[str, tuple | None]:
    """This rank's piece of every parameter's gradient: plain name -> ``(local tensor (CPU copy), lo, hi,
    full_rows)``: rows ``[lo, hi)`` of the FULL tensor (unsharded, all experts), as the library's
    ``local_pieces`` places the parameter itself (FSDP2 Shard(0) rows, EP expert offset); None where a
    parameter has no gradient. No collectives (a gloo collective per tensor per step costs more than the
    tiny model's step on a busy CPU): ``assemble_full`` puts the pieces of all ranks together."""
    from torch.distributed.tensor import DTensor

    from rynnscale.parallel.fqn import clean_fqn
    from rynnscale.parallel.fsdp import local_pieces

    where = local_pieces(model)
    out = {}
    for name, p in model.named_parameters():
        key, g = clean_fqn(name), p.grad
        if g is None:
            out[key] = None
            continue
        local = g.to_local() if isinstance(g, DTensor) else g
        piece = where[name]
        out[key] = (local.detach().cpu().clone(), piece.lo, piece.hi, piece.full_shape[0] if piece.full_shape else 1)
    return out


def assemble_full(per_rank: list[dict]) -> dict[str, torch.Tensor | None]:
    """Full tensors from the ``local_grad_pieces`` of all ranks (FSDP shards and EP experts placed at
    their rows). Every row must be covered; rows held by several ranks (replicas) must be identical."""
    keys = set(per_rank[0])
    assert all(set(p) == keys for p in per_rank), "ranks report different parameter names"
    out = {}
    for key in per_rank[0]:
        pieces = [p[key] for p in per_rank]
        if all(x is None for x in pieces):
            out[key] = None
            continue
        assert all(x is not None for x in pieces), f"{key}: a gradient on some ranks only"
        rows = pieces[0][3]
        full = pieces[0][0].new_zeros((rows, *pieces[0][0].shape[1:]))
        covered = torch.zeros(rows, dtype=torch.bool)
        for r, (local, lo, hi, n) in enumerate(pieces):
            assert n == rows and local.shape[0] == hi - lo, f"{key}: rank {r} rows [{lo}, {hi}) of {n}"
            seen = covered[lo:hi]
            assert torch.equal(full[lo:hi][seen], local[seen]), f"{key}: replicas differ (rank {r})"
            full[lo:hi], covered[lo:hi] = local, True
        assert covered.all(), f"{key}: rows {torch.nonzero(~covered).flatten().tolist()} held by no rank"
        out[key] = full
    return out


class GradRecordingOptimizer:
    """Stands in for the optimiser given to ``train_step``: ``step()`` first appends this rank's gradient
    pieces (``local_grad_pieces``, i.e. after accumulation, reduction and clipping) to ``self.grads``,
    then steps the real optimiser. Full tensors: ``assemble_full`` over the ranks' ``grads[step]``."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module):
        self.optimizer, self.model = optimizer, model
        self.grads: list[dict[str, tuple | None]] = []

    def step(self) -> None:
        self.grads.append(local_grad_pieces(self.model))
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name):  # param_groups, state, state_dict, ...
        return getattr(self.optimizer, name)


def norm_relative_errors(got: dict, want: dict, zero_floor: float) -> dict[str, float]:
    """Per key ``max|got - want| / ||want||`` (Frobenius norm of the reference tensor); where the reference
    is exactly zero the denominator is the absolute ``zero_floor`` instead. Keys must match exactly and
    no tensor may be None (a missing gradient) on either side."""
    assert set(got) == set(want), f"names differ: only got {sorted(set(got) - set(want))}, " \
                                  f"only reference {sorted(set(want) - set(got))}"
    missing = sorted(k for k in want if got[k] is None or want[k] is None)
    assert not missing, f"no gradient for {missing}"
    out = {}
    for key, ref in want.items():
        a, b = got[key].double(), ref.double()
        assert a.shape == b.shape, f"{key}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        scale = float(b.norm())
        out[key] = float((a - b).abs().max()) / (scale if scale > 0 else zero_floor) if b.numel() else 0.0
    return out


def reference_step(model, optimizer, step: int, world: int, micro: int, batch_fn=None, **step_kw):
    """One single-process step standing in for ``world`` ranks (sample streams) x ``micro`` micro-batches:
    gradient accumulation over all of them (rank-major), each forward's load-balancing counts replaced by
    the global counts of its micro-batch index (what the ranks' all-reduce yields). ``batch_fn(step, rank,
    micro)`` makes the rows (default ``micro_batch``)."""
    from rynnscale.parallel.distributed import DistContext
    from rynnscale.train.step import train_step

    batch_fn = batch_fn or micro_batch
    rows = [[batch_fn(step, r, m) for m in range(micro)] for r in range(world)]
    ctx = DistContext()
    if model.args.text.is_moe:
        with torch.no_grad():
            glob = [sum(model(rows[r][m]).expert_counts for r in range(world)) for m in range(micro)]
        calls = iter(range(world * micro))
        ctx.counts_reducer = lambda c: glob[next(calls) % micro]
    return train_step(model, optimizer, [b for rank_rows in rows for b in rank_rows], ctx=ctx, **step_kw)

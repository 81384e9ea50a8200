"""A small, real training loop around rynnscale's checkpoint manager, run by the checkpoint tests.

Used in-process (``run``) and as a script, one process per rank (``launch``: gloo, env:// rendezvous).
Tiny Qwen3-VL-MoE (3-D expert tensors, vision tower that gets no gradient on text-only rows), AdamW
with weight decay + LambdaLR warmup/cosine, gradient clipping; optionally FSDP2 ``fully_shard`` per
decoder layer + root. Each step's batch is drawn from python ``random`` (lengths), numpy (loss masks) and
torch (token ids) global generators, and the loop's position is the "loader" per-rank state, so exact
continuation needs the RNG and per-rank state restored, not only the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rynnscale.batch import PackedBatch  # noqa: E402
from rynnscale.checkpoint import dcp as ckpt_dcp  # noqa: E402
from rynnscale.checkpoint.dcp import CheckpointManager  # noqa: E402
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs  # noqa: E402
from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration  # noqa: E402

VOCAB = 512


def tiny_hf_config(num_experts: int = 4, layers: int = 2, hidden: int = 32, vocab: int = VOCAB,
                   inter: int = 64, tie: bool = False) -> dict:
    text = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 8, "num_key_value_heads": 2, "head_dim": 8,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                "mrope_interleaved": True}}
    if num_experts:
        text.update(num_experts=num_experts, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[0],
                    router_aux_loss_coef=0.01)
    return {"model_type": "qwen3_vl_moe" if num_experts else "qwen3_vl", "text_config": text,
            "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                              "out_hidden_size": hidden, "num_position_embeddings": 16,
                              "deepstack_visual_indexes": [0]},
            "image_token_id": vocab - 6, "video_token_id": vocab - 5, "vision_start_token_id": vocab - 4,
            "vision_end_token_id": vocab - 3, "tie_word_embeddings": tie}


def build_model(hf_config: dict, seed: int = 0) -> Qwen3VLForConditionalGeneration:
    model = Qwen3VLForConditionalGeneration(Qwen3VLArgs.from_hf_config(hf_config), attn_backend="loop")
    model.init_weights(seed)
    return model


def shard(model: torch.nn.Module, world: int) -> None:
    """FSDP2 over all ranks: each decoder layer, then the root (embeddings, vision tower, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def build_optim(model: torch.nn.Module, total_steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), foreach=True)

    def factor(s: int) -> float:
        return (s + 1) / 2 if s < 2 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / max(1, total_steps - 2)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def draw_batch() -> PackedBatch:
    """Two text samples from the global python / numpy / torch generators."""
    lens = [random.randint(5, 12) for _ in range(2)]
    ids, labels, pos = [], [], []
    for n in lens:
        x = torch.randint(0, VOCAB - 8, (n,))
        lab = x.clone()
        lab[torch.from_numpy(np.random.rand(n) < 0.3)] = -100
        lab[0] = -100
        ids.append(x)
        labels.append(lab)
        pos.append(torch.arange(n).expand(3, n))
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    return PackedBatch(input_ids_l=torch.cat(ids), labels_l=torch.cat(labels),
                       position_ids_3l=torch.cat(pos, dim=1), cu_seqlens=cu, max_seqlen=max(lens))


def train_step(model, opt, sched) -> float:
    batch = draw_batch()
    out = model(batch)
    n = batch.num_target_tokens
    loss = model.loss_sum(batch, out, 64) / max(n, 1) + out.aux_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def full_state(model, opt) -> tuple[dict[str, torch.Tensor], list]:
    """Unsharded model + optimiser tensors (flat names) and the optimiser param_groups (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    flat = {f"model.{k}": v.detach().clone() for k, v in msd.items()}
    if "state" not in osd:   # full state dicts with cpu_offload live on rank 0 only
        return flat, []
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            flat[f"optim.{fqn}.{k}"] = (v if isinstance(v, torch.Tensor) else torch.tensor(v)).detach().clone()
    groups = [{k: v for k, v in g.items()} for g in osd["param_groups"]]
    return flat, groups


def seed_rank(rank: int) -> None:
    random.seed(1000 + rank)
    np.random.seed(2000 + rank)
    torch.manual_seed(3000 + rank)


def run(out: Path, total: int, *, save_at: tuple[int, ...] = (), resume: str | None = None, fsdp: bool = False,
        crash_at: int | None = None, dump_at: int | None = None,
        keep_last: int = 2, hf_config: dict | None = None) -> dict[int, str]:
    """Train steps [start, total) and return {step: loss.hex()}; see the flags in ``main``."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    hf_config = hf_config or tiny_hf_config()
    seed_rank(rank)
    model = build_model(hf_config)
    if fsdp:
        shard(model, world)
    opt, sched = build_optim(model, total)
    layout = {"dp_shard": world, "ep": 1, "fsdp": bool(fsdp)}
    mgr = CheckpointManager(out, keep_last=keep_last)
    start, drawn = 0, 0
    if resume is not None:
        rs = mgr.load(resume, model, opt, sched, layout=layout)
        start = rs.step
        if rs.per_rank is not None:
            drawn = rs.per_rank["batches_drawn"]
            assert drawn == start, (drawn, start)
    if crash_at is not None:
        real_commit = ckpt_dcp._commit

        def crashing_commit(tmp, final, complete):
            if complete["step"] == crash_at:
                os._exit(17)   # a kill between the DCP write and the rename: nothing else runs
            real_commit(tmp, final, complete)
        ckpt_dcp._commit = crashing_commit
    losses = {}
    for step in range(start, total):
        losses[step + 1] = train_step(model, opt, sched).hex()
        drawn += 1
        if step + 1 in save_at:
            mgr.save(step + 1, model, opt, sched, tokens_seen=100 * (step + 1), layout=layout,
                     model_config=hf_config, per_rank_state={"batches_drawn": drawn})
        if dump_at == step + 1:
            flat, groups = full_state(model, opt)
            if rank == 0:
                from safetensors.torch import save_file
                save_file({k: v.contiguous() for k, v in flat.items()}, str(out / f"full_{step + 1}.safetensors"))
                (out / f"full_{step + 1}.groups.json").write_text(json.dumps(groups))
    return losses


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--total", type=int, required=True)
    p.add_argument("--save-at", type=int, nargs="*", default=[])
    p.add_argument("--resume")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--crash-at", type=int)
    p.add_argument("--dump-at", type=int)
    p.add_argument("--losses", type=Path, help="write {step: loss hex} of this rank to <losses>.rank<r>.json")
    a = p.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    import torch.distributed as dist
    if world > 1:   # the store is hosted by ``launch`` (no rank binds a port)
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
        dist.init_process_group("gloo", store=store, rank=int(os.environ["RANK"]), world_size=world)
    losses = run(a.out, a.total, save_at=tuple(a.save_at), resume=a.resume, fsdp=a.fsdp, crash_at=a.crash_at,
                 dump_at=a.dump_at)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if a.losses:
        Path(f"{a.losses}.rank{rank}.json").write_text(json.dumps(losses))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gated_async_save(monkeypatch, gate):
    """Make DCP's background write finish only once ``gate`` (a threading.Event) is set: a slow save, as at scale."""
    import threading
    from concurrent.futures import Future

    real = ckpt_dcp.dcp.async_save

    def slow(*args, **kwargs):
        inner, outer = real(*args, **kwargs), Future()

        def finish():
            gate.wait(30)
            try:
                outer.set_result(inner.result())
            except BaseException as e:   # noqa: BLE001
                outer.set_exception(e)
        threading.Thread(target=finish, daemon=True).start()
        return outer
    monkeypatch.setattr(ckpt_dcp.dcp, "async_save", slow)


def launch(world: int, argv: list[str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Run this script as ``world`` ranks (gloo over 127.0.0.1, on a TCPStore this process hosts for the job:
    its port is bound once and held, never chosen and released); returns the finished processes."""
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    port = store.port
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for pr in procs:
            out, err = pr.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(pr.args, pr.returncode, out, err))
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait()
    return done


if __name__ == "__main__":
    main()

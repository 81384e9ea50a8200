"""The loader's fast path (estimate -> pack -> prepare -> finish into one pack buffer) gives batches
byte-identical to the eager path (encode every sample, pack, concatenate), holds no decoded pixels in
the packing window, and puts worker pack buffers in shared memory. Batches carry raw uint8 pixels
plus the encoder's ``pixel_norm``; normalising them gives the encoder's float32 pixels bitwise."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from rynnscale.batch import PackedBatch
from rynnscale.data.encode import SampleEncoder
from rynnscale.data.loader import LoaderConfig, SplitLoader, TrainLoader, _expand_sources
from rynnscale.data.packing import build_packed_batch
from rynnscale.data.reader import iter_tar_samples
from rynnscale.data.tokenizer import load_tokenizer
from rynnscale.data.worker import SplitPipeline, pixel_buffer


class EagerOnly:
    """The real encoder behind an ``encode``-only interface: the loader then encodes every sample
    on arrival and concatenates packs (the path every batch went through before the fast path)."""

    def __init__(self, enc: SampleEncoder):
        self.enc = enc

    def encode(self, key: str, members: dict[str, bytes]):
        return self.enc.encode(key, members, normalize=False)


def _jpeg(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """24 synthetic video samples; a second shard mixes image-only, image+video and text-only samples."""
    from rynnscale.data_pipelines.synthetic import generate_synthetic

    d = tmp_path_factory.mktemp("fastpath")
    generate_synthetic(d, 24, seed=3, samples_per_shard=6, progress=False)
    video = next(iter(iter_tar_samples(str(d / "synthetic-000000.tar")))).members["video.mp4"]
    with wds.TarWriter(str(d / "mixed-000.tar")) as w:
        for i in range(12):
            content = [{"type": "text", "text": f"describe {i}"}]
            members = {}
            if i % 3 != 2:
                content.insert(0, {"type": "image", "image": "f000.jpg"})
                members["f000.jpg"] = _jpeg(64 + 32 * (i % 2), 96, i)
            if i % 3 == 1:
                content.append({"type": "video", "video": "video.mp4"})
                members["video.mp4"] = video
            conv = [{"role": "user", "content": content}, {"role": "assistant", "content": f"answer {i} " * (i + 1)}]
            w.write({"__key__": f"mixed-{i:02d}", "conv.json": json.dumps({"conversation": conv}).encode(),
                     **members})
    return [str(d / "*.tar")]


@pytest.fixture(scope="module")
def enc() -> SampleEncoder:
    return SampleEncoder(load_tokenizer())


def _tensors(b: PackedBatch) -> dict:
    return {k: v for k, v in vars(b).items()}


def _assert_same(a: list[PackedBatch], b: list[PackedBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k, v in _tensors(x).items():
            w = getattr(y, k)
            if isinstance(v, torch.Tensor):
                assert v.dtype == w.dtype and v.shape == w.shape and torch.equal(v, w), k
            else:
                assert v == w, k


def _batches(loader) -> list:
    return [b for x in loader for b in (x.micro_batches if isinstance(loader, TrainLoader) else [x])]


@pytest.mark.parametrize("workers,ws,loader_cls", [(0, 1, SplitLoader), (1, 1, SplitLoader), (0, 2, TrainLoader)])
def test_fast_path_batches_equal_eager_path(shards, enc, workers: int, ws: int, loader_cls) -> None:
    torch.manual_seed(0)
    for rank in range(ws):
        cfg = LoaderConfig(train_shards=shards, seed=7, micro_batch_tokens=900, pack_window=5, shuffle_buffer=4,
                           num_workers=workers, num_epochs=1)
        fast_loader = loader_cls(cfg, enc, rank=rank, world_size=ws)
        fast = _batches(fast_loader)
        eager = _batches(loader_cls(cfg, EagerOnly(enc), rank=rank, world_size=ws))
        _assert_same(fast, eager)
        assert fast_loader.stats()["estimate_overflow"] == 0 and fast_loader.bad_counts == {}
        kinds = {(b.pixel_values is not None, b.pixel_values_videos is not None) for b in fast}
        assert (True, True) in kinds or ws == 2  # packs mixing images and videos went through the buffers
        for b in (b for b in fast if not b.filler):
            assert b.pixel_norm == enc.spec.pixel_norm
            for pv in (b.pixel_values, b.pixel_values_videos):
                assert pv is None or pv.dtype == torch.uint8
    if ws == 1:
        assert sum(b.num_samples for b in fast) == 36


def test_window_holds_no_decoded_pixels_and_resume_matches(shards, enc) -> None:
    """Packer items and pending packs keep only compressed members, and a state saved mid-stream
    resumes to the same batches."""
    torch.manual_seed(0)
    cfg = LoaderConfig(train_shards=shards, seed=1, micro_batch_tokens=900, pack_window=6, shuffle_buffer=4,
                       num_epochs=1)
    pipe = SplitPipeline(cfg, enc, None, _expand_sources(cfg), 0, 1, 0, 0, None)
    it = iter(pipe)
    out, states = [], []
    for _ in range(3):
        b, st = next(it)
        out.append(b)
        states.append(st)
        assert pipe.packer.items and all(x.ref.encoded is None and x.ref.prepared is None for x in pipe.packer.items)
        assert all(x.ref.prepared is None and x.ref.encoded is None for p in pipe.pending for x in p)
    rest = [b for b, _ in it if b is not None]   # the last item: (None, the final counts)
    again = SplitPipeline(cfg, enc, None, _expand_sources(cfg), 0, 1, 0, 0, states[0])
    _assert_same([b for b, _ in again if b is not None], out[1:] + rest)


def test_build_packed_batch_uses_the_pack_buffer_only_when_samples_fill_it(enc, shards) -> None:
    torch.manual_seed(0)
    raws = [s for s in iter_tar_samples(shards[0].replace("*.tar", "synthetic-000000.tar"))][:3]
    prepared = [enc.prepare(s.key, s.members) for s in raws]
    rows = [p.patches("video") for p in prepared]
    buf = pixel_buffer(sum(rows), prepared[0].pixel_dim, shared=False)
    samples, r0 = [], 0
    for p, n in zip(prepared, rows):
        samples.append(enc.finish(p, pixel_values_videos_out=buf[r0:r0 + n], normalize=False))
        r0 += n
    b = build_packed_batch(samples, pixel_values_videos=buf)
    assert b.pixel_values_videos is buf
    ref = build_packed_batch([enc.encode(s.key, s.members, normalize=False) for s in raws])
    _assert_same([b], [ref])
    assert b.pixel_values_videos.dtype == torch.uint8 and b.pixel_norm == enc.spec.pixel_norm
    # raw + pixel_norm is bitwise the normalised float32 the encoder gives by default (HF's pixel_values)
    floats = build_packed_batch([enc.encode(s.key, s.members) for s in raws])
    assert floats.pixel_norm is None and floats.pixel_values_videos.dtype == torch.float32
    assert torch.equal(b.pixel_norm.normalize(b.pixel_values_videos), floats.pixel_values_videos)
    with pytest.raises(ValueError, match="mixes raw uint8 and normalised float"):
        build_packed_batch([samples[0], enc.encode(raws[1].key, raws[1].members)])
    with pytest.raises(ValueError, match="is not rows"):
        build_packed_batch(samples[::-1], pixel_values_videos=buf)
    with pytest.raises(ValueError, match="pack buffer has"):
        build_packed_batch(samples[:2], pixel_values_videos=buf)
    with pytest.raises(ValueError, match="pixel buffer must be"):
        enc.finish(prepared[0], pixel_values_videos_out=buf[:1], normalize=False)
    with pytest.raises(ValueError, match="pixel buffer must be a contiguous torch.uint8"):
        enc.finish(prepared[0], pixel_values_videos_out=buf[:rows[0]].float(), normalize=False)
    shm = pixel_buffer(4, 6, shared=True)
    assert shm.is_shared() and shm.shape == (4, 6) and shm.dtype == torch.uint8 and shm.is_contiguous()
    shm[:] = 7  # the whole allocation is addressable (storage sized in bytes of the dtype)
    shm32 = pixel_buffer(4, 6, shared=True, dtype=torch.float32)
    assert shm32.is_shared() and shm32.dtype == torch.float32 and shm32.untyped_storage().nbytes() == 96


def test_tune_malloc_config_key() -> None:
    from rynnscale.config.schema import RootConfig

    rc = RootConfig()
    assert LoaderConfig.from_run_config(rc).tune_malloc is True
    rc.data.tune_malloc = False
    assert LoaderConfig.from_run_config(rc).tune_malloc is False

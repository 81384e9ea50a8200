"""bench/data_throughput.py's breakdown times the same work the loader does: its video decode is the call
``SampleEncoder.encode`` makes (same sampling, limits, threads, resize-as-decoded, channel-planar output).
A plain ``decode_frames`` cost 2-4 ms more per clip than encode's own decode, which made "rest of encode"
negative and the "decode excluded" ratio absurd (37x)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.bench.bench_scripts import load_bench_script

pytest.importorskip("av")

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    return load_bench_script("data_throughput")


def test_breakdown_decodes_as_encode_does(monkeypatch):
    from rynnscale.data import encode as encode_mod
    from rynnscale.data import video as video_mod
    from rynnscale.data.encode import EncoderConfig, SampleEncoder
    from rynnscale.data.tokenizer import load_tokenizer
    from rynnscale.data_pipelines.synthetic import synthetic_sample

    calls: list[dict] = []
    real = video_mod.decode_frames

    def recording(data, *a, **kw):
        dv = real(data, *a, **kw)
        calls.append(dict(kw, resize_to=kw["resize_to"](16, 480, 640) if kw.get("resize_to") else None,
                          shape=tuple(dv.frames_thwc.shape), strides=dv.frames_thwc.strides))
        return dv

    monkeypatch.setattr(encode_mod, "decode_frames", recording)
    monkeypatch.setattr(video_mod, "decode_frames", recording)
    enc = SampleEncoder(load_tokenizer(None), EncoderConfig(fps=2.0))
    key, members = synthetic_sample(0, seed=3, frames=8, width=96, height=64)
    sample = enc.encode(key, members, normalize=False)
    video = next(v for k, v in members.items() if k.endswith(".mp4"))
    bench = _load_bench()
    dv = bench.decode_as_encoder(enc, video)
    assert len(calls) == 2
    assert calls[1] == calls[0]
    # and the preprocess part patchifies those planar frames as encode does, to the same patches
    assert torch.equal(bench.preprocess_as_encoder(enc, dv), sample.pixel_values_videos)


def test_breakdown_preprocess_reads_the_planar_frames_without_a_packed_copy(monkeypatch):
    """preprocess_video copies channel-planar frames to packed RGB first (np.ascontiguousarray: ~15 ms of a
    clip's ~25 ms 'preprocess' that encode never spends, so 'rest of encode' came out at -23 ms)."""
    import numpy as np

    from rynnscale.data.encode import EncoderConfig, SampleEncoder
    from rynnscale.data.tokenizer import load_tokenizer
    from rynnscale.data_pipelines.synthetic import synthetic_sample

    enc = SampleEncoder(load_tokenizer(None), EncoderConfig(fps=2.0))
    _, members = synthetic_sample(0, seed=3, frames=8, width=96, height=64)
    bench = _load_bench()
    dv = bench.decode_as_encoder(enc, members["video.mp4"])
    assert not dv.frames_thwc.flags.c_contiguous   # the planar view encode patchifies from
    copies = []
    real = np.ascontiguousarray
    monkeypatch.setattr(np, "ascontiguousarray", lambda a, *k, **kw: copies.append(a.shape) or real(a, *k, **kw))
    bench.preprocess_as_encoder(enc, dv)
    assert copies == []

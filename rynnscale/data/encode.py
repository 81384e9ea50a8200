"""One webdataset sample (``conv.json`` + media members) -> :class:`EncodedSample`.

The conversation is rendered like the model's chat template (``DataContract.chat_template``), token for token.
Qwen3-VL-Instruct's ("qwen3_vl"):

    <|im_start|>system\\n{text}<|im_end|>\\n            (only if the first message is a system one)
    <|im_start|>user\\n{text | media ...}<|im_end|>\\n
    <|im_start|>assistant\\n{text}<|im_end|>\\n

Qwen3.5's ("qwen3_5", the template its checkpoints ship): the same turns, each message's content stripped of
white space at its two ends (jinja's ``|trim``), and every assistant turn after the last user query opens with
its reasoning, ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}`` (an empty block when it has none). The
reasoning is the message's ``reasoning_content`` string, else the text before ``</think>`` in its content; earlier
assistant turns keep only their answer. Of the block, the reasoning and its ``\\n</think>\\n\\n`` are labelled
when there is reasoning and nothing of it when there is none, so a prompt cut at the first labelled token ends as
the template's generation prompt does: ``<think>\\n`` (thinking) or ``<think>\\n\\n</think>\\n\\n`` (not).

An image becomes ``<|vision_start|><|image_pad|>*n<|vision_end|>``. A video becomes what
transformers' ``Qwen3VLProcessor`` makes of the template's ``<|vision_start|><|video_pad|><|vision_end|>``:
the single pad is replaced by, per temporal patch, ``<{t:.1f} seconds>`` +
``<|vision_start|><|video_pad|>*n<|vision_end|>``, so the template's OUTER start/end tokens stay
around the whole thing (a transformers quirk the Qwen3-VL checkpoints were trained with; we match it).

Labels (HF convention, unshifted): the assistant's content tokens (and reasoning, above) and its ``<|im_end|>``;
all else is -100, so the first token of a sample is always -100. Media are decoded, sized and counted
first; the expensive patchify runs only for media that survive the length check / truncation,
and writes straight into the sample's one ``pixel_values`` tensor (no concatenation copy).

Pixels: ``normalize=True`` (the default of :meth:`SampleEncoder.encode` / ``finish``) gives float32
normalised patches, exactly HF's ``pixel_values`` (one sample for evaluation, generation, oracle
tests); ``normalize=False`` gives raw uint8 patches plus ``pixel_norm`` (the training loader: 4x
less memory and transfer, the model normalises on its device; bitwise the same model input).

Errors are :class:`SampleError` with a ``reason`` from :data:`REASONS` and the sample key, so the
loader can skip the sample and count it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property, partial
from typing import Any

import numpy as np
import torch

from rynnscale.batch import IGNORE_INDEX, EncodedSample
from rynnscale.data.schema import SchemaError, parse_json, validate_member_name
from rynnscale.data.tokenizer import (
    BudgetTokenizer,
    TextTokens,
    VisionTokenIds,
    as_rust_tokenizer,
    tokenizer_fingerprint,
)
from rynnscale.data.video import VideoError, VideoLimits, decode_frames, probe_video, sample_frame_indices
from rynnscale.data.vision_preprocess import (
    ImageError,
    VisionSpec,
    as_uint8_tensor,
    decode_image,
    format_timestamp,
    image_size,
    image_target_size,
    patch_times,
    patchify,
    resize_thwc,
    video_target_size,
)
from rynnscale.models.mrope import mrope_position_ids
from rynnscale.models.spec import DataContract

#: Why a sample was rejected (the loader counts by these).
REASONS = (
    "bad_json",            # conv.json / meta.json is not valid UTF-8 JSON
    "missing_member",      # conv.json, or a media member it names, is not in the sample
    "unsafe_path",         # a media reference is not a plain member name (path traversal, ...)
    "bad_conversation",    # structure / roles / item types wrong, no assistant turn, special tokens in text
    "undecodable_image",
    "undecodable_video",
    "too_large",           # byte / frame / pixel / media-count limits
    "too_long",            # more tokens than max_tokens (and truncate is off, or nothing trainable is left)
    "media_unsupported",   # an image / video for a model without a vision tower
)


class SampleError(Exception):
    """A sample that cannot be used. ``reason`` is one of :data:`REASONS`; ``key`` names the sample."""

    def __init__(self, reason: str, key: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown SampleError reason {reason!r}; allowed: {REASONS}")
        super().__init__(f"sample {key!r}: {reason}: {detail}")
        self.reason = reason
        self.key = key
        self.detail = detail


@dataclass
class EncoderConfig:
    """How samples are decoded, preprocessed and tokenised (defaults: Qwen3-VL checkpoint settings).

    ``vision``: the processor's patching and pixel bounds (``VisionSpec``: pixel COUNTS, HF's ``shortest_edge``
    / ``longest_edge``; video bounds count all frames of a clip together). ``frames_fps`` is the frame rate
    assumed for frame-list videos when neither the conv item (``"fps"``) nor ``meta.json`` (``video.fps``, else
    top-level ``fps`` / ``video_fps`` / ``frames_fps``) gives one; None means "already sampled at ``fps``"."""

    vision: VisionSpec = field(default_factory=VisionSpec)
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    max_tokens: int = 16384
    truncate: bool = False
    frames_fps: float | None = None
    # limits on untrusted input
    max_media_bytes: int = 1 << 30      # one media member
    max_json_bytes: int = 16 << 20      # conv.json / meta.json
    max_frame_pixels: int = 4096 * 4096  # one decoded image / frame, before resizing
    max_total_frames: int = 200_000     # frames in one video container / frame list
    max_media: int = 256                # media items in one sample
    decode_method: str = "auto"         # video decode: auto (seek, falling back) | seek | sequential
    decode_threads: int = 1

    def size_settings(self) -> dict:
        """The settings that decide a sample's token and vision-patch counts, as ``asdict`` spells them (what
        a manifest's cost hints depend on, the tokenizer aside): the vision bounds and patching, frame rate and
        frame counts; pixel normalisation, input limits and the token budget (a hint over it is measured
        anyway) left out."""
        vision = {k: v for k, v in asdict(self.vision).items() if k not in ("image_mean", "image_std", "rescale_factor")}
        return {"vision": vision, "fps": self.fps, "min_frames": self.min_frames, "max_frames": self.max_frames,
                "frames_fps": self.frames_fps}

    def validate(self) -> None:
        def need(ok: bool, key: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"EncoderConfig.{key}={getattr(self, key)!r} is invalid: {rule}")
        self.vision.validate("EncoderConfig.vision")
        for k in ("min_frames", "max_frames", "max_tokens", "max_media_bytes", "max_json_bytes", "max_frame_pixels",
                  "max_total_frames", "max_media"):
            need(isinstance(getattr(self, k), int) and getattr(self, k) > 0, k, "must be a positive int")
        need(self.min_frames <= self.max_frames, "min_frames", "must be <= max_frames")
        need(math.isfinite(self.fps) and self.fps > 0, "fps", "must be > 0")
        need(self.frames_fps is None or (math.isfinite(self.frames_fps) and self.frames_fps > 0), "frames_fps",
             "must be None or > 0")
        need(self.decode_method in ("auto", "seek", "sequential"), "decode_method", "allowed: auto, seek, sequential")


# ----------------------------------------------------------------------------- internals
@dataclass
class _Media:
    """A decoded media item waiting for patchify (uint8 frames, target size known)."""

    kind: str                       # "image" | "video"
    frames_thwc: torch.Tensor | None  # uint8 [T, H, W, 3] (T = 1 for images); None when only estimated
    size_hw: tuple[int, int]
    grid_thw: tuple[int, int, int]
    patch_times_s: list[float] | None = None


@dataclass
class _Render:
    """Rendered sample before tokenisation: a list of pieces."""

    # ("text", str, labeled) | ("special", id, labeled) | ("media", index)
    pieces: list[tuple] = field(default_factory=list)

    def text(self, s: str, labeled: bool = False) -> None:
        if s:
            self.pieces.append(("text", s, labeled))

    def special(self, tid: int, labeled: bool = False) -> None:
        self.pieces.append(("special", tid, labeled))


_ROLES = ("system", "user", "assistant")
#: Chat templates a conversation can be rendered with (module docstring).
CHAT_TEMPLATES = ("qwen3_vl", "qwen3_5")
_MIN_FPS, _MAX_FPS = 1e-6, 1e6   # frame-list rates outside are data errors (a frame every 11 days .. 1 MHz)
_META_FPS_KEYS = ("fps", "video_fps", "frames_fps")


def _last_user_query(key: str, messages: list[dict]) -> int:
    """Index of the last user message that is not a ``<tool_response>`` (Qwen3.5's template: ``last_query_index``)."""
    for i in reversed(range(len(messages))):
        m = messages[i]
        if m["role"] != "user":
            continue
        c = m["content"]
        items = c if isinstance(c, list) else [{"text": c}]
        text = "".join(_item_text(it) for it in items).strip()
        if not (text.startswith("<tool_response>") and text.endswith("</tool_response>")):
            return i
    raise SampleError("bad_conversation", key, "no user message: Qwen3.5's chat template needs a user query")


def _item_text(item: Any) -> str:
    """A content item's text as the template renders it, a media item as its first token (enough for a
    ``startswith`` / ``endswith`` test)."""
    if not isinstance(item, dict):
        return ""
    if item.get("type") in ("image", "video") or "image" in item or "video" in item:
        return "<|vision_start|>"
    return item["text"] if isinstance(item.get("text"), str) else ""


def _trim_pieces(pieces: list[tuple], start: int) -> None:
    """jinja's ``|trim`` of the content rendered into ``pieces[start:]``: white space stripped off its two ends
    (text pieces only: a media item ends the strip)."""
    while start < len(pieces) and pieces[start][0] == "text":
        s = pieces[start][1].lstrip()
        if s:
            pieces[start] = ("text", s, pieces[start][2])
            break
        del pieces[start]
    while len(pieces) > start and pieces[-1][0] == "text":
        s = pieces[-1][1].rstrip()
        if s:
            pieces[-1] = ("text", s, pieces[-1][2])
            break
        pieces.pop()


def _render_qwen35_answer(r: _Render, text: str, reasoning_content: Any, think: bool) -> bool:
    """An assistant turn's content as Qwen3.5's template renders it (module docstring); whether anything of it is
    labelled text that is not blank."""
    content = text.strip()
    reasoning = reasoning_content if isinstance(reasoning_content, str) else ""
    if not isinstance(reasoning_content, str) and "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
    reasoning = reasoning.strip() if think else ""
    if think:
        r.text("<think>\n")
        if reasoning:
            r.text(reasoning + "\n</think>\n\n", labeled=True)
        else:
            r.text("\n</think>\n\n")
    r.text(content, labeled=True)
    return bool(content or reasoning)


@dataclass
class PreparedSample:
    """A sample decoded (uint8 frames) and tokenised, pixels not patchified yet: the first half of
    :meth:`SampleEncoder.encode`. Its exact sizes are known, so a packer can allocate one pixel
    buffer for a whole pack and :meth:`SampleEncoder.finish` each sample into a slice of it."""

    key: str
    input_ids: np.ndarray               # int64 [L]
    labels: np.ndarray                  # int64 [L]
    media: list[_Media]
    pixel_dim: int                      # columns of the pixel tensors: C * temporal_patch * patch**2

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def patches(self, kind: str) -> int:
        """Rows of ``pixel_values`` (kind "image") or ``pixel_values_videos`` ("video")."""
        return sum(m.grid_thw[0] * m.grid_thw[1] * m.grid_thw[2] for m in self.media if m.kind == kind)

    @property
    def num_vision_patches(self) -> int:
        return self.patches("image") + self.patches("video")


class SampleEncoder:
    """Decodes, preprocesses and tokenises one webdataset sample into an :class:`EncodedSample`.

    ``encode`` = ``finish(prepare(...))``; the loader uses the two halves to write pixels straight
    into a pack's buffer, and ``estimate`` to pack before decoding anything."""

    def __init__(self, tokenizer: Any, cfg: EncoderConfig | None = None,
                 token_ids: VisionTokenIds | DataContract | None = None):
        """``token_ids``: the model's ``DataContract`` (its family's: vision token ids, patching, position
        ids), or bare ``VisionTokenIds`` / None (the tokenizer's ids) with Qwen3-VL's MRoPE positions."""
        self.cfg = cfg or EncoderConfig()
        self.cfg.validate()
        self.tok = as_rust_tokenizer(tokenizer)
        self.spec = self.cfg.vision
        self.text_only = False
        self.chat_template = "qwen3_vl"
        if isinstance(token_ids, DataContract):
            contract, self.text_only = token_ids, token_ids.vision is None
            if contract.chat_template not in CHAT_TEMPLATES:
                raise ValueError(f"DataContract.chat_template={contract.chat_template!r} is not one of "
                                 f"{CHAT_TEMPLATES}")
            self.chat_template = contract.chat_template
            for k in ("patch_size", "temporal_patch_size", "merge_size"):
                if not self.text_only and getattr(contract.vision, k) != getattr(self.spec, k):
                    raise ValueError(f"EncoderConfig.vision.{k}={getattr(self.spec, k)} but the model's {k} is "
                                     f"{getattr(contract.vision, k)}")
            chat = VisionTokenIds.from_tokenizer(self.tok)
            token_ids = VisionTokenIds(image_pad=contract.image_token_id, video_pad=contract.video_token_id,
                                       vision_start=contract.vision_start_token_id,
                                       vision_end=contract.vision_end_token_id, im_start=chat.im_start,
                                       im_end=chat.im_end)
            self._position_ids = contract.position_ids
        else:
            token_ids = token_ids if token_ids is not None else VisionTokenIds.from_tokenizer(self.tok)
            self._position_ids = partial(mrope_position_ids, spatial_merge_size=self.spec.merge_size,
                                         image_token_id=token_ids.image_pad, video_token_id=token_ids.video_pad)
        token_ids.check(self.tok)
        self.ids = token_ids
        structural = np.array(sorted(token_ids.structural()), dtype=np.int64)
        # id -> is a chat / vision token; one extra False entry that every larger id is clipped to
        self._is_structural = np.zeros(int(structural.max()) + 2, dtype=bool)
        self._is_structural[structural] = True
        self._text_cache: dict[str, np.ndarray] = {}
        # text is tokenised only up to max_tokens (a 10 MB conv.json of digits was 10M tokens, 7 GiB, 25 s)
        self._budget_tok = BudgetTokenizer(self.tok, must_be_added=token_ids.structural())
        self._structural_ids = set(token_ids.structural())
        self._video_limits = VideoLimits(max_bytes=self.cfg.max_media_bytes, max_total_frames=self.cfg.max_total_frames,
                                         max_pixels=self.cfg.max_frame_pixels, max_frames=self.cfg.max_frames)

    # ------------------------------------------------------------------ public
    def encode(self, key: str, members: dict[str, bytes], *, normalize: bool = True) -> EncodedSample:
        """Encode one sample; raises :class:`SampleError` naming ``key`` and the reason.
        ``normalize``: float32 normalised pixels (HF's) or raw uint8 ones + ``pixel_norm``."""
        return self.finish(self.prepare(key, members), normalize=normalize)

    def prepare(self, key: str, members: dict[str, bytes]) -> PreparedSample:
        """Decode media and tokenise (raises :class:`SampleError`); pixels are patchified by :meth:`finish`."""
        ids, labels, media = self._prepare(key, members, decode=True)
        spec = self.spec
        return PreparedSample(key, ids, labels, media, 3 * spec.temporal_patch_size * spec.patch_size ** 2)

    def finish(self, p: PreparedSample, *, pixel_values_out: torch.Tensor | None = None,
               pixel_values_videos_out: torch.Tensor | None = None, normalize: bool = True) -> EncodedSample:
        """Resize + patchify (+ normalise if ``normalize``) the prepared media and build positions.

        ``*_out`` ([P, C*T*ps*ps], contiguous, P = ``p.patches(kind)``; float32 if ``normalize`` else
        uint8) receive the pixels in place, e.g. a slice of a pack's buffer; the EncodedSample's pixel
        tensors are then those views. Raw uint8 pixels come with ``pixel_norm`` set."""
        return self._finish(p.key, p.input_ids, p.labels, p.media, pixel_values_out, pixel_values_videos_out,
                            normalize)

    @cached_property
    def tokenizer_sha256(self) -> str:
        """``tokenizer_fingerprint`` of the tokenizer (computed once; a manifest's cost hints record the one they
        were made with)."""
        return tokenizer_fingerprint(self.tok)

    def estimate(self, key: str, members: dict[str, bytes]) -> tuple[int, int]:
        """(tokens, vision patches) that :meth:`encode` would produce, without decoding any pixels.

        Reads only container packet indexes and image headers (plus the tokenizer), so a loader can
        cost and balance samples before paying for decoding. Raises the SampleErrors that need no
        decoding (bad JSON, missing members, too long, ...); an undecodable frame surfaces at encode.
        Exact whenever the decoded frame size equals the stream header's (all codecs we test)."""
        ids, _, media = self._prepare(key, members, decode=False)
        return len(ids), sum(m.grid_thw[0] * m.grid_thw[1] * m.grid_thw[2] for m in media)

    def _prepare(self, key: str, members: dict[str, bytes], decode: bool
                 ) -> tuple[np.ndarray, np.ndarray, list[_Media]]:
        conv = self._load_json(key, members, "conv.json", required=True)
        meta = self._load_json(key, members, "meta.json", required=False) or {}
        if not isinstance(meta, dict):
            raise SampleError("bad_json", key, f"meta.json must hold an object, got {type(meta).__name__}")
        messages = self._messages(key, conv)
        render, media = self._render(key, messages, members, meta, decode)
        ids, labels, spans, at_least = self._tokenize(key, render, media)
        ids, labels, media, spans = self._fit(key, ids, labels, media, spans, at_least)
        if not (labels != IGNORE_INDEX).any():
            raise SampleError("bad_conversation", key, "no assistant tokens to train on")
        return ids, labels, media

    # ------------------------------------------------------------------ parsing
    def _load_json(self, key: str, members: dict[str, bytes], name: str, required: bool) -> Any:
        raw = members.get(name)
        if raw is None:
            if required:
                raise SampleError("missing_member", key, f"no {name} in the sample (members: {sorted(members)})")
            return None
        if len(raw) > self.cfg.max_json_bytes:
            raise SampleError("too_large", key, f"{name} has {len(raw)} bytes > max_json_bytes={self.cfg.max_json_bytes}")
        try:
            return parse_json(raw, name)
        except SchemaError as e:
            raise SampleError("bad_json", key, str(e)) from None

    def _messages(self, key: str, conv: Any) -> list[dict]:
        msgs = conv.get("conversation") if isinstance(conv, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise SampleError("bad_conversation", key, 'conv.json must be {"conversation": [non-empty list of messages]}')
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                raise SampleError("bad_conversation", key, f"message {i}: role must be one of {_ROLES}, "
                                                           f"got {m.get('role') if isinstance(m, dict) else m!r}")
            if m["role"] == "system" and i != 0:
                raise SampleError("bad_conversation", key, f"message {i}: a system message may only come first")
            c = m.get("content")
            if not isinstance(c, (str, list)):
                raise SampleError("bad_conversation", key, f"message {i}: content must be a string or a list of items")
        if not any(m["role"] == "assistant" for m in msgs):
            raise SampleError("bad_conversation", key, "no assistant message")
        return msgs

    # ------------------------------------------------------------------ rendering + media
    def _render(self, key: str, messages: list[dict], members: dict[str, bytes], meta: dict, decode: bool = True
                ) -> tuple[_Render, list[_Media]]:
        r, media = _Render(), []
        vision_tokens = 0   # a lower bound on where the next media item starts in the token sequence
        has_answer = False  # some assistant text that is not blank (as schema.validate_conv requires)
        qwen35 = self.chat_template == "qwen3_5"
        last_query = _last_user_query(key, messages) if qwen35 else len(messages)
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            assistant = role == "assistant"
            r.special(self.ids.im_start)
            r.text(role + "\n")
            content_start = len(r.pieces)
            answer: list[str] = []   # qwen3_5: an assistant's text, split into reasoning and answer below
            items = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for j, item in enumerate(items):
                where = f"message {i} item {j}"
                if not isinstance(item, dict):
                    raise SampleError("bad_conversation", key, f"{where}: expected an object, got {item!r:.80}")
                kind = item.get("type") or next((k for k in ("image", "video", "text") if k in item), None)
                if kind == "text":
                    text = item.get("text")
                    if not isinstance(text, str):
                        raise SampleError("bad_conversation", key, f"{where}: text item needs a string 'text'")
                    if qwen35 and assistant:
                        answer.append(text)
                        continue
                    r.text(text, labeled=assistant)
                    has_answer = has_answer or (assistant and bool(text.strip()))
                elif kind in ("image", "video"):
                    if self.text_only:
                        raise SampleError("media_unsupported", key, f"{where}: a {kind} item, but the model has "
                                                                    "no vision tower (a text-only model family)")
                    if role != "user":   # the template drops a system turn's media; an answer cannot produce one
                        raise SampleError("bad_conversation", key, f"{where}: {role} messages cannot hold media "
                                                                   "(images / videos go in user turns)")
                    if len(media) >= self.cfg.max_media:
                        raise SampleError("too_large", key, f"more than max_media={self.cfg.max_media} media items")
                    ref = item.get(kind)
                    # A media item starting at or past max_tokens is cut by _fit (truncate) or makes the sample
                    # too_long, so it is only sized, never decoded: decoded pixels per sample stay below
                    # ~max_tokens tokens' worth plus one item, however many items the sample lists.
                    live = decode and vision_tokens < self.cfg.max_tokens
                    md = self._load_media(key, where, kind, ref, item, members, meta, live)
                    media.append(md)
                    vision_tokens += md.grid_thw[0] * md.grid_thw[1] * md.grid_thw[2] // self.spec.merge_size ** 2
                    r.pieces.append(("media", len(media) - 1))
                else:
                    raise SampleError("bad_conversation", key, f"{where}: unknown item type {kind!r} "
                                                               "(allowed: text, image, video)")
            if qwen35 and assistant:
                has_answer = _render_qwen35_answer(r, "".join(answer), m.get("reasoning_content"),
                                                   think=i > last_query) or has_answer
            elif qwen35:
                _trim_pieces(r.pieces, content_start)
            r.special(self.ids.im_end, labeled=assistant)
            r.text("\n")
        if not has_answer:   # only <|im_end|> would be labeled: the sample would teach empty answers
            raise SampleError("bad_conversation", key, "no assistant message has any text (every answer is empty "
                                                       "or blank): nothing to train on but <|im_end|>")
        return r, media

    def _member(self, key: str, where: str, name: Any, members: dict[str, bytes]) -> bytes:
        """Bytes of the member ``name``; only plain member names of this sample are allowed."""
        if not isinstance(name, str) or not name:
            raise SampleError("bad_conversation", key, f"{where}: media reference must be a member name, got {name!r:.80}")
        if key and name.startswith(key + "."):  # tolerate the full tar member name
            name = name[len(key) + 1:]
        try:
            validate_member_name(name, allow_unknown=True, where=where)
        except SchemaError as e:
            raise SampleError("unsafe_path", key, f"media reference is not a plain member name of this sample: {e}"
                              ) from None
        data = members.get(name)
        if data is None:
            raise SampleError("missing_member", key, f"{where}: member {name!r} is not in the sample "
                                                     f"(members: {sorted(members)})")
        if len(data) > self.cfg.max_media_bytes:
            raise SampleError("too_large", key, f"{where}: {name} has {len(data)} bytes > max_media_bytes="
                                                f"{self.cfg.max_media_bytes}")
        return data

    def _image(self, key: str, where: str, data: bytes) -> np.ndarray:
        try:
            return decode_image(data, max_pixels=self.cfg.max_frame_pixels, max_bytes=self.cfg.max_media_bytes)
        except ImageError as e:
            raise SampleError(e.reason, key, f"{where}: {e.detail}") from None

    def _image_size(self, key: str, where: str, data: bytes) -> tuple[int, int]:
        """(H, W) from the image header, without decoding pixels (for :meth:`estimate`)."""
        try:
            return image_size(data, max_pixels=self.cfg.max_frame_pixels, max_bytes=self.cfg.max_media_bytes)
        except ImageError as e:
            raise SampleError(e.reason, key, f"{where}: {e.detail}") from None

    def _load_media(self, key: str, where: str, kind: str, ref: Any, item: dict, members: dict[str, bytes],
                    meta: dict, decode: bool) -> _Media:
        """Decode (or, with ``decode=False``, only size up) one media item."""
        spec = self.spec
        if kind == "image":
            data = self._member(key, where, ref, members)
            if decode:
                img = as_uint8_tensor(self._image(key, where, data), where)
                H, W = int(img.shape[0]), int(img.shape[1])
            else:
                img, (H, W) = None, self._image_size(key, where, data)
            try:
                h, w = image_target_size(H, W, spec)
            except ValueError as e:
                raise SampleError("undecodable_image", key, f"{where}: {e}") from None
            if img is not None:   # resized now: a prepared sample never holds full-size pixels
                img = resize_thwc(img.unsqueeze(0), (h, w))
            return _Media("image", img, (h, w), (1, h // spec.patch_size, w // spec.patch_size))
        if isinstance(ref, list):  # a frame sequence: list of image members
            frames, (T, H, W), times = self._frame_list(key, where, ref, item, members, meta, decode)
            what = "undecodable_image"
        else:
            data = self._member(key, where, ref, members)
            what = "undecodable_video"
            sampling = dict(fps=self.cfg.fps, min_frames=self.cfg.min_frames, max_frames=self.cfg.max_frames)
            try:
                if decode:   # each frame is resized as it is decoded (one full-size frame at a time)
                    dv = decode_frames(data, **sampling, method=self.cfg.decode_method, limits=self._video_limits,
                                       threads=self.cfg.decode_threads,
                                       resize_to=lambda t, h, w: video_target_size(t, h, w, spec),
                                       channels_first=True)
                    frames, times = torch.from_numpy(dv.frames_thwc), dv.timestamps_s.tolist()
                    T, (H, W) = int(dv.frames_thwc.shape[0]), dv.source_hw
                else:
                    info = probe_video(data, self._video_limits)
                    idx = sample_frame_indices(info.total_frames, info.fps, **sampling)
                    times = (info.timestamps_s(idx) if info.pts.size == info.total_frames else idx / info.fps).tolist()
                    frames, (T, H, W) = None, (len(idx), info.height, info.width)
            except VideoError as e:
                raise SampleError(e.reason, key, f"{where} ({ref}): {e.detail}") from None
        try:
            h, w = video_target_size(T, H, W, spec)
        except ValueError as e:
            raise SampleError(what, key, f"{where}: {e}") from None
        gt = -(-T // spec.temporal_patch_size)
        return _Media("video", frames, (h, w), (gt, h // spec.patch_size, w // spec.patch_size),
                      patch_times(times, spec.temporal_patch_size))

    def _frame_list(self, key: str, where: str, names: list, item: dict, members: dict[str, bytes], meta: dict,
                    decode: bool) -> tuple[torch.Tensor | None, tuple[int, int, int], list[float]]:
        """Sampled frames uint8 [T, H, W, 3] (None unless ``decode``), (T, H, W) and frame times."""
        if not names:
            raise SampleError("bad_conversation", key, f"{where}: empty frame list")
        if len(names) > self.cfg.max_total_frames:
            raise SampleError("too_large", key, f"{where}: {len(names)} frames > max_total_frames="
                                                f"{self.cfg.max_total_frames}")
        fps = item.get("fps")
        if fps is None and isinstance(meta.get("video"), dict):
            fps = meta["video"].get("fps")
        if fps is None:
            fps = next((meta[k] for k in _META_FPS_KEYS if k in meta), None)
        if fps is None:
            fps = self.cfg.frames_fps if self.cfg.frames_fps is not None else self.cfg.fps
        try:   # a 400-digit int overflows float(); 1e-308 passes isfinite but makes every time infinite
            rate = float(fps) if isinstance(fps, (int, float)) and not isinstance(fps, bool) else math.nan
        except OverflowError:
            rate = math.nan
        if not _MIN_FPS <= rate <= _MAX_FPS:
            raise SampleError("bad_conversation", key, f"{where}: frame-list fps must be a number in "
                                                       f"[{_MIN_FPS:g}, {_MAX_FPS:g}], got {str(fps)[:40]}")
        idx = sample_frame_indices(len(names), rate, fps=self.cfg.fps, min_frames=self.cfg.min_frames,
                                   max_frames=self.cfg.max_frames)
        times = (idx / rate).tolist()
        for i in idx.tolist():  # every referenced frame must be a safe, present member, decoded or not
            self._member(key, where, names[i], members)
        H, W = self._image_size(key, f"{where} frame {int(idx[0])}", self._member(key, where, names[idx[0]], members))
        if not decode:
            return None, (len(idx), H, W), times
        # Frames are decoded one at a time and resized at once into the clip's buffer at its target size, so
        # memory is one full-size frame plus the resized clip (bounded by video_max_pixels), not T full-size
        # frames; a member listed again (or another member with the same bytes) is decoded once.
        try:
            h, w = video_target_size(len(idx), H, W, self.spec)
        except ValueError as e:
            raise SampleError("undecodable_image", key, f"{where}: {e}") from None
        out = torch.empty((len(idx), h, w, 3), dtype=torch.uint8)
        done: dict[bytes, int] = {}     # digest of a frame's bytes -> the slot holding it decoded
        for k, i in enumerate(idx.tolist()):
            data = self._member(key, where, names[i], members)
            digest = hashlib.blake2b(data, digest_size=16).digest()
            if digest in done:
                out[k] = out[done[digest]]
                continue
            fi = f"{where} frame {i}"
            if k and self._image_size(key, fi, data) != (H, W):
                raise SampleError("undecodable_image", key, f"{where}: frame {i} is {self._image_size(key, fi, data)}, "
                                                            f"frame {int(idx[0])} is {(H, W)} (frames of a video must "
                                                            "share one size)")
            img = as_uint8_tensor(self._image(key, fi, data), fi)
            if tuple(img.shape[:2]) != (H, W):
                raise SampleError("undecodable_image", key, f"{fi}: decoded to {tuple(img.shape[:2])}, its header "
                                                            f"says {(H, W)}")
            out[k] = resize_thwc(img.unsqueeze(0), (h, w))[0]
            del img
            done[digest] = k
        return out, (len(idx), H, W), times

    # ------------------------------------------------------------------ tokenising
    def _encode_text(self, text: str) -> np.ndarray:
        ids = self._text_cache.get(text)
        if ids is None:
            ids = np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
            if len(self._text_cache) < 4096 and len(text) < 64:  # role headers, timestamps, newlines
                self._text_cache[text] = ids
        return ids

    def _encode_run(self, run: list[tuple[str, bool]], budget: int) -> tuple[TextTokens, bool | np.ndarray]:
        """Consecutive text pieces, tokenised together as HF would (up to ``budget`` tokens, see
        ``BudgetTokenizer``) -> (tokens, labels: True / False for all, else per token)."""
        text = "".join(s for s, _ in run)
        if not any(lab for _, lab in run):
            if len(text) < 64:
                ids = self._encode_text(text)
                return TextTokens(ids, None, len(text), True, len(ids)), False
            return self._budget_tok.encode(text, budget), False
        if all(lab for _, lab in run):
            return self._budget_tok.encode(text, budget), True
        t = self._budget_tok.encode(text, budget, offsets=True)
        # a token is labeled if it covers any labeled character: pieces are non-empty and contiguous
        starts = np.cumsum([0] + [len(s) for s, _ in run[:-1]])
        labcum = np.concatenate([[0], np.cumsum([lab for _, lab in run])])
        first = np.searchsorted(starts, t.offsets[:, 0], side="right") - 1
        last = np.searchsorted(starts, t.offsets[:, 1] - 1, side="right") - 1
        covered = (t.offsets[:, 1] > t.offsets[:, 0]) & (labcum[last + 1] - labcum[first] > 0)
        return t, np.where(covered, t.ids, IGNORE_INDEX)

    def _tokenize(self, key: str, r: _Render, media: list[_Media]
                  ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]], int | None]:
        """-> input ids [L], labels [L], per media its token span [start, end) incl. outer start/end, and None;
        or, once a text run is found to pass ``max_tokens`` before its end, the exact ids so far and a lower bound
        on the sample's tokens (later text is only checked for special tokens, later media not emitted)."""
        ids_chunks: list[np.ndarray] = []
        lab_chunks: list[np.ndarray] = []
        spans: list[tuple[int, int]] = []
        n = 0
        at_least: int | None = None
        run: list[tuple[str, bool]] = []  # consecutive text pieces, tokenised together as HF would

        def emit(ids: np.ndarray, labeled: bool | np.ndarray) -> None:
            nonlocal n
            ids_chunks.append(ids)
            if isinstance(labeled, np.ndarray):
                lab_chunks.append(labeled)
            else:
                lab_chunks.append(ids if labeled else np.full(len(ids), IGNORE_INDEX, dtype=np.int64))
            n += len(ids)

        def special_text(ids: np.ndarray) -> bool:
            return bool(ids.size) and bool(self._is_structural[np.minimum(ids, self._is_structural.size - 1)].any())

        def flush() -> None:
            nonlocal at_least
            if not run:
                return
            if at_least is not None:   # past the budget: the text still may not hold chat / vision tokens
                bad = self._budget_tok.added_in("".join(s for s, _ in run), 0, self._structural_ids)
            else:
                t, lab = self._encode_run(run, self.cfg.max_tokens - n)
                bad = special_text(t.ids) or (not t.complete and self._budget_tok.added_in(
                    "".join(s for s, _ in run), t.end, self._structural_ids))
                if not bad:
                    if not t.complete:
                        at_least = n + t.at_least
                    emit(t.ids, lab)
            if bad:
                raise SampleError("bad_conversation", key, "conversation text contains chat / vision special tokens "
                                                           "(e.g. <|image_pad|>, <|im_start|>)")
            run.clear()

        sp = lambda t: np.array([t], dtype=np.int64)  # noqa: E731
        m2 = self.spec.merge_size ** 2
        for piece in r.pieces:
            if piece[0] == "text":
                run.append((piece[1], piece[2]))
                continue
            flush()
            if at_least is not None:
                continue
            if piece[0] == "special":
                emit(sp(piece[1]), piece[2])
                continue
            md = media[piece[1]]
            start = n
            t, gh, gw = md.grid_thw
            per_t = gh * gw // m2
            emit(sp(self.ids.vision_start), False)
            if md.kind == "image":
                emit(np.full(per_t, self.ids.image_pad, dtype=np.int64), False)
            else:
                pads = np.full(per_t, self.ids.video_pad, dtype=np.int64)
                for ts in md.patch_times_s:
                    emit(self._encode_text(format_timestamp(ts)), False)
                    emit(sp(self.ids.vision_start), False)
                    emit(pads, False)
                    emit(sp(self.ids.vision_end), False)
            emit(sp(self.ids.vision_end), False)
            spans.append((start, n))
        flush()
        return np.concatenate(ids_chunks), np.concatenate(lab_chunks), spans, at_least

    def _fit(self, key: str, ids: np.ndarray, labels: np.ndarray, media: list[_Media], spans: list[tuple[int, int]],
             at_least: int | None = None):
        """Enforce ``max_tokens``: raise too_long, or truncate without cutting into a vision span. ``at_least``:
        ``ids`` are only the exact start of a sample of at least that many tokens (see ``_tokenize``)."""
        L, cap = len(ids), self.cfg.max_tokens
        if L <= cap and at_least is None:
            return ids, labels, media, spans
        counted = (f"{L} tokens > max_tokens={cap} ({sum(e - s for s, e in spans)} in {len(spans)} media)"
                   if at_least is None else f"more than {at_least - 1} tokens > max_tokens={cap} (text is tokenised "
                                            "only until it passes the budget)")
        if not self.cfg.truncate:
            raise SampleError("too_long", key, counted)
        if L < cap:   # a bound ended the count before the exact tokens reached the budget
            raise SampleError("too_long", key, f"{counted}; truncating it would need the tokens of a stretch of text "
                                               "with no provable token boundary that alone is longer than the budget")
        cut = cap
        for s, e in spans:
            if s < cut < e:
                cut = s
        keep = [i for i, (s, e) in enumerate(spans) if e <= cut]
        ids, labels = ids[:cut], labels[:cut]
        if not (labels != IGNORE_INDEX).any():
            raise SampleError("too_long", key, f"{counted} and no assistant token is left after truncating to {cut}")
        return ids, labels, [media[i] for i in keep], [spans[i] for i in keep]

    # ------------------------------------------------------------------ pixels + positions
    def _pixels(self, key: str, kind: str, media: list[_Media], out: torch.Tensor | None = None,
                normalize: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        items = [m for m in media if m.kind == kind]
        spec = self.spec
        D = 3 * spec.temporal_patch_size * spec.patch_size ** 2
        rows = [m.grid_thw[0] * m.grid_thw[1] * m.grid_thw[2] for m in items]
        dtype = torch.float32 if normalize else torch.uint8
        if out is not None and (tuple(out.shape) != (sum(rows), D) or out.dtype != dtype
                                or not out.is_contiguous()):
            raise ValueError(f"sample {key!r}: the {kind} pixel buffer must be a contiguous {dtype} "
                             f"({sum(rows)}, {D}) tensor (normalize={normalize}), got {out.dtype} {tuple(out.shape)}")
        if not items:
            return None, None
        if out is None:
            out = torch.empty(sum(rows), D, dtype=dtype)
        r0 = 0
        for m, nrows in zip(items, rows):
            if m.frames_thwc is None:   # only past max_tokens, which _fit never keeps
                raise AssertionError(f"sample {key!r}: a {kind} past max_tokens was kept without its pixels")
            frames = resize_thwc(m.frames_thwc, m.size_hw)
            _, grid = patchify(frames, spec, out=out[r0:r0 + nrows], normalize=normalize)
            assert grid == m.grid_thw, (grid, m.grid_thw)
            r0 += nrows
        return out, torch.tensor([m.grid_thw for m in items], dtype=torch.long)

    def _finish(self, key: str, ids: np.ndarray, labels: np.ndarray, media: list[_Media],
                pixel_out: torch.Tensor | None = None, video_out: torch.Tensor | None = None,
                normalize: bool = True) -> EncodedSample:
        pv, img_grid = self._pixels(key, "image", media, pixel_out, normalize)
        pvv, vid_grid = self._pixels(key, "video", media, video_out, normalize)
        input_ids_l = torch.from_numpy(np.ascontiguousarray(ids))
        labels_l = torch.from_numpy(np.ascontiguousarray(labels))
        labels_l[0] = IGNORE_INDEX
        pos_3l = self._position_ids(input_ids_l, img_grid, vid_grid)
        return EncodedSample(key=key, input_ids_l=input_ids_l, labels_l=labels_l, position_ids_3l=pos_3l,
                             pixel_values=pv, image_grid_thw=img_grid, pixel_values_videos=pvv,
                             video_grid_thw=vid_grid,
                             pixel_norm=None if normalize else self.spec.pixel_norm)

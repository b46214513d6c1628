"""CLIP's byte-level BPE tokenizer, read from a diffusers folder's ``tokenizer/`` files.

Reads ``vocab.json`` (symbol -> id), ``merges.txt`` (one merge per line, best first, after a
``#version`` line), and ``special_tokens_map.json`` / ``tokenizer_config.json`` (bos / eos / pad /
unk tokens, ``model_max_length``). Nothing is assumed about the order of ids: every id comes from
``vocab.json``. No ``transformers``, ``tokenizers``, ``ftfy`` or ``regex`` package.

What one prompt goes through (transformers' ``CLIPTokenizer`` as SD pipelines call it:
``padding="max_length", max_length=model_max_length, truncation=True``):

1. normalise: Unicode NFC; every run of whitespace -> one space; lower case (character by character);
2. pre-tokenise with CLIP's pattern
   ``<|startoftext|> | <|endoftext|> | 's|'t|'re|'ve|'m|'ll|'d | \\p{L}+ | \\p{N} | [^\\s\\p{L}\\p{N}]+``
   (leftmost alternative first, whitespace dropped): runs of letters, single digits, runs of other
   symbols. Python's ``re`` has no ``\\p{L}``, so a small scanner does it with ``unicodedata``
   categories (L* = letter, N* = number) and Unicode's White_Space set;
3. each piece -> its UTF-8 bytes -> one printable stand-in character per byte (GPT-2's reversible
   byte <-> character table, which ``vocab.json``'s keys are written in) -> BPE: the last symbol
   gets ``</w>``; repeatedly merge the adjacent pair ranked best in ``merges.txt`` until no pair has
   a rank; symbols -> ids through ``vocab.json`` (unknown -> unk id);
4. ``[bos] + ids[: max_length - 2] + [eos]`` (truncation keeps the eos), then padding to
   ``max_length`` with the **pad token** (``<|endoftext|>`` in SD 1.x folders, ``!`` in SD 2.x).

Normalisation differences from transformers 5.x ``CLIPTokenizer`` (which the fixtures used and
which does exactly 1-4, without ftfy or HTML unescaping), and from OpenAI's original CLIP tokenizer:

* OpenAI's ``clip.simple_tokenizer`` (and transformers' old slow tokenizer when ``ftfy`` is
  installed) first runs ``ftfy.fix_text`` (repairs mojibake such as ``â€™``, straightens curly
  quotes, widens/narrows compatibility characters, un-ligatures) and ``html.unescape`` twice
  (``&amp;`` -> ``&``). Neither is done here nor by transformers' fast tokenizer: a prompt with
  curly quotes, HTML entities or broken encodings tokenises differently from OpenAI's CLIP (e.g.
  ``dog’s`` keeps ``’`` as a symbol instead of the contraction ``'s``). Plain ASCII prompts agree.
* The special-token strings ``<|startoftext|>`` / ``<|endoftext|>`` met in the text are matched
  after normalisation as whole pieces and given their ids (OpenAI CLIP's BPE cache does the same);
  the ``tokenizers`` library extracts them before normalisation, which differs only for odd
  casings such as ``<|EndOfText|>``.
* Unicode tables are those of this Python's ``unicodedata``; the Rust ``tokenizers`` library may
  ship another Unicode version (differences only for newly assigned characters).
"""
from __future__ import annotations

import json
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["CLIPTokenizer", "byte_to_unicode"]

_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")    # the pattern's order
_END_OF_WORD = "</w>"
_DEFAULT_MAX_LENGTH = 77    # CLIP's context; used when tokenizer_config.json gives none (or a huge sentinel)

# Unicode's White_Space property (what ``\s`` means in the Rust regex of ``tokenizers``; Python's
# str.isspace also counts U+001C..U+001F, which are not White_Space).
_WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000")


@lru_cache(maxsize=1)
def byte_to_unicode() -> Dict[int, str]:
    """GPT-2 / CLIP's table byte -> printable character: the 188 bytes that are printable Latin-1
    ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 take chr(256), chr(257), ...
    in byte order. A bijection, so BPE symbols are strings of visible characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for offset, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + offset)
    return table


def normalize(text: str) -> str:
    """NFC, whitespace runs -> ' ', per-character lower case (the ``tokenizers`` normaliser)."""
    text = unicodedata.normalize("NFC", text)
    out: List[str] = []
    for ch in text:
        if ch in _WHITE_SPACE:
            if not out or out[-1] != " ":
                out.append(" ")
        else:
            out.append(ch.lower())
    return "".join(out)


def _kind(ch: str) -> str:
    """'space', 'letter' (\\p{L}), 'number' (\\p{N}) or 'other'."""
    if ch in _WHITE_SPACE:
        return "space"
    category = unicodedata.category(ch)[0]
    return {"L": "letter", "N": "number"}.get(category, "other")


def pre_tokenize(text: str, special_tokens: Sequence[str]) -> List[str]:
    """Split normalised text as CLIP's regex does (alternatives tried left to right at each position)."""
    pieces: List[str] = []
    i, n = 0, len(text)
    while i < n:
        match = next((s for s in (*special_tokens, *_CONTRACTIONS) if text.startswith(s, i)), None)
        if match is None:
            kind = _kind(text[i])
            if kind == "space":
                i += 1
                continue
            if kind == "number":
                match = text[i]
            else:                                   # a run of letters, or a run of "other" symbols
                end = i + 1
                while end < n and _kind(text[end]) == kind:
                    end += 1
                match = text[i:end]
        pieces.append(match)
        i += len(match)
    return pieces


class CLIPTokenizer:
    """Text -> CLIP token ids, padded/truncated to ``model_max_length`` as SD pipelines ask."""

    def __init__(self, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]], *, bos_token: str = "<|startoftext|>",
                 eos_token: str = "<|endoftext|>", pad_token: str = "<|endoftext|>", unk_token: str = "<|endoftext|>",
                 model_max_length: int = _DEFAULT_MAX_LENGTH):
        missing = [t for t in {bos_token, eos_token, pad_token, unk_token} if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer vocab.json lacks the special token(s) {missing}: check special_tokens_map.json")
        if model_max_length < 2:
            raise ValueError(f"tokenizer model_max_length must be >= 2 (bos + eos), got {model_max_length}")
        self.vocab = dict(vocab)
        self.merge_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.bos_token_id, self.eos_token_id = vocab[bos_token], vocab[eos_token]
        self.pad_token_id, self.unk_token_id = vocab[pad_token], vocab[unk_token]
        self.special_tokens = tuple(sorted({bos_token, eos_token}, key=len, reverse=True))
        self.model_max_length = int(model_max_length)
        self._bytes = byte_to_unicode()
        self._cache: Dict[str, List[int]] = {}

    @classmethod
    def from_folder(cls, folder: Union[str, Path]) -> "CLIPTokenizer":
        """Read ``folder``'s vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json
        (``folder`` is the ``tokenizer/`` directory; special_tokens_map.json wins over
        tokenizer_config.json where both name a token, as in transformers)."""
        folder = Path(folder)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"tokenizer folder {folder} has no {name}: a CLIP tokenizer needs vocab.json and merges.txt")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = []
        for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines():
            if line.startswith("#version") or not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{folder / 'merges.txt'}: line {line!r} is not a merge 'left right'")
            merges.append((parts[0], parts[1]))
        settings: Dict[str, object] = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                settings.update(json.loads((folder / name).read_text(encoding="utf-8")))
        tokens = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = settings.get(key)
            if isinstance(value, dict):            # a serialised AddedToken
                value = value.get("content")
            if value is not None:
                tokens[key] = value
        max_length = settings.get("model_max_length")
        if not isinstance(max_length, int) or max_length > 10 ** 6:   # transformers' "very large" sentinel
            max_length = _DEFAULT_MAX_LENGTH
        return cls(vocab, merges, model_max_length=max_length, **tokens)

    def bpe(self, piece: str) -> List[str]:
        """BPE of one pre-token (already in byte characters): symbols with ``</w>`` on the last."""
        symbols = list(piece[:-1]) + [piece[-1] + _END_OF_WORD]
        while len(symbols) > 1:
            ranked = [(self.merge_ranks.get(pair, -1), pair) for pair in zip(symbols, symbols[1:])]
            candidates = [(rank, pair) for rank, pair in ranked if rank >= 0]
            if not candidates:
                break
            _, (left, right) = min(candidates)
            merged: List[str] = []
            i = 0
            while i < len(symbols):                 # merge every occurrence, left to right
                if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _piece_ids(self, piece: str) -> List[int]:
        if piece not in self._cache:
            if piece in self.special_tokens:
                self._cache[piece] = [self.vocab[piece]]
            else:
                chars = "".join(self._bytes[b] for b in piece.encode("utf-8"))
                self._cache[piece] = [self.vocab.get(symbol, self.unk_token_id) for symbol in self.bpe(chars)]
        return self._cache[piece]

    def encode(self, text: str, max_length: Optional[int] = None, truncation: bool = True) -> List[int]:
        """``[bos] + BPE ids + [eos]``, not padded. With ``truncation`` cut to ``max_length``
        (default ``model_max_length``) keeping the eos; without it, the whole prompt (its length
        tells a pipeline whether, and how much, the prompt was truncated)."""
        max_length = self.model_max_length if max_length is None else max_length
        ids = [i for piece in pre_tokenize(normalize(text), self.special_tokens) for i in self._piece_ids(piece)]
        if truncation:
            ids = ids[: max_length - 2]
        return [self.bos_token_id, *ids, self.eos_token_id]

    def __call__(self, texts: Union[str, Sequence[str]], max_length: Optional[int] = None) -> torch.Tensor:
        """Token ids [N x max_length] (int64, default ``model_max_length``), each row
        ``encode(text)`` padded with the pad token: transformers' ``padding="max_length",
        truncation=True`` as SD pipelines call it."""
        if isinstance(texts, str):
            texts = [texts]
        max_length = self.model_max_length if max_length is None else max_length
        rows = [self.encode(text, max_length) for text in texts]
        return torch.tensor([row + [self.pad_token_id] * (max_length - len(row)) for row in rows], dtype=torch.long)

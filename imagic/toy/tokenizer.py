"""Word-level CLIP tokenizer files for the toy vocabulary.

``write_tokenizer(dir)`` writes ``vocab.json``, ``merges.txt`` and the config
files of a :class:`transformers.CLIPTokenizer` in which every word of
:data:`imagic.toy.data.VOCABULARY` is exactly one token.  Single letters (with
and without the end-of-word marker) are also in the vocabulary, so an unknown
lower-case word still tokenizes (letter by letter) instead of becoming <|endoftext|>.

The BPE merges are built word by word: a word is first tokenized with the
merges so far, and the remaining pieces are merged left to right with new
merges appended at the end.  Appended merges have the lowest priority, so they
never change the tokenization of a word processed before.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from .data import VOCABULARY

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
MAX_LENGTH = 77  # same as Stable Diffusion's CLIP tokenizer


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        pairs = [p for p in pairs if p[0] is not None]
        if not pairs:
            break
        best = min(pairs)[0]
        out, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and ranks.get((pieces[i], pieces[i + 1])) == best:
                out.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                out.append(pieces[i])
                i += 1
        pieces = out
    return pieces


def build_vocab_and_merges(words=VOCABULARY) -> tuple[dict[str, int], list[tuple[str, str]]]:
    letters = list(string.ascii_lowercase)
    tokens: list[str] = letters + [c + EOW for c in letters]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if len(word) < 2:
            continue
        pieces = _bpe(list(word[:-1]) + [word[-1] + EOW], ranks)
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            ranks[(a, b)] = len(merges)
            merges.append((a, b))
            if a + b not in tokens:
                tokens.append(a + b)
            pieces = [a + b] + pieces[2:]
    for word in words:
        if word + EOW not in tokens:
            tokens.append(word + EOW)
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    # check: every word is one token under these merges
    for word in words:
        assert _bpe(list(word[:-1]) + [word[-1] + EOW], ranks) == [word + EOW], word
    return vocab, merges


def write_tokenizer(out_dir, max_length: int = MAX_LENGTH) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, indent=0, ensure_ascii=True) + "\n")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    return out


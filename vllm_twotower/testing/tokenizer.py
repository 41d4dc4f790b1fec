"""A small, offline, deterministic stand-in for the Nemotron-3-Nano tokenizer.

The real TwoTower checkpoint ships NVIDIA's 131072-entry Nemotron-3-Nano tokenizer; the random
test checkpoints (``make_checkpoint``) have a few hundred to a few thousand vocabulary rows, and
no tokenizer may be downloaded. So we build one with the ``tokenizers`` library that:

* keeps the real **special-token layout** in ids 0-19, because model code and configs hard-code
  those ids: 0 ``<unk>``, 1 ``<s>`` (bos), 2 ``</s>``, 3 ``<SPECIAL_3>`` (the model's [MASK] id,
  so it is special and ``skip_special_tokens`` hides it), 10 ``<|im_start|>``, 11 ``<|im_end|>``,
  and ``<SPECIAL_k>`` for every other id below 20;
* has **exactly** ``vocab_size`` entries (``len(tokenizer)``), so every id the model can emit
  decodes to something;
* is **byte-level BPE**, so any string (Unicode, emoji, odd whitespace) round-trips through
  encode/decode;
* is **byte-for-byte reproducible**: same ``vocab_size``, same ``tokenizer.json``.

Decisions (the real tokenizer's behaviour where it matters, a documented choice elsewhere):

* ``eos_token`` is ``<|im_end|>`` (id 11), the real base tokenizer's eos, even though the model's
  ``config.json`` says ``eos_token_id: 2``; ``generation_config.json`` lists both (see
  ``make_checkpoint.GENERATION_CONFIG``) and the plugin stops on the union.
* No bos is prepended automatically (``add_bos_token: false``, no post-processor): token ids are
  exactly the text's tokens, which keeps prompt lengths and reference comparisons simple. A
  caller that wants ``<s>`` adds id 1 itself.
* ``pad_token`` is ``<unk>`` (id 0), matching ``generation_config.json``'s ``pad_token_id: 0``.
* No chat template: the stand-in is for the *base* model.
* ``clean_up_tokenization_spaces: false``, otherwise decode would rewrite ``" ."`` to ``"."``
  and break the round trip.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

NUM_RESERVED = 20  # ids 0..19 are special tokens, as in the real tokenizer
UNK, BOS, EOS_DOC, MASK_ID, IM_START_ID, IM_END_ID = "<unk>", "<s>", "</s>", 3, 10, 11
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
MODEL_MAX_LENGTH = 1_048_576  # "large": vLLM takes the real limit from config.json, not from here
_MIN_VOCAB = NUM_RESERVED + 256  # specials + the 256 byte-level base symbols
_SEED = 20240531


def special_tokens() -> list[str]:
    """The 20 reserved tokens, index == id."""
    names = {0: UNK, 1: BOS, 2: EOS_DOC, IM_START_ID: IM_START, IM_END_ID: IM_END}
    return [names.get(i, f"<SPECIAL_{i}>") for i in range(NUM_RESERVED)]


# A few paragraphs of ordinary English (written for this file) so that the first merges look like
# a real tokenizer's (" the", "ing", ...); code, digits and non-ASCII text get merges too.
_ENGLISH = """\
The library opened at nine in the morning, and by ten the reading room was already full. Students
sat with their notebooks open, writing slowly, while an old clock above the door counted the minutes
with a patient tick. Nobody spoke above a whisper; the only other sound was the turning of pages.

A diffusion language model does not write one word after another. It starts from a sentence in
which every position is hidden behind a mask, and at each step it decides which positions it is
confident about and fills those in. The rest stay masked until a later step, when more of the
context is known.

Weather reports for the coast: winds from the north-west at 20 to 30 km/h, rising in the afternoon.
Temperatures between 12 and 18 degrees. Light rain is expected on Thursday; the weekend should be
dry and bright, with a chance of fog early on Sunday morning near the harbour.

She asked whether the train would be late again. "Probably," he said, looking at the board. "It was
late yesterday, and the day before that, and I think it will be late tomorrow as well."

def count_words(text: str) -> dict[str, int]:
    counts = {}
    for word in text.split():
        counts[word] = counts.get(word, 0) + 1
    return counts

Numbers and dates: 1, 2, 3, 10, 42, 100, 2024-05-31, 3.14159, 1e-5, $19.99, 50%, #7, a+b=c.
Some other writing: café, naïve, über, señor, Ελληνικά, русский,
日本語のテキスト, 中文, 한국어, 🙂🚀.
"""

_ONSETS = [
    "",
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "br",
    "ch",
    "cl",
    "dr",
    "fl",
    "gr",
    "pl",
    "pr",
    "sh",
    "sl",
    "st",
    "str",
    "th",
    "tr",
]
_NUCLEI = ["a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "io", "oo", "ou"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "ng", "nd", "st", "ck", "rt", "x"]


def _pseudo_words(count: int, rng: random.Random) -> list[str]:
    """``count`` pronounceable nonsense words (1-4 syllables), distinct, from ``rng``."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        w = "".join(
            rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
            for _ in range(rng.randint(1, 4))
        )
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def corpus(vocab_size: int) -> Iterator[str]:
    """The training text for ``vocab_size``: the English paragraphs, then seeded pseudo-word lines.

    The pseudo-word lexicon grows with ``vocab_size`` (2 words per vocab entry, each of which can
    end up a whole-word token), so training always has more candidate merges than it needs and
    never has to fall back on ``_fill``. Word frequencies are Zipf-like. All randomness comes from
    ``random.Random`` with a fixed seed, so the text depends on ``vocab_size`` alone.
    """
    rng = random.Random(_SEED)
    lexicon = _pseudo_words(max(1000, 2 * vocab_size), rng)
    # Zipf weights 1/(rank+1): a few common words, a long tail of rare ones.
    weights = [1.0 / (r + 1) for r in range(len(lexicon))]
    n_tokens = 8 * len(lexicon)
    picks = rng.choices(lexicon, weights=weights, k=n_tokens)
    # Every lexicon word appears at least once, so the rare tail is still mergeable.
    picks += lexicon
    # Repeat the English in proportion, so common English pieces (" the", " and") get merges too.
    for _ in range(max(1, n_tokens // 500)):
        yield _ENGLISH
    line = 12
    for i in range(0, len(picks), line):
        chunk = picks[i : i + line]
        sep = ", " if i % 7 == 0 else " "
        yield sep.join(chunk) + (".\n" if i % 5 else "\n\n")


def _fill(tok: Tokenizer, vocab_size: int) -> Tokenizer:
    """Top the BPE vocab up to ``vocab_size`` if training stopped short.

    Training only stops short when the corpus runs out of pairs (never with ``corpus``, but a
    custom corpus can be tiny). Missing entries are extra merges appended after the trained ones
    (lowest priority): pairs ``(a, b)`` with ``a`` walking the vocab in id order (including tokens
    added here, so the supply never runs out) and ``b`` the byte alphabet in id order, skipping
    any ``a + b`` already present. Every such token is a string of byte symbols, so it decodes.
    """
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges: list = data["model"]["merges"]
    missing = vocab_size - len(tok.get_vocab(with_added_tokens=True))
    if missing <= 0:
        return tok
    as_str = bool(merges) and isinstance(merges[0], str)  # older tokenizers wrote "a b"
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: vocab[c])
    by_id = sorted(vocab, key=vocab.__getitem__)
    reserved = set(special_tokens())
    ai = 0
    while missing > 0:
        a = by_id[ai]
        ai += 1
        if a in reserved:
            continue
        for b in alphabet:
            if missing == 0:
                break
            if a + b in vocab:
                continue
            vocab[a + b] = len(vocab)
            by_id.append(a + b)
            merges.append(f"{a} {b}" if as_str else [a, b])
            missing -= 1
    return Tokenizer.from_str(json.dumps(data))


def make_tokenizer(vocab_size: int, texts: Iterable[str] | None = None) -> Tokenizer:
    """Train the stand-in tokenizer in memory (``texts`` defaults to ``corpus(vocab_size)``)."""
    if vocab_size < _MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be >= {_MIN_VOCAB} (20 specials + 256 bytes), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    # GPT-2-style pre-split, no prefix space: "hello" and " hello" stay distinct, nothing is added.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t in special_tokens()]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(corpus(vocab_size) if texts is None else texts, trainer=trainer)
    tok = _fill(tok, vocab_size)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:  # trained past the target can't happen; guard the invariant anyway
        raise RuntimeError(f"built {got} tokens, wanted {vocab_size}")
    for i, t in enumerate(special_tokens()):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def _additional_specials() -> list[str]:
    """Reserved tokens without a named role (``</s>``, ``<SPECIAL_3>`` = [MASK], the chat markers).

    Listed so ``tokenizer.all_special_ids`` covers all of ids 0-19: decoders that filter by that
    list rather than by the ``special`` flag in ``tokenizer.json`` hide the mask id too.
    (transformers 5 reads this key as ``extra_special_tokens``.)
    """
    named = {BOS, IM_END, UNK}
    return [t for t in special_tokens() if t not in named]


def tokenizer_config() -> dict:
    """``tokenizer_config.json``: the Nano base settings that matter (see the module doc)."""
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(special_tokens())
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": IM_END,
        "unk_token": UNK,
        "pad_token": UNK,
        "additional_special_tokens": _additional_specials(),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def build_tokenizer(vocab_size: int, out_dir: str | os.PathLike) -> None:
    """Write the three tokenizer files (``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``) to ``out_dir``.

    The result loads with ``transformers.AutoTokenizer.from_pretrained(out_dir)`` (hence vLLM),
    has exactly ``vocab_size`` tokens with ids 0-19 laid out like the real Nemotron-3-Nano
    tokenizer's, and is byte-identical across builds with the same ``vocab_size``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(vocab_size)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    smap = {
        "bos_token": BOS,
        "eos_token": IM_END,
        "unk_token": UNK,
        "pad_token": UNK,
        "additional_special_tokens": _additional_specials(),
    }
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")

"""The stand-in tokenizer: exact size, real special ids, lossless, reproducible, loadable."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_twotower.testing import tokenizer as tokenizer_module
from vllm_twotower.testing.tokenizer import build_tokenizer, make_tokenizer, special_tokens

ROOT = Path(tokenizer_module.__file__).resolve().parents[2]  # so subprocesses import the same code

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nblank lines",
    "code: def f(x):\n    return x ** 2  # square\n",
    "naïve café über señor Ελληνικά русский 日本語 中文 한국어",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷 and ZWJ",
    "numbers 3.14159 2024-05-31 $19.99 1e-5",
    "punctuation spacing: a , b . c ! ? ' \" ( ) [ ] { }",
    "\u00a0nbsp\u2003em-space\u200bzero-width",
    "",
    " ",
    "xqzvkj wwwwwwwwwwwwwwwwwwwwwwwwww",
]

SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<SPECIAL_3>", 10: "<|im_start|>", 11: "<|im_end|>"}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok512")
    build_tokenizer(512, out)
    return out


@pytest.fixture(scope="module")
def hf(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_writes_the_three_files(tok_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tok_dir / name).is_file(), name
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["bos_token"] == "<s>"
    assert cfg["add_bos_token"] is False
    assert "chat_template" not in cfg
    assert cfg["model_max_length"] >= 131072


@pytest.mark.parametrize("vocab_size", [512, 4096])
def test_exact_vocab_size(tmp_path, vocab_size):
    build_tokenizer(vocab_size, tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == vocab_size
    # Every id decodes (no holes in the id space).
    ids = tok.get_vocab().values()
    assert sorted(ids) == list(range(vocab_size))


@pytest.mark.parametrize("vocab_size", [276, 1000, 65536])
def test_exact_vocab_size_raw(vocab_size):
    # 276 = 20 specials + 256 bytes, no merges; 65536 is the upper end of the supported range.
    assert make_tokenizer(vocab_size).get_vocab_size(with_added_tokens=True) == vocab_size


def test_too_small_vocab_rejected():
    with pytest.raises(ValueError):
        make_tokenizer(275)


def test_fill_when_corpus_is_too_small():
    tok = make_tokenizer(600, texts=["ab ab ab"])  # a few merges at most; the rest are filled
    assert tok.get_vocab_size(with_added_tokens=True) == 600
    assert [tok.id_to_token(i) for i in range(20)] == special_tokens()
    s = "filled vocab still round-trips: ✓ 🙂"
    assert tok.decode(tok.encode(s).ids) == s
    # Every token (filled ones included) decodes without error.
    assert all(isinstance(tok.decode([i], skip_special_tokens=False), str) for i in range(600))
    again = make_tokenizer(600, texts=["ab ab ab"])
    assert tok.to_str() == again.to_str()


def test_special_ids(hf):
    for i, s in SPECIALS.items():
        assert hf.convert_ids_to_tokens(i) == s
        assert hf.convert_tokens_to_ids(s) == i
    assert hf.convert_ids_to_tokens(list(range(20))) == special_tokens()
    # Every reserved id is a special token (flag in tokenizer.json and all_special_ids).
    decoder = hf.added_tokens_decoder
    assert all(decoder[i].special for i in range(20))
    assert set(range(20)) <= set(hf.all_special_ids)
    assert hf.convert_ids_to_tokens(20) not in special_tokens()


def test_eos_bos_pad(hf):
    assert hf.eos_token_id == 11 and hf.eos_token == "<|im_end|>"
    assert hf.bos_token_id == 1
    assert hf.unk_token_id == 0
    assert hf.pad_token_id == 0
    assert not getattr(hf, "chat_template", None)


def test_no_bos_added(hf):
    ids = hf("hello world")["input_ids"]
    assert 1 not in ids and 2 not in ids and 11 not in ids
    assert hf.encode("hello world") == ids


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(hf, text):
    ids = hf.encode(text)
    assert all(0 <= i < len(hf) for i in ids)
    assert hf.decode(ids) == text
    assert hf.decode(ids, skip_special_tokens=True) == text


def test_round_trip_every_byte(hf):
    text = bytes(range(256)).decode("latin-1") + "".join(chr(c) for c in range(0x2000, 0x2100))
    assert hf.decode(hf.encode(text)) == text


def test_special_strings_in_text(hf):
    text = "<|im_start|>user\nhi<|im_end|>"
    ids = hf.encode(text)
    assert ids[0] == 10 and ids[-1] == 11
    assert hf.decode(ids) == text


def test_skip_special_tokens_drops_mask(hf):
    body = hf.encode("the cat sat")
    ids = [3, *body[:1], 3, 3, *body[1:], 11, 3]
    assert hf.decode(ids, skip_special_tokens=True) == "the cat sat"
    assert "<SPECIAL_3>" in hf.decode(ids)


def test_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tokenizer(1024, a)
    build_tokenizer(1024, b)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_deterministic_across_processes(tmp_path):
    """Python's hash seed and the Rust thread count must not change the output."""
    code = (
        "import sys; from vllm_twotower.testing.tokenizer import build_tokenizer; "
        "build_tokenizer(2048, sys.argv[1])"
    )
    outs = []
    for seed, threads in (("1", "1"), ("2", "4")):
        out = tmp_path / f"p{seed}"
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {
            **os.environ,
            "PYTHONPATH": path,
            "PYTHONHASHSEED": seed,
            "RAYON_NUM_THREADS": threads,
        }
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env)
        outs.append((out / "tokenizer.json").read_bytes())
    build_tokenizer(2048, tmp_path / "here")
    assert outs[0] == outs[1] == (tmp_path / "here" / "tokenizer.json").read_bytes()


def test_different_sizes_share_the_special_prefix():
    small, big = make_tokenizer(512), make_tokenizer(2048)
    assert [small.id_to_token(i) for i in range(20)] == [big.id_to_token(i) for i in range(20)]


@pytest.mark.parametrize("vocab_size,limit", [(512, 2.0), (8192, 10.0)])
def test_fast(tmp_path, vocab_size, limit):
    t = time.perf_counter()
    build_tokenizer(vocab_size, tmp_path)
    assert time.perf_counter() - t < limit

"""Corpora, splits, token windows and calibration sampling."""

import numpy as np
import pytest

from jaxcomp.data import (
    eval_windows,
    load_corpus,
    sample_calibration,
    tokenize_documents,
)
from jaxcomp.errors import JaxcompError


def test_enwiki_split_is_disjoint_and_stable():
    c = load_corpus("enwiki-sample")
    assert (len(c.calib), len(c.eval)) == (97, 9)
    assert not set(c.calib) & set(c.eval)
    assert all("[[" not in d and "'''" not in d and "{{" not in d for d in c.eval)
    load_corpus.cache_clear()
    again = load_corpus("enwiki-sample")
    assert again.calib == c.calib and again.eval == c.eval


def test_lee_split():
    c = load_corpus("lee")
    assert len(c.calib) + len(c.eval) == 300
    assert not set(c.calib) & set(c.eval)


def test_text_file_corpus(tiny_text_file, tmp_path):
    c = load_corpus(f"text:{tiny_text_file}")
    assert c.calib and c.eval
    with pytest.raises(JaxcompError, match="nope.txt"):
        load_corpus(f"text:{tmp_path / 'nope.txt'}")


def test_unknown_corpus_names_closest():
    with pytest.raises(JaxcompError, match="enwiki-sample"):
        load_corpus("enwiki-sampel")


def test_wikitext2_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    load_corpus.cache_clear()
    with pytest.raises(JaxcompError, match="network") as e:
        load_corpus("wikitext2")
    assert "\n" not in str(e.value)


class _CharTokenizer:
    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 250 + 1 for c in text]}


def test_tokenize_documents_joins_with_blank_lines():
    tok = _CharTokenizer()
    ids = tokenize_documents(tok, ["ab", "c"])
    np.testing.assert_array_equal(ids, tok("ab\n\nc")["input_ids"])
    assert tokenize_documents(tok, ["ab"], add_bos=True)[0] == 0


def test_eval_windows_shapes_and_cap():
    tokens = np.arange(1000)
    assert eval_windows(tokens, 128).shape == (7, 128)
    w = eval_windows(tokens, 128, max_tokens=300)
    assert w.shape == (2, 128)
    np.testing.assert_array_equal(w.ravel(), np.arange(256))
    with pytest.raises(JaxcompError, match="no evaluation window"):
        eval_windows(tokens, 2000)
    with pytest.raises(JaxcompError, match="seq_len"):
        eval_windows(tokens, 1)


def test_sample_calibration_deterministic():
    tokens = np.arange(5000)
    a = sample_calibration(tokens, 8, 64, seed=3)
    assert a.shape == (8, 64)
    np.testing.assert_array_equal(a, sample_calibration(tokens, 8, 64, seed=3))
    assert not np.array_equal(a, sample_calibration(tokens, 8, 64, seed=4))
    assert all(np.all(np.diff(row) == 1) for row in a)  # contiguous windows of the stream


@pytest.mark.parametrize("n, seq, match", [(0, 64, "num_samples"), (4, 1, "seq_len"),
                                           (4, 5000, "fewer than")])
def test_sample_calibration_errors(n, seq, match):
    with pytest.raises(JaxcompError, match=match):
        sample_calibration(np.arange(5000), n, seq)

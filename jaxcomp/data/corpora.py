"""Text corpora by name, each split by document into non-overlapping ``calib`` and ``eval`` parts.

Names:
  * ``enwiki-sample``: the ~106 real Wikipedia articles shipped inside the gensim wheel
    (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``), markup stripped
    with gensim's ``filter_wiki``; redirects dropped. With the SmolLM2 tokenizer (no BOS): calib
    97 articles / 643,384 tokens, eval 9 articles / 70,772 tokens; ``lee``: calib 259 texts /
    64,744 tokens, eval 41 texts / 10,581 tokens (measured by
    ``tests/data/test_corpora.py::test_enwiki_token_counts``).
  * ``lee``: gensim's Lee background corpus (300 news texts, one per line).
  * ``wikitext2``: WikiText-2 raw from the HF hub (train -> calib, test -> eval); needs network.
  * ``text:PATH``: a local UTF-8 text file, one document per blank-line-separated paragraph,
    read with ``datasets``' text loader.

The split is by a stable hash of each document's title (or text), so it is the same on every
machine: a document lands in ``eval`` when ``sha1 % 10 == 0`` (about 10%).
"""

from __future__ import annotations

import bz2
import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import os
import re

from jaxcomp.errors import JaxcompError

CORPORA = ("enwiki-sample", "lee", "wikitext2", "text:PATH")
_ENWIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A named corpus: ``calib`` and ``eval`` are disjoint lists of documents."""

    name: str
    calib: tuple[str, ...]
    eval: tuple[str, ...]
    description: str = ""


def _in_eval(key: str) -> bool:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 10 == 0


def _split(name: str, docs: list[tuple[str, str]], description: str) -> Corpus:
    """Splits ``(key, text)`` documents by the hash of their key."""
    calib = tuple(text for key, text in docs if not _in_eval(key))
    evals = tuple(text for key, text in docs if _in_eval(key))
    if not calib or not evals:
        # Too few documents for a hash split: hold out the last one for evaluation.
        if len(docs) < 2:
            raise JaxcompError(f"corpus {name}: needs at least 2 documents, found {len(docs)}")
        calib, evals = tuple(t for _, t in docs[:-1]), (docs[-1][1],)
    return Corpus(name, calib, evals, description)


def _gensim_test_file(filename: str) -> str:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise JaxcompError("corpora enwiki-sample and lee need gensim: pip install gensim")
    return os.path.join(spec.submodule_search_locations[0], "test", "test_data", filename)


def clean_wiki(text: str) -> str:
    """Wiki markup to prose: gensim's ``filter_wiki``, then bold/italic quotes, headings,
    whitespace."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.MULTILINE)
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _enwiki() -> Corpus:
    from gensim.corpora.wikicorpus import extract_pages

    docs = []
    with bz2.BZ2File(_gensim_test_file(_ENWIKI)) as f:
        for title, text, _ in extract_pages(f):
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            clean = clean_wiki(text)
            if len(clean) >= 200:
                docs.append((title, clean))
    return _split("enwiki-sample", docs, "Wikipedia articles from the gensim wheel")


def _lee() -> Corpus:
    with open(_gensim_test_file("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        texts = [" ".join(line.split()) for line in f if line.strip()]
    return _split("lee", [(t, t) for t in texts], "Lee background news corpus (gensim)")


def _wikitext2() -> Corpus:
    import datasets

    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1")
    except Exception as e:  # offline: ConnectionError, OfflineModeIsEnabled, ...
        raise JaxcompError(
            f"wikitext2 needs network access to the Hugging Face hub ({type(e).__name__}); "
            "offline, use enwiki-sample, lee or text:PATH") from None
    # GPTQ convention: the whole split is one document joined by blank lines.
    return Corpus("wikitext2", ("\n\n".join(ds["train"]["text"]),),
                  ("\n\n".join(ds["test"]["text"]),), "WikiText-2 raw (HF hub)")


def _text_file(path: str) -> Corpus:
    if not os.path.isfile(path):
        raise JaxcompError(f"corpus text:{path}: file not found")
    import datasets

    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # "Generating train split" on stderr, once per file
    try:
        ds = datasets.load_dataset("text", data_files=path, sample_by="paragraph",
                                   split="train")
    except Exception as e:
        raise JaxcompError(f"corpus text:{path}: cannot read ({type(e).__name__}: {e})") from None
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    docs = [t.strip() for t in ds["text"] if t.strip()]
    return _split(f"text:{path}", [(f"{i}:{t}", t) for i, t in enumerate(docs)],
                  f"local text file {path}")


@functools.lru_cache(maxsize=8)
def load_corpus(name: str) -> Corpus:
    """Loads a corpus by name (cached in-process).

    Args:
      name: ``enwiki-sample``, ``lee``, ``wikitext2`` or ``text:PATH`` (see module docstring).

    Returns:
      A :class:`Corpus` whose ``calib`` and ``eval`` documents do not overlap.

    Example:
      >>> c = load_corpus("enwiki-sample")
      >>> len(c.calib), len(c.eval)
      (97, 9)
    """
    if name == "enwiki-sample":
        return _enwiki()
    if name == "lee":
        return _lee()
    if name == "wikitext2":
        return _wikitext2()
    if name.startswith("text:"):
        return _text_file(os.path.expanduser(name[5:]))
    close = difflib.get_close_matches(name, CORPORA, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise JaxcompError(f"unknown corpus {name!r}; {hint}valid: {', '.join(CORPORA)}")

"""Prompts as token ids (minintk.tokenization): label words as single tokens of the fallback tokenizer, prompts
that keep their answer cue when cut."""

import pytest

from minintk.data import SENTIMENT_WORDS, DataError, Task
from minintk.tokenization import encode, label_ids, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["In the beginning God created the heaven and the earth. " * 20, "Word: good\nSentiment:"]
    return train_tokenizer(corpus, vocab_size=300, extra_words=SENTIMENT_WORDS)


def test_fallback_tokenizer_makes_label_words_single_tokens(tokenizer):
    i0, i1 = label_ids(tokenizer, SENTIMENT_WORDS)
    assert i0 != i1 and tokenizer.decode([i0]) == " negative"
    assert tokenizer.decode(tokenizer.encode("any text, even ünïcode :-)")) == "any text, even ünïcode :-)"
    with pytest.raises(DataError, match="one token"):
        label_ids(tokenizer, (" heaven and", " earth"))


def test_encode_pads_and_cuts_fields_not_the_answer_cue(tokenizer):
    t = Task("pairs", "classification", [("short", "also short"), ("long " * 50, "other " * 50)], [0, 1],
               "A: {0}\nB: {1}\nAnswer:", SENTIMENT_WORDS)
    enc = encode(t, [0, 1], tokenizer, max_len=40)
    assert enc.ids.shape[1] <= 40 and enc.mask[1].all()
    n0 = int(enc.mask[0].sum())
    assert tokenizer.decode(enc.ids[0, :n0].tolist()) == "A: short\nB: also short\nAnswer:"
    assert (enc.ids[0, n0:] == 0).all() and not enc.mask[0, n0:].any()
    assert tokenizer.decode(enc.ids[1].tolist()).endswith("\nAnswer:")
    assert enc.packed().shape == (2, 2, enc.ids.shape[1])
    with pytest.raises(DataError, match="raise max_len"):
        encode(t, [0], tokenizer, max_len=3)

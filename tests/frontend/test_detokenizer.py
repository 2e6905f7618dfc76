import pytest

from frontend.detokenizer import OutputText
from frontend.tokenizer import Tokenizer
from shared.models import resolve_model

TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "Ünïcödé: naïve café, 東京タワー, 😀🎉 and Ελληνικά.",
    "  leading spaces\n\ttabs and\nnew lines  ",
    "emoji pairs 👩‍👩‍👧 family, flags 🇫🇷🇯🇵",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(resolve_model("default"))


def _decoder(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_equals_full_decode(tok, text):
    prompt = tok.encode("Say something:")
    ids = tok.hf.encode(text, add_special_tokens=False)
    out = OutputText(_decoder(tok), prompt, stop=[])
    streamed = ""
    for tid in ids:
        out.append([tid])
        piece = out.release(finished=False)
        assert "\ufffd" not in piece
        streamed += piece
    streamed += out.release(finished=True)
    assert streamed == out.text == tok.decode(ids)


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(tok):
    text = "The answer is forty-two, of course."
    ids = tok.hf.encode(text, add_special_tokens=False)
    out = OutputText(_decoder(tok), [1], stop=["forty-two"])
    streamed = ""
    for tid in ids:
        out.append([tid])
        streamed += out.release(finished=False)
        if out.stopped:
            break
    streamed += out.release(finished=True)
    assert out.stopped
    assert streamed == out.text == tok.decode(ids).split("forty-two")[0]
    assert "forty" not in streamed


def test_include_stop_str_in_output(tok):
    ids = tok.hf.encode("one two three four", add_special_tokens=False)
    out = OutputText(_decoder(tok), [1], stop=[" three"], include_stop_str_in_output=True)
    for tid in ids:
        out.append([tid])
        if out.stopped:
            break
    assert out.text.endswith(" three") and "four" not in out.text


def test_earliest_of_several_stop_strings_wins(tok):
    ids = tok.hf.encode("alpha beta gamma delta", add_special_tokens=False)
    out = OutputText(_decoder(tok), [1], stop=["delta", "beta"])
    out.append(ids)
    assert out.stopped and out.text.rstrip() == tok.decode(ids).split("beta")[0].rstrip()


def test_stop_strings_are_ignored_before_min_tokens(tok):
    ids = tok.hf.encode("stop here, then stop again", add_special_tokens=False)
    early = OutputText(_decoder(tok), [], stop=["stop"], min_tokens=0)
    held = OutputText(_decoder(tok), [], stop=["stop"], min_tokens=3)
    for out in (early, held):
        for tid in ids:
            out.append([tid])
            if out.stopped:
                break
    assert early.stopped and early.text == ""
    assert held.stopped and held.text == "stop here, then "


def test_a_multi_token_delta_keeps_only_the_tokens_up_to_the_stop_string(tok):
    # Speculative decoding accepts several tokens per step: a stop string completed inside the run
    # ends the output there, the later tokens are not taken, as with one token per delta.
    text = "The answer is forty-two, of course. And more after it."
    ids = tok.hf.encode(text, add_special_tokens=False)
    one_by_one = OutputText(_decoder(tok), [], stop=["two,"])
    for tid in ids:
        if one_by_one.stopped:
            break
        one_by_one.append([tid])
    at_once = OutputText(_decoder(tok), [], stop=["two,"])
    taken = at_once.append(ids)
    assert at_once.stopped and at_once.text == one_by_one.text == "The answer is forty-"
    assert taken == len(one_by_one.token_ids) < len(ids) and at_once.token_ids == ids[:taken]
    assert at_once.append(ids[taken:]) == 0  # nothing is taken after a stop

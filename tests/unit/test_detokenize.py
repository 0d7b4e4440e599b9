"""Incremental detokenisation and stop strings."""

from serving.detokenize import IncrementalDetokenizer, StopStrings
from serving_fakes import tokenizer


def stream_text(tok, prompt_ids, ids, step=1):
    d = IncrementalDetokenizer(tok, prompt_ids)
    parts = [d.add(ids[i:i + step]) for i in range(0, len(ids), step)]
    parts.append(d.flush())
    return parts


def test_streamed_text_equals_full_decode_including_multibyte_characters():
    tok = tokenizer()
    text = "Shuttle streams ünïcödé, 你好, and emoji 🚀 one token at a time."
    ids = tok.encode(text).ids
    prompt = tok.encode("Prompt: ").ids
    for step in (1, 2, 3):
        parts = stream_text(tok, prompt, ids, step)
        assert "".join(parts) == tok.decode(ids)
        assert not any("\ufffd" in p for p in parts), "half a character was emitted"


class SpaceDroppingDecoder:
    """Like SentencePiece: the first word of a decoded text loses its leading space."""

    words = {1: " Hello", 2: " world", 3: "!", 4: " again"}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.words[i] for i in ids).lstrip(" ")


def test_leading_spaces_survive_token_by_token_decoding():
    parts = stream_text(SpaceDroppingDecoder(), [1], [2, 3, 4])
    assert "".join(parts) == " world! again"


def test_stop_string_split_across_tokens_is_found_and_cut():
    s = StopStrings(["###", "END"])
    emitted = []
    for delta in ["abc #", "#", "x ##", "#tail"]:
        text, stopped = s.feed(delta)
        emitted.append(text)
        if stopped:
            break
    assert "".join(emitted) == "abc ##x "
    assert stopped


def test_text_that_only_looks_like_a_stop_string_is_released():
    s = StopStrings(["STOP"])
    out = [s.feed(d) for d in ["go ST", "OR", "E"]]
    assert out[0] == ("go ", False)          # "ST" is held back
    assert out[1] == ("STOR", False)
    assert s.flush() == "" and out[2] == ("E", False)


def test_earliest_stop_string_wins_and_no_stops_passes_through():
    s = StopStrings(["b", "a"])
    assert s.feed("xxbxa") == ("xx", True)
    assert StopStrings([]).feed("anything") == ("anything", False)

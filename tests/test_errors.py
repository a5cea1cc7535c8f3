"""Other libraries' messages become one line, cut only between sentences."""

from featcache.errors import brief, choice_error


def test_brief_joins_lines_and_keeps_whole_sentences():
    message = ("A total of 2 objects could not be loaded. Example error message for object <Dense name=dense>:\n\n"
               "Layer 'dense' expected 2 variables, but received 0 variables during loading. "
               "Expected: ['kernel', 'bias']\n\nList of objects that could not be loaded:\n" + "x" * 400)
    text = brief(ValueError(message), limit=200)
    assert "\n" not in text and len(text) <= 200
    assert text.startswith("A total of 2 objects could not be loaded. Example error message")
    assert text.endswith((".", ":", ";"))
    assert brief(ValueError("short\nmessage")) == "short message"
    assert brief(KeyError()) == "KeyError"
    assert brief(ValueError("y" * 500), limit=50).endswith("…")


def test_choice_error_names_allowed_and_received():
    error = choice_error("pooling", ["avg", "max"], "mean")
    assert isinstance(error, ValueError) and "'avg', 'max'" in str(error) and "'mean'" in str(error)

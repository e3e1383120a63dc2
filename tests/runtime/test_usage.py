"""Token counts read the same way for every endpoint (runtime/usage.py): a responses batch's
`input_tokens`/`output_tokens` feed online calibration and the length model like chat's
`prompt_tokens`/`completion_tokens` (they were read as a 1-token answer before)."""

from __future__ import annotations

from runtime.executor.planning import served_record
from runtime.usage import Usage, hit_length_cap, usage_of

CHAT = {"usage": {"prompt_tokens": 120, "completion_tokens": 37,
                  "prompt_tokens_details": {"cached_tokens": 64}},
        "choices": [{"finish_reason": "stop"}, {"finish_reason": "length"}]}
RESPONSE = {"object": "response", "status": "incomplete",
            "incomplete_details": {"reason": "max_output_tokens"},
            "usage": {"input_tokens": 120, "output_tokens": 37,
                      "input_tokens_details": {"cached_tokens": 64},
                      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 157}}


def test_chat_and_responses_usages_read_alike() -> None:
    assert usage_of(CHAT) == usage_of(RESPONSE) == Usage(120, 37, 64)
    assert usage_of({}) == usage_of(None) == usage_of({"usage": "x"}) == Usage(None, None, None)
    assert usage_of({"usage": {"prompt_tokens": True, "completion_tokens": -3}}) == \
        Usage(None, None, None)


def test_a_response_is_a_calibration_observation_of_its_real_length() -> None:
    chat = served_record(CHAT, 100, 0.0, 1.0, 2.0)
    resp = served_record(RESPONSE, 100, 0.0, 1.0, 2.0)
    assert resp is not None and chat is not None
    assert (resp.prompt_tokens, resp.output_tokens) == (chat.prompt_tokens, chat.output_tokens) \
        == (120 - 64, 37)


def test_length_caps_of_choices_and_of_a_response() -> None:
    assert hit_length_cap(CHAT) == [False, True]
    assert hit_length_cap(RESPONSE) == [True]
    assert hit_length_cap({"status": "completed", "usage": {}}) == [False]

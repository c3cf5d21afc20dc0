"""Server-sent events and OpenAI chunks, sans I/O."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioai.errors import ErrorCode, UpstreamError
from trioai.protocol import Done, Usage, encode, encode_token
from trioai.sse import DONE, Chunk, SSEDecoder, ToolCallDelta, encodable, parse_chunk, stream_error

VLLM_STREAM = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant",'
    b'"content":""},"finish_reason":null}]}\n\n'
    b": keep-alive\n\n"
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi \xc3\xbc"},'
    b'"finish_reason":null}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
    b"\n\n"
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,'
    b'"completion_tokens":2,"total_tokens":11}}\n\n'
    b"data: [DONE]\n\n"
)


def decode_all(data: bytes, pieces: list[int]) -> list[str]:
    """Feed ``data`` cut at the given offsets."""
    decoder = SSEDecoder()
    events: list[str] = []
    start = 0
    for cut in [*sorted(pieces), len(data)]:
        events += decoder.feed(data[start:cut])
        start = cut
    return events


def test_a_vllm_stream_decodes_to_its_chunks() -> None:
    events = SSEDecoder().feed(VLLM_STREAM)
    chunks = [parse_chunk(e) for e in events]
    assert chunks == [
        Chunk(),
        Chunk(content="Hi ü"),
        Chunk(finish_reason="stop"),
        Chunk(prompt_tokens=9, completion_tokens=2),
        DONE,
    ]
    assert chunks[3].has_usage and not chunks[1].has_usage


def test_every_split_point_gives_the_same_events() -> None:
    whole = SSEDecoder().feed(VLLM_STREAM)
    for cut in range(len(VLLM_STREAM) + 1):
        assert decode_all(VLLM_STREAM, [cut]) == whole, cut


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(VLLM_STREAM)), max_size=12))
def test_any_fragmentation_gives_the_same_events(cuts: list[int]) -> None:
    assert decode_all(VLLM_STREAM, cuts) == SSEDecoder().feed(VLLM_STREAM)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_all_three_line_endings(newline: bytes) -> None:
    stream = b"data: a" + newline + newline + b"data: b" + newline + newline
    decoder = SSEDecoder()
    events = decoder.feed(stream)
    if newline == b"\r":
        # A final \r may be half of a \r\n: the last event is complete once the next byte comes.
        assert events == ["a"]
        events += decoder.feed(b":")
    assert events == ["a", "b"]
    # A \r\n split between two feeds is one line end, not two.
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n\r\n") == ["a"]


def test_multi_line_data_is_joined_with_newlines() -> None:
    assert SSEDecoder().feed(b"data: line one\ndata: line two\ndata:three\n\n") == ["line one\nline two\nthree"]


def test_comments_other_fields_and_events_without_data_are_skipped() -> None:
    stream = b": comment\nevent: ping\nid: 7\nretry: 1000\n\n: another\n\ndata: x\n\n"
    assert SSEDecoder().feed(stream) == ["x"]


def test_only_one_leading_space_is_removed() -> None:
    assert SSEDecoder().feed(b"data:  two spaces\n\n") == [" two spaces"]


def test_an_event_needs_its_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: pending\n") == []
    assert decoder.feed(b"\n") == ["pending"]


def test_multibyte_characters_split_across_feeds() -> None:
    decoder = SSEDecoder()
    encoded = "data: 🦜ü\n\n".encode()
    events = []
    for i in range(len(encoded)):
        events += decoder.feed(encoded[i : i + 1])
    assert events == ["🦜ü"]


def test_an_over_long_line_is_an_upstream_error_not_unbounded_memory() -> None:
    decoder = SSEDecoder(max_line_bytes=1024)
    decoder.feed(b"data: " + b"x" * 1000)
    with pytest.raises(UpstreamError) as caught:
        decoder.feed(b"x" * 100)
    assert caught.value.code is ErrorCode.UPSTREAM_ERROR
    assert "longer than 1024 bytes" in caught.value.message
    # Complete lines of any count are fine as long as each is short.
    assert len(SSEDecoder(max_line_bytes=1024).feed(b"data: y\n\n" * 1000)) == 1000


def test_chunk_with_a_finish_reason_and_content() -> None:
    data = '{"choices":[{"index":0,"delta":{"content":"end"},"finish_reason":"length"}]}'
    assert parse_chunk(data) == Chunk(content="end", finish_reason="length")


def test_reasoning_and_tool_deltas_carry_no_content() -> None:
    assert parse_chunk('{"choices":[{"delta":{"reasoning_content":"hmm"}}]}') == Chunk(reasoning="hmm")
    assert parse_chunk('{"choices":[{"delta":{"content":null,"tool_calls":[]}}]}') == Chunk()


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_reasoning_under_either_name(field: str) -> None:
    """vLLM 0.32 streams ``reasoning``; older vLLM and llama.cpp ``reasoning_content``."""
    assert parse_chunk('{"choices":[{"delta":{"' + field + '":"let me think"}}]}') == Chunk(reasoning="let me think")
    assert parse_chunk('{"choices":[{"delta":{"role":"assistant","content":"","' + field + '":"x"}}]}').reasoning == "x"


def test_tool_call_deltas_as_vllm_streams_them() -> None:
    first = ('{"choices":[{"delta":{"tool_calls":[{"id":"chatcmpl-tool-1","type":"function","index":0,'
             '"function":{"name":"get_weather"}}]}}]}')
    assert parse_chunk(first).tool_calls == (ToolCallDelta(0, "chatcmpl-tool-1", "get_weather", ""),)
    later = '{"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{\\"a\\": 1"}}]}}]}'
    assert parse_chunk(later).tool_calls == (ToolCallDelta(1, None, None, '{"a": 1'),)
    lone = '{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\\ud83d"}}]}}]}'
    assert parse_chunk(lone).tool_calls[0].arguments == "\ufffd"


@pytest.mark.parametrize("calls", [
    '"x"', '{"index":0}', '[1]', '[{"index":-1}]', '[{"index":"0"}]', '[{"index":0,"id":5}]',
    '[{"index":0,"function":[]}]',
    '[{"index":0,"function":{"name":7}}]', '[{"index":0,"function":{"arguments":{"a":1}}}]',
])
def test_malformed_tool_call_deltas_are_an_upstream_error(calls: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        parse_chunk('{"choices":[{"delta":{"tool_calls":' + calls + "}}]}")
    assert caught.value.code is ErrorCode.UPSTREAM_ERROR


def test_logprobs_are_kept_as_plain_json() -> None:
    data = ('{"choices":[{"delta":{"content":"Hi"},"logprobs":{"content":[{"token":"Hi","logprob":-Infinity,'
            '"bytes":[72,105],"top_logprobs":[{"token":"Hi","logprob":-0.5,"bytes":[72,105]}]}]}}]}')
    chunk = parse_chunk(data)
    assert chunk.content == "Hi"
    assert chunk.logprobs == ({"token": "Hi", "logprob": None, "bytes": [72, 105],
                               "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}]},)
    assert parse_chunk('{"choices":[{"delta":{"content":"x"},"logprobs":null}]}').logprobs is None


def test_usage_without_prompt_tokens() -> None:
    chunk = parse_chunk('{"choices":[],"usage":{"completion_tokens":5}}')
    assert chunk == Chunk(completion_tokens=5)
    assert chunk.has_usage


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not an object"),
        ('{"choices": ["x"]}', "malformed 'choices'"),
        ('{"choices": {"a": 1}}', "malformed 'choices'"),
        ("[" * 50_000 + "]" * 50_000, "not JSON"),
    ],
)
def test_malformed_chunks_are_upstream_errors(data: str, message: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        parse_chunk(data)
    assert caught.value.code is ErrorCode.UPSTREAM_ERROR
    assert message in caught.value.message


def test_in_stream_error_objects() -> None:
    with pytest.raises(UpstreamError) as caught:
        parse_chunk(json.dumps({"error": {"message": "CUDA out of memory", "type": "InternalServerError",
                                          "code": 500}}))
    assert (caught.value.code, caught.value.message) == (ErrorCode.UPSTREAM_ERROR, "CUDA out of memory")
    # vLLM's flat ErrorResponse, with a 4xx code: the client's request was at fault.
    flat = {"object": "error", "message": "max_tokens is too large", "type": "BadRequestError", "code": 400}
    with pytest.raises(UpstreamError) as caught:
        parse_chunk(json.dumps(flat))
    assert (caught.value.code, caught.value.message) == (ErrorCode.INVALID_REQUEST, "max_tokens is too large")


def test_stream_error_without_a_message_and_with_a_huge_one() -> None:
    assert stream_error({"error": "boom"}).message == "boom"
    assert stream_error({"error": {}}).message == "engine reported an error mid-stream"
    assert stream_error({"error": {"message": "x", "code": 429}}).code is ErrorCode.UPSTREAM_ERROR
    huge = stream_error({"error": {"message": "y" * 10_000}})
    assert len(huge.message) == 1000 and huge.message.endswith("…")


def test_an_over_long_line_arriving_whole_is_refused_too() -> None:
    with pytest.raises(UpstreamError, match="longer than 64 bytes"):
        SSEDecoder(max_line_bytes=64).feed(b"data: " + b"x" * 100 + b"\n\n")


def feed_lines(decoder: SSEDecoder, line: bytes, count: int) -> None:
    """Feed ``line`` ``count`` times, one read each."""
    for _ in range(count):
        assert decoder.feed(line) == []


def test_data_lines_without_the_blank_line_that_ends_an_event_are_bounded() -> None:
    """Short ``data:`` lines and never a blank line: the event's size is capped, not our memory."""
    with pytest.raises(UpstreamError) as caught:
        feed_lines(SSEDecoder(max_line_bytes=1024, max_event_bytes=4096), b"data: x\n", 10_000)
    assert caught.value.code is ErrorCode.UPSTREAM_ERROR
    assert "larger than 4096 bytes" in caught.value.message
    # All in one read as well; and the cap is per event, so many small events stay fine.
    with pytest.raises(UpstreamError, match="larger than 4096 bytes"):
        SSEDecoder(max_event_bytes=4096).feed(b"data: x\n" * 10_000)
    assert len(SSEDecoder(max_event_bytes=4096).feed(b"data: x\ndata: y\n\n" * 10_000)) == 10_000


def test_the_event_cap_defaults_to_one_mebibyte() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: " + b"x" * 1000 + b"\n\n") == ["x" * 1000]
    with pytest.raises(UpstreamError, match="larger than 1048576 bytes"):
        feed_lines(decoder, b"data: " + b"x" * 1000 + b"\n", 2000)


@pytest.mark.parametrize(
    ("escaped", "expected"),
    [
        ("\\ud83d", "\ufffd"),  # a high surrogate alone
        ("a\\uDE00b", "a\ufffdb"),  # a low one, upper-case hex
        ("\\ude00\\ud83d", "\ufffd\ufffd"),  # a pair in the wrong order is two lone ones
        ("\\ud83d\\ude00 ok", "😀 ok"),  # a proper pair is kept
        ("\\\\ud83d", "\\ud83d"),  # an escaped backslash, then text: no surrogate at all
    ],
)
def test_lone_surrogates_from_the_engine_become_replacement_characters(escaped: str, expected: str) -> None:
    """JSON can carry a lone surrogate; UTF-8 (a WebSocket text frame) cannot."""
    chunk = parse_chunk('{"choices":[{"delta":{"content":"' + escaped + '"},"finish_reason":"' + escaped + '"}]}')
    assert chunk == Chunk(content=expected, finish_reason=expected)
    encode_token('"r"', chunk.content).encode()
    encode(Done("r", chunk.finish_reason, Usage(1, 1), None, None)).encode()


def test_lone_surrogates_in_an_in_stream_error_are_replaced() -> None:
    with pytest.raises(UpstreamError) as caught:
        parse_chunk('{"error":{"message":"bad \\ud800 input","code":400}}')
    assert caught.value.message == "bad \ufffd input"
    assert stream_error({"error": {"message": "x\udfff"}}).message == "x\ufffd"
    assert stream_error({"error": "y\ud800"}).message == "y\ufffd"


def test_encodable_leaves_valid_text_alone() -> None:
    text = "plain ASCII, ü, 漢字, 🦜"
    assert encodable(text) == text
    assert encodable("\ud800\udc00") == "\ufffd\ufffd"  # two lone surrogates in a str are not a pair


@pytest.mark.parametrize("count", [10**307, 10**400, 2**53 + 1, -1], ids=["1e307", "1e400", "2**53+1", "-1"])
def test_absurd_token_counts_are_ignored(count: int) -> None:
    """A count no engine can mean: left out (the gateway counts deltas), never an overflow or an inf."""
    assert parse_chunk(f'{{"choices":[],"usage":{{"prompt_tokens":{count},"completion_tokens":2}}}}') == Chunk(
        prompt_tokens=None, completion_tokens=2)
    assert not parse_chunk(f'{{"choices":[],"usage":{{"prompt_tokens":1,"completion_tokens":{count}}}}}').has_usage

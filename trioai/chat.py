"""``trioai chat``: a terminal chat over the WebSocket API, built on :mod:`trioai.client`.

Interactive: the conversation is kept and sent whole each turn; tokens print as they arrive;
Ctrl-C while an answer streams cancels that answer (the server stops the engine), Ctrl-C or Ctrl-D
at the prompt leaves. A reasoning model's thinking prints dimmed before its answer; function calls
the answer ends with print as ``→ name(arguments)``. After each answer a dim line gives time to
first token and tokens/s. Dim is ANSI, written only to a terminal.
``--once PROMPT`` answers one prompt on stdout for scripts (the thinking and the stats line go to
stderr); the exit status says whether it worked.

The connection is opened with ``resume=True``: when it drops mid-answer (a proxy or server-side
cut), the client reconnects and resumes the answer, which prints whole and once; the stats line then
says ``(reconnected)``. A drop between turns is repaired when the next one is sent.
"""

from __future__ import annotations

import signal
import sys
from functools import partial
from typing import Any, Final, TextIO

import trio

from .client import ClientError, Connection, GenerationError, ReasoningDelta, Stream, TextDelta, connect

DIM: Final = "\x1b[2m"
RESET: Final = "\x1b[0m"
PROMPT: Final = "you> "
ARROW: Final = "→"


def is_tty(out: TextIO) -> bool:
    """Whether ``out`` is a terminal (ANSI styles are written only to one)."""
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def dim(text: str, out: TextIO) -> str:
    """``text`` dimmed if ``out`` is a terminal, else as it is."""
    return f"{DIM}{text}{RESET}" if is_tty(out) else text


def tool_call_line(call: dict[str, Any]) -> str:
    """How a function call prints: ``→ get_weather({"city": "Paris"})``."""
    return f"{ARROW} {call.get('name')}({call.get('arguments') or ''})"


def stats_line(stream: Stream) -> str:
    """The summary printed after an answer."""
    if stream.cancelled:
        return "(cancelled)"
    parts = []
    if stream.ttft_ms is not None:
        parts.append(f"first token {stream.ttft_ms:.0f} ms")
    if stream.tokens_per_s is not None:
        parts.append(f"{stream.tokens_per_s:.1f} tok/s")
    if stream.usage is not None:
        parts.append(f"{stream.usage.get('completion_tokens')} tokens")
    if stream.finish_reason:
        parts.append(f"finish: {stream.finish_reason}")
    if stream.resumes:
        parts.append("(reconnected)" if stream.resumes == 1 else f"(reconnected {stream.resumes} times)")
    return ", ".join(parts)


async def answer(conn: Connection, messages: list[dict[str, Any]], max_tokens: int | None, out: TextIO,
                 *, interactive: bool, thoughts: TextIO | None = None) -> tuple[str, Stream]:
    """Stream one answer to ``out``; in interactive mode, Ctrl-C cancels it.

    Reasoning goes to ``thoughts`` (default ``out``), dimmed on a terminal and ended by a newline
    when the answer starts; the function calls the answer ends with follow it, one line each. The
    output ends without a newline, as the answer does.
    """
    thoughts = out if thoughts is None else thoughts
    pieces: list[str] = []
    printed = False  # anything written to ``out``
    thinking = False  # reasoning written, not yet closed
    styled = is_tty(thoughts)

    def write(stream: TextIO, text: str) -> None:
        stream.write(text)
        stream.flush()

    def end_thinking() -> None:
        nonlocal thinking, printed
        if thinking:
            write(thoughts, (RESET if styled else "") + "\n")
            thinking = False
            printed = printed or thoughts is out

    async with conn.generate(messages, max_tokens=max_tokens) as stream:
        try:
            async with trio.open_nursery() as nursery:
                if interactive:
                    nursery.start_soon(_cancel_on_sigint, stream)
                async for event in stream.events():
                    if isinstance(event, ReasoningDelta):
                        if not thinking:
                            if printed and thoughts is out and not "".join(pieces[-1:]).endswith("\n"):
                                write(out, "\n")
                            write(thoughts, DIM if styled else "")
                            thinking = True
                        write(thoughts, event.text)
                    elif isinstance(event, TextDelta):
                        end_thinking()
                        pieces.append(event.text)
                        printed = printed or bool(event.text)
                        write(out, event.text)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The Ctrl-C watcher never fails: the group holds the stream's own error.
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            raise
        finally:
            end_thinking()
    if not stream.cancelled:
        for call in stream.tool_calls:
            write(out, ("\n" if printed else "") + tool_call_line(call))
            printed = True
    return "".join(pieces), stream


async def _cancel_on_sigint(stream: Stream) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            await stream.cancel()


async def run_once(url: str, prompt: str, *, api_key: str | None, max_tokens: int | None, system: str | None) -> int:
    """Answer ``prompt`` on stdout; the stats line and errors go to stderr. Returns the exit status."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        async with connect(url, api_key=api_key, resume=True) as conn:
            _, stream = await answer(conn, messages, max_tokens, sys.stdout, interactive=False, thoughts=sys.stderr)
    except GenerationError as exc:
        print(f"\ntrioai chat: {exc}", file=sys.stderr)
        return 1
    except (ClientError, OSError) as exc:
        print(f"\ntrioai chat: cannot talk to {url}: {exc}", file=sys.stderr)
        return 1
    print()
    print(dim(stats_line(stream), sys.stderr), file=sys.stderr)
    return 0


async def run_interactive(url: str, *, api_key: str | None, max_tokens: int | None, system: str | None) -> int:
    """The chat loop; returns the exit status."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    try:
        async with connect(url, api_key=api_key, resume=True) as conn:
            print(dim(f"connected to {url}; Ctrl-C stops an answer, Ctrl-D leaves", sys.stdout), flush=True)
            while True:
                line = await _read_line()
                if line is None:
                    print()
                    return 0
                if not line.strip():
                    continue
                messages.append({"role": "user", "content": line})
                try:
                    text, stream = await answer(conn, messages, max_tokens, sys.stdout, interactive=True)
                except GenerationError as exc:
                    messages.pop()
                    print("\n" + dim(f"error: {exc}", sys.stdout), flush=True)
                    continue
                print("\n" + dim(stats_line(stream), sys.stdout), flush=True)
                if stream.cancelled:
                    messages.pop()  # an answer cut short is not part of the conversation
                else:
                    messages.append({"role": "assistant", "content": text})
    except (ClientError, OSError) as exc:
        print(f"\ntrioai chat: cannot talk to {url}: {exc}", file=sys.stderr)
        return 1


async def _read_line() -> str | None:
    """One line from the terminal; None at EOF or Ctrl-C at the prompt."""

    def read() -> str | None:
        try:
            return input(PROMPT)
        except EOFError:
            return None

    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            result: list[str | None] = []

            async def reader() -> None:
                result.append(await trio.to_thread.run_sync(read, abandon_on_cancel=True))
                nursery.cancel_scope.cancel()

            async def interrupted() -> None:
                async for _ in signals:
                    result.append(None)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(reader)
            nursery.start_soon(interrupted)
    return result[0] if result else None


def main(url: str, *, once: str | None, api_key: str | None, max_tokens: int | None, system: str | None) -> int:
    """Run the chat (``trioai chat``); returns the exit status."""
    if once is not None:
        return trio.run(partial(run_once, url, once, api_key=api_key, max_tokens=max_tokens, system=system))
    return trio.run(partial(run_interactive, url, api_key=api_key, max_tokens=max_tokens, system=system))

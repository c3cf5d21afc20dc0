"""One ``/v1/responses`` connection: OpenAI's Responses WebSocket mode over the same core.

Everything but the wire protocol is :class:`~trioai.session.Session`'s: the outbox and its
writer, pings, timeouts, the registry that runs generations, admission, limits and metrics. This
class only turns frames into core requests (``responses.parse_client_event``) and gives each
generation a :class:`~trioai.responses.ResponseEncoder`, which turns its neutral events into the
SDK's events as the writer sends them.

Per connection, as OpenAI's WebSocket mode does: the last responses (input and output items,
bounded in count and bytes: ``responses.ResponseHistory``) for ``previous_response_id``, and which
response runs on which ``stream_id`` lane, for ``response.cancel``. Closing the socket cancels
its responses (they are never resumable), which closes their engine requests.
"""

from __future__ import annotations

import time

from trio_websocket import WebSocketConnection

from .errors import ErrorCode, UpstreamError
from .gateway import Gateway
from .protocol import Error, RequestId
from .responses import (
    CancelResponse,
    CreateResponse,
    ResponseEncoder,
    ResponseHistory,
    ResponsesError,
    SteerResponse,
    error_frame,
    parse_client_event,
    steer_failed_frame,
)
from .session import Session


class ResponsesSession(Session):
    """The Responses API's wire protocol on one connection."""

    __slots__ = ("history", "_lanes", "_lane")

    def __init__(self, ws: WebSocketConnection, gateway: Gateway, conn_id: int, client: str = "-",
                 key_id: str | None = None) -> None:
        super().__init__(ws, gateway, conn_id, client, key_id)
        self.history = ResponseHistory()
        self._lanes: dict[str, RequestId] = {}  # stream_id -> the response running on it
        self._lane: str | None = None  # the lane of the create being refused, for refuse()

    async def handle(self, data: str | bytes) -> None:
        """Act on one client frame: ``response.create``, ``response.cancel`` or ``response.steer``."""
        try:
            event = parse_client_event(data, self.gateway.limits, self.history)
        except ResponsesError as exc:
            await self.outbox.send_frame(exc.frame())
            return
        if isinstance(event, CreateResponse):
            await self._create(event)
        elif isinstance(event, CancelResponse):
            await self._cancel_response(event)
        elif isinstance(event, SteerResponse):
            await self.outbox.send_frame(steer_failed_frame(event))

    async def refuse(self, error: Error) -> None:
        """A refused create gets the Responses form of the error, on its lane."""
        await self.outbox.send_frame(error_frame(error, self._lane))

    async def _create(self, create: CreateResponse) -> None:
        self._lane = create.stream_id
        try:
            await self._start_response(create)
        finally:
            self._lane = None

    async def _start_response(self, create: CreateResponse) -> None:
        if create.stream_id is not None and create.stream_id in self._lanes:
            # A lane runs its responses one after another, as OpenAI's WebSocket mode does.
            await self.refuse(Error(create.id, ErrorCode.DUPLICATE_ID,
                                    "a response is still running on this stream_id: wait for its terminal event "
                                    "or cancel it", "stream_id"))
            return
        try:
            model = await self.gateway.pool.resolve(create.model)  # model_not_found for one no engine serves
        except UpstreamError as exc:
            await self.refuse(Error(create.id, exc.code.value, exc.message, exc.param))
            return
        encoder = ResponseEncoder(create, model, int(time.time()), on_finished=self._finished)
        if not create.generate:  # only store the input, for a later previous_response_id
            for frame in encoder.warmup():
                await self.outbox.send_frame(frame)
            return
        generation = await self._start_stream(create.request, encoder)
        if generation is not None and create.stream_id is not None:
            self._lanes[create.stream_id] = create.id

    def _finished(self, encoder: ResponseEncoder) -> None:
        create = encoder.create
        if create.stream_id is not None and self._lanes.get(create.stream_id) == create.id:
            del self._lanes[create.stream_id]
        if encoder.status not in (None, "failed"):
            self.history.store(create.id, create.input_items, encoder.output_items())

    async def _cancel_response(self, cancel: CancelResponse) -> None:
        response_id: RequestId | None = cancel.response_id
        if response_id is None and cancel.stream_id is not None:
            response_id = self._lanes.get(cancel.stream_id)
        generation = self.active.get(response_id) if response_id is not None else None
        self.gateway.metrics.cancels.inc()
        if generation is None:
            await self.outbox.send_frame(error_frame(
                Error(response_id, ErrorCode.UNKNOWN_ID, "no response of this connection is running with that "
                      "response_id or stream_id", "response_id" if cancel.response_id else "stream_id"),
                cancel.stream_id))
            return
        generation.cancel()

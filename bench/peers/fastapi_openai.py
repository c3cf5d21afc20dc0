"""The common tutorial design trioai is measured against: FastAPI + the OpenAI client + uvicorn.

A WebSocket endpoint that awaits the OpenAI Python client's streaming call inline, under an
``asyncio.Semaphore``, and sends one JSON text per delta. It speaks the plain format (``message`` →
``start``/``token``/``done``); a ``cancel`` is only read after the answer ended, as in the usual
code. Bench-only: fastapi, uvicorn and openai are never runtime dependencies of trioai.

    python -m bench.peers.fastapi_openai --port 8090 --upstream http://127.0.0.1:8001/v1
"""

from __future__ import annotations

import argparse
import asyncio
import os

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from openai import AsyncOpenAI

app = FastAPI()
client = AsyncOpenAI(base_url=os.environ.get("PEER_UPSTREAM", "http://127.0.0.1:8001/v1"), api_key="unused",
                     max_retries=0)
semaphore = asyncio.Semaphore(int(os.environ.get("PEER_CONCURRENCY", "256")))


@app.websocket("/ws/chat")
async def chat(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            data = await ws.receive_json()
            if data.get("type") == "cancel":
                await ws.send_json({"type": "cancelled"})
                continue
            if data.get("type") != "message":
                continue
            async with semaphore:
                await ws.send_json({"type": "start"})
                stream = await client.chat.completions.create(
                    model="fake-model", messages=data["messages"], max_tokens=data.get("max_tokens"), stream=True
                )
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        await ws.send_json({"type": "token", "content": chunk.choices[0].delta.content})
                await ws.send_json({"type": "done"})
    except WebSocketDisconnect:
        pass


def main() -> None:
    """Serve the peer on 127.0.0.1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    # The server logs nothing per connection (trioai logs a line per connection and request).
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()

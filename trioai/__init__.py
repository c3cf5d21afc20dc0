"""trioai: a real-time, bidirectional WebSocket API for LLM engines, built on Trio.

Clients open ``/ws/chat``, send ``message`` events and receive ``start``, ``token`` and ``done``
events; generations are multiplexed over one socket and cancellable at once. Tokens come from any
OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM in production).
"""

__version__ = "0.1.0"

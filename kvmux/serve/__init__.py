"""Serving an engine: the Unix-socket server, its wire protocol, the socket file's life cycle, and the
client library; the OpenAI-compatible HTTP server and its Prometheus metrics. The client and the protocol
import neither torch nor the engine."""

"""The OpenAI-compatible HTTP API, in the frontend process, beside the ZeroMQ client socket
(docs/http.md). Off unless --http-listen is set.

  setup.py     builds the parts below from the config and the frontend's own parts
  listener.py  uvicorn (httptools) on the frontend's event loop
  app.py       the Starlette routes
  exchange.py  one generation request: submit, await replies, SSE or JSON, abort on disconnect
  replies.py   routes replies to a ZeroMQ client or to an HTTP request's queue
  bodies.py    request bodies (msgspec Structs); translate.py: a body -> a `Generate`
  render.py    replies -> OpenAI's response bytes (shapes.py, logprobs.py)
  health.py    GET /health; auth.py: API keys and the loopback rule; errors.py: error objects

An HTTP request becomes the same `FrontendRequest` a ZeroMQ `Generate` does (Intake,
RequestTable, ResponseStreamer, EngineClient), under a client identity of its own.
"""

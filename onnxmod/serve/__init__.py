"""`onnxmod serve`: onnxmod models behind the Open Inference Protocol (KServe v2) over HTTP/REST.

Stack: Starlette (routing, requests, multipart forms via python-multipart) on uvicorn
(the ASGI server). Both are small, well kept and asyncio-native, which is what dynamic
batching needs: requests wait on futures in one event loop while a per-model batcher
gathers them into one onnxruntime run on a worker thread. FastAPI would add request
models and OpenAPI pages on top of Starlette; the protocol's binary tensor extension
(a JSON header followed by raw bytes) does not fit request models, so plain Starlette
is the smaller fit.

Layout: :mod:`.model` (one served ONNX model: session, I/O description, metadata),
:mod:`.protocol` (v2 request parsing and response encoding, pure functions),
:mod:`.batching` (the dynamic batcher and Triton-style statistics), :mod:`.app`
(routes and error bodies), :mod:`.server` (sockets, uvicorn, signals).
"""

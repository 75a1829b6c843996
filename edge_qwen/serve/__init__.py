"""The HTTP server: the FastAPI app and its middleware, the request/response protocol schemas,
and the OpenAI-shaped error bodies shared with the SDK client."""

"""`qwen3lab serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for any Qwen3 folder.

HTTP over engine.Engine: one thread owns the model and batches requests continuously — a request joins the running
batch at the next decode step, each with its own sampling settings, and leaves it the step it ends (stop id, stop
string, max_tokens, or its client gone), so a short request never waits for a long one to finish.

    app.py               create_app: the engine, the page, health, metrics, models, the API key, errors; serve()
    protocol.py          request bodies, errors, server-sent events, sampling settings
    jobs.py              a request's completions on the engine, as the event loop sees them
    chat_completions.py  POST /v1/chat/completions
    completions.py       POST /v1/completions (legacy schema: every prompt form, echo, log-probs)
    tokens.py            /tokenize, /detokenize, /tokenizer_info
"""

from .app import create_app, serve

__all__ = ["create_app", "serve"]

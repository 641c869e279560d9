"""jaxgpt.serve: an OpenAI-compatible HTTP server with continuous batching, multi-LoRA and a web
chat page (`python -m jaxgpt.serve CKPT`; the flags live in jaxgpt.cli.serve).

    app.py        the FastAPI app: routes, SSE streaming, OpenAI-shaped errors, build_service
    schemas.py    request bodies -> validated settings, or APIError (4xx)
    defaults.py   the sampling settings of the fields a request leaves out (flags, model, built-in)
    scheduler.py  the thread that owns the decode engine (jaxgpt.decode.engine.Engine) and feeds its slots
    metrics.py    counters and histograms, as Prometheus text
    static/       index.html, the chat page served at /

FastAPI and uvicorn (the `serve` extra) are imported only by this package.
"""

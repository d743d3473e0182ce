"""A test double of llama-server's documented surface (/health, /v1/models, /props, /metrics), in
process, for the upstream tests: the real llama-server is not run by them."""

from __future__ import annotations

from aiohttp import web


class LlamaServerSurface:
    """A stand-in for the endpoints llama-server documents: /health, /v1/models, /props, /metrics."""

    ANSWERS = {
        "/health": {"status": "ok"},
        "/v1/models": {"data": [{"id": "qwen3-8b-q4_k_m.gguf", "object": "model"}]},
        "/props": {"default_generation_settings": {"n_ctx": 8192}, "total_slots": 8},
    }
    METRICS = "llamacpp:requests_processing 3\nllamacpp:requests_deferred 2\nllamacpp:kv_cache_usage_ratio 0.4\n"

    def app(self) -> web.Application:
        app = web.Application()
        for path in self.ANSWERS:
            app.router.add_get(path, self.answer)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def answer(self, request: web.Request) -> web.Response:
        return web.json_response(self.ANSWERS[request.path])

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.METRICS)

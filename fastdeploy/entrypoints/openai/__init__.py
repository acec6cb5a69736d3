"""OpenAI-compatible HTTP serving: launcher (api_server), aiohttp app, request parsing, formatting."""

"""Clients of a running FastDeploy server.

- `ChatBot`: the seed-000 HTTP client (implemented in the light `fastdeploy_client` package, which
  has no dependency on this one; re-exported so `fastdeploy.client.ChatBot` works too).
"""
from fastdeploy_client.chatbot import ChatBot

# EngineClient (the ZeroMQ embedding client, issue 5) is exported from here too, once it exists.

__all__ = ["ChatBot"]

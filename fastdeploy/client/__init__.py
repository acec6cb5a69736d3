"""Clients of a running FastDeploy server.

- `ChatBot`: the seed-000 HTTP client (implemented in the light `fastdeploy_client` package, which
  has no dependency on this one; re-exported so `fastdeploy.client.ChatBot` works too).
- `EngineClient` / `AsyncEngineClient`: the ZeroMQ embedding client for a server started with
  `--zmq-bind` (docs/embedding.md).
"""
from fastdeploy.client.engine_client import (AsyncEngineClient, AsyncRequestStream, EngineClient,
                                             EngineClientError, RequestResult, RequestStream)
from fastdeploy_client.chatbot import ChatBot

__all__ = ["AsyncEngineClient", "AsyncRequestStream", "ChatBot", "EngineClient", "EngineClientError",
           "RequestResult", "RequestStream"]

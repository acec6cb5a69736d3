"""fastdeploy_client: the seed-000 client (`ChatBot` and the `fdclient` command) for a FastDeploy
OpenAI-compatible server. Standard library only, so it installs and imports anywhere."""
from fastdeploy_client.chatbot import ChatBot
from fastdeploy_client.errors import ERR_BAD_RESPONSE, ERR_INVALID_ARGUMENT, ERR_TIMEOUT, ERR_UNREACHABLE

__all__ = ["ChatBot", "ERR_BAD_RESPONSE", "ERR_INVALID_ARGUMENT", "ERR_TIMEOUT", "ERR_UNREACHABLE"]

"""Turning engine token ids into user text: incremental detokenization, stop strings, reasoning split.

Free of ZMQ and HTTP so the offline LLM API and the server's detokenizer processes share it.
"""
from fastdeploy.output.detokenizer import IncrementalDetokenizer, RequestTextState, StopChecker
from fastdeploy.output.reasoning import ReasoningParser, get_reasoning_parser

__all__ = ["IncrementalDetokenizer", "RequestTextState", "StopChecker", "ReasoningParser", "get_reasoning_parser"]

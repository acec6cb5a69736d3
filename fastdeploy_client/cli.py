"""`fdclient`: the seed-000 command line.

    FASTDEPLOY_MODEL_URL=host:port fdclient stream_generate "你好?"
    FASTDEPLOY_MODEL_URL=host:port fdclient generate "你好,你是谁?"

Exit status: 0 success, 1 the request failed (message on stderr), 2 usage error (bad arguments or
no server address), 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from fastdeploy_client.chatbot import ChatBot

URL_ENV = "FASTDEPLOY_MODEL_URL"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("message", nargs="+",
                        help="the prompt; several values are alternating user/assistant turns, user first and last")
    common.add_argument("--url", help=f"server address host:port (default: ${URL_ENV})")
    common.add_argument("--model", help="model name to send (default: none, the served model)")
    common.add_argument("--max-dec-len", type=int, default=1024, help="max_tokens (default 1024)")
    common.add_argument("--min-dec-len", type=int, default=2, help="min_tokens (default 2)")
    common.add_argument("--topp", type=float, default=0.0, help="top_p; <= 0 leaves it unset (default 0.0)")
    common.add_argument("--temperature", type=float, default=1.0, help="temperature (default 1.0)")
    common.add_argument("--frequency-score", type=float, default=0.0, help="frequency_penalty (default 0.0)")
    common.add_argument("--penalty-score", type=float, default=1.0, help="repetition_penalty (default 1.0)")
    common.add_argument("--presence-score", type=float, default=0.0, help="presence_penalty (default 0.0)")
    common.add_argument("--eos-token-ids", type=int, nargs="+", metavar="ID", help="stop_token_ids")
    common.add_argument("--req-id", help="request_id (default: a random id)")
    common.add_argument("--timeout", type=float, default=300, help="seconds for the whole request (default 300)")

    parser = argparse.ArgumentParser(
        prog="fdclient", description="Query a FastDeploy OpenAI-compatible server.",
        epilog=f"The server address comes from ${URL_ENV} (host:port) unless --url is given. "
               "Exit status: 0 ok, 1 request failed, 2 usage error.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{stream_generate,generate}")
    commands.add_parser("stream_generate", parents=[common], help="print the answer as it is generated")
    commands.add_parser("generate", parents=[common], help="print the whole answer at the end")
    return parser


def parse_url(url: str) -> tuple[str, int]:
    """"host:port" (optionally "http://host:port/" or "[::1]:port") → (host, port)."""
    text = url.strip().removeprefix("http://").rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {url!r}")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    url = opts.url or os.environ.get(URL_ENV, "")
    if not url:
        print(f"fdclient: set {URL_ENV}=host:port (the server's address) or pass --url host:port",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        host, port = parse_url(url)
    except ValueError as exc:
        print(f"fdclient: bad server address: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _tolerate_unencodable(sys.stdout)
    bot = ChatBot(host, port, model=opts.model)
    message: str | list[str] = opts.message[0] if len(opts.message) == 1 else list(opts.message)
    params = _generation_params(opts)
    try:
        if opts.command == "stream_generate":
            return _run_stream(bot, message, params)
        return _run_generate(bot, message, params)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away; stop quietly and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _generation_params(opts: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_dec_len": opts.max_dec_len, "min_dec_len": opts.min_dec_len, "topp": opts.topp,
        "temperature": opts.temperature, "frequency_score": opts.frequency_score,
        "penalty_score": opts.penalty_score, "presence_score": opts.presence_score,
        "eos_token_ids": opts.eos_token_ids, "req_id": opts.req_id, "timeout": opts.timeout,
    }


def _run_stream(bot: ChatBot, message: str | list[str], params: dict[str, Any]) -> int:
    printed = False
    for item in bot.stream_generate(message, **params):
        if "error_msg" in item:
            if printed:
                sys.stdout.write("\n")
                sys.stdout.flush()
            return _report(item)
        sys.stdout.write(item["token"])
        sys.stdout.flush()
        printed = True
    sys.stdout.write("\n")
    sys.stdout.flush()
    return EXIT_OK


def _run_generate(bot: ChatBot, message: str | list[str], params: dict[str, Any]) -> int:
    result = bot.generate(message, **params)
    if "error_msg" in result:
        return _report(result)
    print(result["results"], flush=True)
    return EXIT_OK


def _report(error: dict[str, Any]) -> int:
    print(f"fdclient: error {error['error_code']}: {error['error_msg']} (req_id {error['req_id']})",
          file=sys.stderr)
    return EXIT_FAILED


def _tolerate_unencodable(stream: TextIO) -> None:
    # A terminal or pipe with a non-UTF-8 encoding must not turn a Chinese answer into a traceback.
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="replace")


if __name__ == "__main__":
    sys.exit(main())

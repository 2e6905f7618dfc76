"""A stand-in for llama.cpp's llama-server: the bench's fake OpenAI server on --port, its model
named by --alias; other flags are accepted and ignored. Runs until SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fake_openai_server import FakeOpenAIServer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--alias", required=True)
parser.add_argument("-m", required=True)
args, _ = parser.parse_known_args()
if not os.path.exists(args.m):
    sys.exit(f"no model file {args.m}")
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
with FakeOpenAIServer(model=args.alias, port=args.port):
    stop.wait()

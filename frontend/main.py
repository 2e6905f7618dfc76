"""`pagedserve frontend`: load the tokenizer, then serve clients until stopped."""

from __future__ import annotations

import asyncio

from shared.config import ServerConfig
from shared.logging import get_logger
from shared.models import resolve_model


def run_frontend(config: ServerConfig) -> int:
    import uvloop

    from frontend.server import FrontendServer
    from frontend.tokenizer import Tokenizer

    log = get_logger()
    files = resolve_model(config.model)
    tokenizer = Tokenizer(files)
    log.info("frontend.tokenizer_loaded", model=files.name, vocab=len(tokenizer))
    server = FrontendServer(config, tokenizer, files.name)
    uvloop.run(server.run())
    return 0

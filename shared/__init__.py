"""pagedserve shared package: wire protocol, client SDK, config, logging. Never imports torch."""

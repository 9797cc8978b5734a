"""QMP: the sans-IO protocol core, the command table and the asyncio servers."""

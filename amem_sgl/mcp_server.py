"""MCP stdio server (``amem mcp``): memory tools for agents, talking to a running amem server.

Tools, each scoped by namespace: ``remember`` (store texts), ``recall`` (search, with scores),
``ask`` (a chat turn with the namespace's memory), ``forget`` (one chunk or the whole namespace).
stdout carries the MCP protocol only; logs go to stderr.

    amem mcp --url http://127.0.0.1:30000 [--api-key KEY]     # or $AMEM_API_KEY

A server with API keys (amem.auth.keys_file) answers each tool only for the namespaces the key covers.
"""

from __future__ import annotations

import functools
import logging
import sys

from amem_sgl.sdk import Amem, AmemError

logger = logging.getLogger("amem_sgl.mcp")


def _reported(tool):
    """A refused request (401/403 of a key, 404, a bad value) reaches the agent with its message, as a
    tool error, rather than as MCP's generic crash report; so does an argument the SDK refuses before
    sending anything (a chunk id that is not one, a namespace like ``../bob``)."""
    from mcp.server.mcpserver.exceptions import ToolError

    @functools.wraps(tool)
    def run(*args, **kwargs):
        try:
            return tool(*args, **kwargs)
        except (AmemError, ValueError, TypeError) as err:
            raise ToolError(str(err)) from None

    return run


def build_server(url: str, api_key: str | None = None):
    from mcp.server.mcpserver import MCPServer

    client = Amem(url, api_key=api_key)  # None: $AMEM_API_KEY
    server = MCPServer("amem", instructions="Long-term memory for agents, kept as reused KV in an amem server. "
                       "Pick one namespace per user or project.")

    @server.tool(description="Remember texts in a namespace; returns the chunk ids.")
    @_reported
    def remember(namespace: str, texts: list[str]) -> dict:
        done = client.remember(namespace, texts)
        return {"namespace": namespace, "ids": done.ids, "new": done.new}

    @server.tool(description="Recall: the chunks of a namespace most similar to a query, with scores.")
    @_reported
    def recall(namespace: str, query: str, k: int = 4) -> dict:
        return {"namespace": namespace, "results": [
            {"id": c.id, "text": c.text, "score": c.score} for c in client.search(namespace, query, k)]}

    @server.tool(description="Ask a question answered with the namespace's memory.")
    @_reported
    def ask(namespace: str, question: str, max_tokens: int = 64) -> dict:
        answer = client.ask(namespace, question, max_tokens=max_tokens)
        return {"answer": answer.text, "chunks": answer.chunk_ids, "spliced_tokens": answer.spliced_tokens}

    @server.tool(description="Forget one chunk (chunk_id: 64 hex characters, as remember returns) or, without "
                 "chunk_id, the whole namespace. An empty or malformed chunk_id is an error, never the namespace.")
    @_reported
    def forget(namespace: str, chunk_id: str | None = None) -> dict:
        return {"namespace": namespace, "forgotten": client.forget(namespace, chunk_id)}

    return server


def main(url: str, api_key: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[amem mcp] %(levelname)s %(message)s")
    logger.info("serving MCP over stdio for %s", url)
    try:
        server = build_server(url, api_key)
    except ValueError as err:  # --url is not a URL
        logger.error("%s", err)
        return 2
    try:
        server.run("stdio")
    except AmemError as err:  # pragma: no cover -- surfaced per tool call by MCP itself
        logger.error("%s", err)
        return 1
    return 0

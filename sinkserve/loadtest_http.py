"""`sinkserve loadtest --protocol openai`: the same endless conversations through the OpenAI
Responses API (POST /v1/responses, streamed), so the HTTP and gRPC doors are compared on one load.

Each conversation chains its responses by previous_response_id; a turn is one POST whose SSE
stream is read to `response.completed` / `response.incomplete`. TTFT is from the POST to the first
`response.output_text.delta`; ITL is the gap before each delta spread over the tokens it carried
(the reply's output_tokens over its deltas: a delta carries one coalesced Tokens message's text).
The client is aiohttp with a hand-read event stream (it only json-parses the final event), so on a
shared box the client costs little more CPU than the gRPC one. A failed turn is retried on the
same previous_response_id (the session resumes wherever its replica is now) until the stall
timeout; a 404 there means the session is lost.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import time
from typing import Any

import aiohttp
import grpc

DEFAULT_OPENAI_PORT = 8100  # AppSettings.openai_port's default

# HTTP status -> the gRPC status the load test's error counts use (one vocabulary for both doors)
_CODES = {
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


class _Failed(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class OpenAIConversations:
    """The HTTP side of a load-test run: one aiohttp session shared by every conversation."""

    def __init__(self, config: Any, words: list[str]) -> None:
        self.config = config  # a sinkserve.loadtest.LoadConfig
        self.words = words
        host = config.target.rsplit(":", 1)[0]
        url = config.openai_url or f"http://{host}:{DEFAULT_OPENAI_PORT}/v1"
        self.url = url.rstrip("/") + "/responses"
        credentials = config.credentials
        headers = {"content-type": "application/json"}
        if credentials is not None and credentials.api_key:
            headers["authorization"] = f"Bearer {credentials.api_key}"
        context = None
        if self.url.startswith("https:") and credentials is not None and credentials.ca:
            context = ssl.create_default_context(cafile=credentials.ca)
        self.http = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=0, ssl=context if context else None),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=config.stall_timeout_s),
        )
        self.model: str | None = None

    async def close(self) -> None:
        await self.http.close()

    async def _model(self) -> str:
        if self.model is None:
            async with self.http.get(self.url.rsplit("/", 1)[0] + "/models") as answer:
                if answer.status != 200:
                    raise _Failed(_code(answer.status), await answer.text())
                self.model = (await answer.json())["data"][0]["id"]
        return self.model

    async def converse(
        self, config: Any, stats: Any, _channel: Any, index: int, deadline: float
    ) -> None:
        """One conversation (loadtest's `_converse`, over HTTP): a LoadConfig, its LoadStats."""
        rng = random.Random(config.seed * 1_000_003 + index)
        await asyncio.sleep(config.ramp_s * index / max(1, config.sessions))
        previous: str | None = None
        position: int | None = None
        opened: list[bool] = []  # set when the first POST is answered (the session is open)
        try:
            while time.monotonic() < deadline and not stats.settled.is_set():
                words = rng.randint(*config.words_per_turn)
                text = " ".join(rng.choice(self.words) for _ in range(words))
                asked = time.monotonic()
                try:
                    final = await self._turn(text, previous, stats, opened)
                except _Failed as failed:
                    first = not opened
                    if first and failed.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        stats.refused += 1
                        stats.refusal.record_value(max(1, int((time.monotonic() - asked) * 1e6)))
                        stats.refusal_details = stats.refusal_details or failed.details
                        return
                    stats.error(failed.code, failed.details)
                    if first:
                        stats.open_failed += 1
                        return
                    if previous is None:  # opened, but its first reply broke: no id to go on
                        stats.lost += 1
                        return
                    if failed.code == grpc.StatusCode.NOT_FOUND:
                        stats.lost += 1
                        return
                    await asyncio.sleep(0.5)  # then the same previous_response_id again
                    continue
                where = final.get("sinkserve", {})
                if previous is not None and where.get("start_position") != position:
                    stats.position_errors += 1
                previous, position = final["id"], where.get("end_position")
                await asyncio.sleep(rng.uniform(*config.think_s))
        except asyncio.CancelledError:
            stats.cut += 1
            raise
        finally:
            if opened:
                stats.active -= 1

    async def _turn(
        self, text: str, previous: str | None, stats: Any, opened: list[bool]
    ) -> dict[str, Any]:
        """One streamed response; the first one answered counts its session as opened (as the
        gRPC load test counts an Open that was answered)."""
        config = self.config
        body: dict[str, Any] = {
            "model": await self._model(),
            "input": text,
            "stream": True,
            "max_output_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "top_p": config.top_p,
        }
        if previous is not None:
            body["previous_response_id"] = previous
        sent = time.monotonic()
        gaps: list[float] = []
        first = last = None
        final: dict[str, Any] | None = None
        try:
            async with self.http.post(self.url, data=json.dumps(body)) as answer:
                if answer.status != 200:
                    raise _Failed(_code(answer.status), _message(await answer.text()))
                if not opened:
                    opened.append(True)
                    stats.opened += 1
                    stats.active += 1
                kind = ""
                async for raw in answer.content:
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "response.output_text.delta":
                        now = time.monotonic()
                        if first is None:
                            first = now
                            stats.ttft.record_value(max(1, int((now - sent) * 1e6)))
                            stats._window_ttft.append(now - sent)
                        else:
                            gaps.append(now - last)
                        last = now
                    elif line.startswith("data: ") and kind in (
                        "response.completed",
                        "response.incomplete",
                    ):
                        final = json.loads(line[6:])["response"]
                    elif line.startswith("data: ") and kind == "response.failed":
                        error = json.loads(line[6:])["response"]["error"]
                        raise _Failed(grpc.StatusCode.UNAVAILABLE, error["message"])
        except (aiohttp.ClientError, TimeoutError) as error:
            raise _Failed(grpc.StatusCode.UNAVAILABLE, f"{type(error).__name__}: {error}") from None
        if final is None:
            raise _Failed(grpc.StatusCode.UNKNOWN, "the event stream ended without a response")
        tokens = final["usage"]["output_tokens"]
        per_delta = tokens / (len(gaps) + 1) if first is not None else 0
        for gap in gaps:
            for _ in range(max(1, round(per_delta))):
                stats.itl.record_value(max(1, int(gap / max(per_delta, 1) * 1e6)))
        stats.turns += 1
        stats.tokens += tokens
        stats._window_tokens += tokens
        return final


def _code(status: int) -> grpc.StatusCode:
    return _CODES.get(status, grpc.StatusCode.UNKNOWN)


def _message(body: str) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:200]

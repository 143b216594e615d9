"""Dummy engine: a 20 ms step loop that produces one token per generating
session per step, and hands tokens to the session's output queue coalesced
(every `coalesce` tokens, and at turn end).  No Ray, no gRPC."""
import asyncio
import time
import uuid


class _Sess:
    __slots__ = ("q", "remaining", "buf", "tok", "n")

    def __init__(self):
        self.q = asyncio.Queue()
        self.remaining = 0
        self.buf = []
        self.tok = 0
        self.n = 0


class EngineSim:
    def __init__(self, step_s=0.02, coalesce=8, slots=4096):
        self.step_s = step_s
        self.coalesce = coalesce
        self.slots = slots
        self.sessions = {}     # sid -> _Sess (open sessions, hold a "slot")
        self.generating = {}   # sid -> _Sess
        self.steps = 0
        self.tokens = 0
        self.flushes = 0
        self.lag_sum = 0.0
        self.lag_max = 0.0
        self._task = None

    def start(self):
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def open(self, sid=None, prefix=""):
        if len(self.sessions) >= self.slots:
            return None
        sid = sid or f"{prefix}{uuid.uuid4().hex[:16]}"
        self.sessions.setdefault(sid, _Sess())
        return sid

    def close(self, sid):
        self.sessions.pop(sid, None)
        self.generating.pop(sid, None)

    def submit(self, sid, max_tokens):
        s = self.sessions[sid]
        s.remaining = max_tokens
        s.buf = []
        s.n = 0
        self.generating[sid] = s
        return s.q

    async def _run(self):
        nxt = time.monotonic()
        while True:
            nxt += self.step_s
            d = nxt - time.monotonic()
            if d > 0:
                await asyncio.sleep(d)
            lag = time.monotonic() - nxt
            if lag > 0:
                self.lag_sum += lag
                self.lag_max = max(self.lag_max, lag)
                if lag > 1.0:          # do not try to "catch up" forever
                    nxt = time.monotonic()
            self.steps += 1
            done = []
            c = self.coalesce
            for sid, s in self.generating.items():
                s.tok += 1
                s.buf.append(s.tok & 0x7FFF)
                s.remaining -= 1
                s.n += 1
                # first token of a turn goes out at once (TTFT), then every
                # `c` tokens, and whatever is left at turn end
                if s.remaining <= 0:
                    s.q.put_nowait((s.buf, True))
                    s.buf = []
                    done.append(sid)
                    self.flushes += 1
                elif s.n == 1 or len(s.buf) >= c:
                    s.q.put_nowait((s.buf, False))
                    s.buf = []
                    self.flushes += 1
            self.tokens += len(self.generating)
            for sid in done:
                self.generating.pop(sid, None)

    def stats(self):
        return {
            "sessions": len(self.sessions),
            "generating": len(self.generating),
            "free_slots": self.slots - len(self.sessions),
            "steps": self.steps,
            "tokens": self.tokens,
            "flushes": self.flushes,
            "step_lag_avg_ms": 1000 * self.lag_sum / max(1, self.steps),
            "step_lag_max_ms": 1000 * self.lag_max,
        }

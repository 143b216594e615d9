"""`sinkserve stats`: the Stats RPC of a running service as a table (one row per replica)."""

from __future__ import annotations

import grpc
from rich.table import Table

from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc


def fetch_stats(target: str, timeout_s: float = 5.0) -> pb.StatsResponse:
    """The gateway's Stats answer; grpc.RpcError when the target does not answer."""
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest(), timeout=timeout_s)


def stats_table(stats: pb.StatsResponse, target: str) -> Table:
    table = Table(
        title=f"sinkserve at {target}: {stats.sessions} sessions, "
        f"{stats.slots_used}/{stats.slots_total} slots used, gateway RSS "
        f"{_mib(stats.gateway_rss_bytes)}",
        title_justify="left",
    )
    columns = (
        "replica", "model", "device", "sessions", "slots used", "slots free", "generated",
        "decoded", "prefilled", "steps", "step p50 ms", "KV arena", "RSS",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("replica", "model") else "right")
    for r in sorted(stats.replicas, key=lambda r: r.replica_id):
        table.add_row(
            r.replica_id,
            r.model,
            r.device,
            str(r.sessions),
            str(r.slots_used),
            str(r.slots_free),
            f"{r.generated_tokens:,}",
            f"{r.decode_tokens:,}",
            f"{r.prefill_tokens:,}",
            f"{r.steps:,}",
            f"{r.step_ms_p50:.1f}",
            _mib(r.kv_bytes),
            _mib(r.process_rss_bytes),
        )
    if not stats.replicas:
        table.caption = "no replica reachable from this gateway"
    return table


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"

"""`sinkserve stats`: the Stats RPC of a running service as a table (one row per replica)."""

from __future__ import annotations

from rich import box
from rich.table import Table

from sinkwire.channels import Credentials, sync_channel
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc


def fetch_stats(
    target: str, timeout_s: float = 5.0, credentials: Credentials | None = None
) -> pb.StatsResponse:
    """The gateway's Stats answer (it needs an admin key where keys are on); grpc.RpcError when
    the target does not answer."""
    with sync_channel(target, credentials) as channel:
        return pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest(), timeout=timeout_s)


def stats_table(stats: pb.StatsResponse, target: str) -> Table:
    replicas = sorted(stats.replicas, key=lambda r: r.replica_id)
    models = ", ".join(sorted({f"{r.model} on {r.device}" for r in replicas})) or "no replica"
    table = Table(
        title=f"sinkserve at {target}: {stats.sessions} sessions, {stats.slots_used}/"
        f"{stats.slots_total} slots used, {models}; gateway RSS {_mib(stats.gateway_rss_bytes)}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
    )
    table.add_column("replica", no_wrap=True)
    columns = ("sessions", "slots", "generated", "prefilled", "step ms", "KV MiB", "RSS MiB")
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True, min_width=len(column))
    for r in replicas:
        table.add_row(
            r.replica_id,
            str(r.sessions),
            f"{r.slots_used}/{r.slots_total}",
            f"{r.generated_tokens:,}",
            f"{r.prefill_tokens:,}",
            f"{r.step_ms_p50:.1f}",
            f"{r.kv_bytes / 2**20:,.0f}",
            f"{r.process_rss_bytes / 2**20:,.0f}",
        )
    captions = [] if replicas else ["no replica reachable from this gateway"]
    if stats.store_rows >= 0:  # -1: no session store, or it did not answer
        captions.append(
            f"session store: {stats.sessions_stored:,} sessions, {stats.store_rows:,} rows "
            f"(expired ones not yet swept included), {_mib(stats.store_bytes)}"
        )
    table.caption = "; ".join(captions) or None
    return table


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"

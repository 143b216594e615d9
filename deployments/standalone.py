"""Run a replica or a gateway without Ray: same gRPC services, fixed addresses.

For machines where Ray cannot run (the benchmark GPU box) and for debugging one piece alone:

    python -m deployments.standalone replica --port 50071 --set model=default
    python -m deployments.standalone gateway --port 50070 --replica localhost:50071

The gateway asks each replica for its id, free slots and sessions by key every half second (the
Stats RPC), which is what the Serve deployment learns from the directory instead. Both take
AppSettings as `--set key=value` (the gateway reads api_keys, tls_*, max_message_bytes,
quota_burst_s from them). Both sides need the same resume secret: SINKSERVE_RESUME_SECRET, or
one kept for this user in the cache directory (deployments/settings.py). Replicas listen on
127.0.0.1 unless given --host, and the gateway too unless its settings say otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time

import grpc

from deployments.gateway_guard import GatewayGuard, gateway_credentials
from deployments.gateway_service import REPLICA_STALE_AFTER_S, GatewayService
from deployments.internal import gateway_metadata, internal_token
from deployments.secrets import check_resume_secret
from deployments.session_service import start_replica_server
from deployments.settings import AppSettings
from deployments.store import StoreUpkeep, open_store
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc

log = logging.getLogger("sinkserve.standalone")


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run_replica(settings: AppSettings, host: str, port: int, replica_id: str) -> None:
    from sinkcache.host.start import start_engine

    loop = asyncio.get_running_loop()
    url = settings.store_url()
    store = open_store(url, ttl_s=settings.session_ttl_s) if url else None
    engine = await start_engine(settings.engine, in_process=not settings.engine_process)
    server, sessions, _, bound = await start_replica_server(
        engine, replica_id, settings, port, store=store, host=host
    )
    sweep = loop.create_task(sessions.sweep())
    upkeep = loop.create_task(StoreUpkeep(store).run()) if store is not None else None
    print(f"ready replica {replica_id} on port {bound}", flush=True)
    await _until_signal()
    await sessions.drain(settings.drain_timeout_s)
    sweep.cancel()
    if upkeep is not None:
        upkeep.cancel()
    sessions.end_streams()
    await server.stop(grace=2)
    await engine.shutdown()


async def run_gateway(
    settings: AppSettings,
    host: str,
    port: int,
    replicas: list[str],
    reuse_port: bool,
    store_url: str | None,
) -> None:
    store = open_store(store_url, ttl_s=3600.0) if store_url else None
    service = GatewayService(store, guard=GatewayGuard.from_settings(settings))
    server = await service.start(host, port, reuse_port, gateway_credentials(settings))
    metadata = gateway_metadata(internal_token(settings.resume_secret), "")

    async def poll() -> None:
        channels = {address: grpc.aio.insecure_channel(address) for address in replicas}
        known: dict[str, tuple[float, list[dict]]] = {}  # address -> (last answer, its replicas)
        while True:
            now = time.monotonic()
            for address, channel in channels.items():
                with contextlib.suppress(grpc.aio.AioRpcError):
                    stats = await pb_grpc.StreamingLLMStub(channel).Stats(
                        pb.StatsRequest(), timeout=2, metadata=metadata
                    )
                    known[address] = (
                        now,
                        [
                            {
                                "replica_id": replica.replica_id,
                                "address": address,
                                "slots_free": replica.slots_free,
                                "held": replica.sessions + replica.sessions_offloaded,
                                "accepting": not replica.draining,
                                "owners": dict(replica.sessions_by_key),
                            }
                            for replica in stats.replicas
                        ],
                    )
            # A replica that misses one poll keeps its streams; one silent this long is gone.
            for address, (seen, _) in list(known.items()):
                if now - seen > REPLICA_STALE_AFTER_S:
                    del known[address]
            await service.update([info for _, infos in known.values() for info in infos])
            await asyncio.sleep(0.5)

    poller = asyncio.get_running_loop().create_task(poll())
    print(f"ready gateway on {host}:{port} for {', '.join(replicas)}", flush=True)
    await _until_signal()
    poller.cancel()
    await service.close()
    await server.stop(grace=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    rep = sub.add_parser("replica")
    rep.add_argument("--host", default="127.0.0.1", help="the address gateways reach it by")
    rep.add_argument("--port", type=int, default=50071)
    rep.add_argument("--replica-id", default="r0")
    rep.add_argument("--set", nargs="*", default=[], help="AppSettings key=value pairs")
    gw = sub.add_parser("gateway")
    gw.add_argument("--host", help="listen address (default: the settings' listen_host)")
    gw.add_argument("--port", type=int, default=50070)
    gw.add_argument("--replica", action="append", required=True, help="replica address (repeat)")
    gw.add_argument("--reuse-port", action="store_true", help="share the port with other gateways")
    gw.add_argument("--set", nargs="*", default=[], help="AppSettings key=value pairs")
    gw.add_argument("--store", help="the replicas' session store URL (routes resumes to rebuilds)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    try:
        settings = AppSettings.from_args(dict(item.split("=", 1) for item in args.set))
        if args.role == "gateway" and args.host:
            settings.host = args.host
        settings.validate()
        check_resume_secret(settings, single_node=True)
    except ValueError as error:
        parser.exit(2, f"standalone: error: {error}\n")
    if args.role == "replica":
        asyncio.run(run_replica(settings, args.host, args.port, args.replica_id))
    else:
        host = settings.listen_host
        asyncio.run(
            run_gateway(settings, host, args.port, args.replica, args.reuse_port, args.store)
        )


if __name__ == "__main__":
    main()

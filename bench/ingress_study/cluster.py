"""Start a local Ray + Serve for design A or B (used by smoke tests and run_bench)."""
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
if HERE not in sys.path:
    sys.path.insert(0, HERE)

GRPC_PORT_A = 9000          # Serve proxy gRPC port
FWD_PORT_B = 9100           # our forwarder (design B)
REPLICA_BASE_PORT_B = 9200  # replica i listens on 9200 + local_rank


def ray_stop():
    """No-op kept for call sites: we never run `ray stop --force` (it would kill
    every Ray cluster on the box, including other people's).  Our own cluster is
    torn down by shutdown(), which kills leftover descendants by PID."""
    return None


def start(design, num_replicas=2, slots=4096, coalesce=8, step_ms=20):
    env = {"PYTHONPATH": HERE}
    if design == "C":  # Ray's own direct ingress: replicas serve gRPC themselves
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        design = "A"
    import ray
    from ray import serve

    t0 = time.time()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=512 * 1024 * 1024,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    t_ray = time.time() - t0
    if design == "A":
        from app_a import APP_NAME, SessionReplicaA

        serve.start(
            http_options={"host": "127.0.0.1", "port": 8000},
            grpc_options={
                "port": GRPC_PORT_A,
                "grpc_servicer_functions": [
                    "sinkproto.session_pb2_grpc.add_SinkServeServicer_to_server"
                ],
            },
        )
        serve.run(
            SessionReplicaA.options(num_replicas=num_replicas).bind(
                slots=slots, coalesce=coalesce, step_ms=step_ms
            ),
            name=APP_NAME,
            route_prefix="/",  # must be an endpoint, else the gRPC proxy says NOT_FOUND
        )
    else:
        from app_b import APP_NAME, build_app

        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        serve.run(
            build_app(num_replicas=num_replicas, slots=slots, coalesce=coalesce,
                      step_ms=step_ms, fwd_port=FWD_PORT_B,
                      base_port=REPLICA_BASE_PORT_B),
            name=APP_NAME,
            route_prefix=None,
        )
    t_all = time.time() - t0
    return {"ray_init_s": round(t_ray, 2), "ready_s": round(t_all, 2)}


def shutdown():
    import psutil
    import ray
    from ray import serve

    mine = psutil.Process().children(recursive=True)
    try:
        serve.shutdown()
    except Exception as e:  # noqa
        print("serve.shutdown error", e)
    ray.shutdown()
    time.sleep(1)
    for p in mine:  # only descendants of this driver, by PID
        try:
            if p.is_running():
                p.kill()
        except psutil.NoSuchProcess:
            pass

"""Safe to put on a network (issue 10): API keys, ownership, admin Stats, quotas, TLS and mTLS,
replicas that serve gateways only, and the settings that refuse to start an open or weak service.
A real Ray-free service (tests/local_service.py) where the engine matters; a bare gateway where
only the handshake does."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deployments import auth
from deployments.auth import KeyRing, hash_line, new_key, parse_keys
from deployments.gateway_guard import GatewayGuard, gateway_credentials
from deployments.gateway_service import GatewayService
from deployments.secrets import ENV_RESUME_SECRET, check_resume_secret
from deployments.settings import AppSettings
from sinkserve.client import AsyncSession, Credentials, SessionError
from sinkwire.channels import aio_channel
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc
from tests.certs import CertFiles, make_certs
from tests.local_service import LocalService, exchange
from tests.service import free_port

GREEDY = pb.GenerationParams(max_new_tokens=8, temperature=0.0)
OPEN = pb.ClientMessage(open=pb.Open())
PACED_RATE = 40.0  # tokens/s of the `paced` key
BURST_S = 2.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertFiles:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    """user, other (another owner), user2 (a second key named `user`: rotation), admin, paced."""
    specs = {
        "user": {"name": "user"},
        "user2": {"name": "user"},
        "other": {"name": "other"},
        "admin": {"name": "ops", "admin": True},
        "paced": {"name": "paced", "tokens_per_s": PACED_RATE},
    }
    lines, made = [], {}
    for label, spec in specs.items():
        key, _ = new_key()
        lines.append(hash_line(key, **spec))
        made[label] = key
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text("# test keys\n" + "\n".join(lines) + "\n")
    made["file"] = str(path)
    return made


@pytest.fixture(scope="module")
def service(keys, certs):
    """TLS on the gateway port, API keys."""
    with LocalService(
        slots=8,
        api_keys=keys["file"],
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        quota_burst_s=BURST_S,
    ) as running:
        yield running


def creds(keys: dict, certs: CertFiles, who: str | None, **tls) -> Credentials:
    return Credentials(api_key=keys[who] if who else None, ca=certs.ca, **tls)


# -- API keys ---------------------------------------------------------------------------------------
def test_keys_file_lines_are_checked() -> None:
    key, key_id = new_key()
    line = hash_line(key, name="alice", max_sessions=3, tokens_per_s=12.5, admin=True)
    (entry,) = parse_keys(line, "f").values()
    assert entry.key_id == key_id and entry.principal.name == "alice" and entry.principal.admin
    assert entry.principal.quota.max_sessions == 3 and entry.principal.quota.tokens_per_s == 12.5
    bad = {
        "plain-text-key": "scrypt$",
        line + " max_sessions=0": "max_sessions",
        line + " name=" + "x" * 100: "cannot read",
        line + "\n" + line: "appears twice",
    }
    for text, says in bad.items():
        with pytest.raises(ValueError) as error:
            parse_keys("# header\n" + text, "keys.txt")
        assert "keys.txt line" in str(error.value) and says in str(error.value)
    other, _ = new_key()
    with pytest.raises(ValueError, match="share their quotas"):
        parse_keys(line + "\n" + hash_line(other, name="alice"), "keys.txt")
    with pytest.raises(ValueError, match="not a sinkserve API key"):
        hash_line("my-own-password")


async def test_a_key_file_is_read_again_when_it_changes(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(auth, "_RELOAD_CHECK_S", 0.0)
    first, second = new_key()[0], new_key()[0]
    path = tmp_path / "keys"
    path.write_text(hash_line(first, name="a") + "\n")
    ring = KeyRing(path=str(path))
    assert (await ring.principal(first)).name == "a"
    assert await ring.principal(second) is None
    path.write_text(hash_line(second, name="b") + "\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert (await ring.principal(second)).name == "b"
    assert await ring.principal(first) is None  # removed keys stop working
    path.write_text("not a key line\n")
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert (await ring.principal(second)).name == "b"  # a broken file keeps the keys as they were


async def test_a_missing_or_wrong_key_is_unauthenticated(service, keys, certs) -> None:
    unknown, _ = new_key()
    known_id = next(iter(parse_keys(Path(keys["file"]).read_text(), "f")))
    forged = f"ssk_{known_id}_{'0' * 64}"
    for key in (None, unknown, forged, "not-a-key", "x" * 5000):
        credentials = Credentials(api_key=key, ca=certs.ca)
        ended = await exchange(service.address, [OPEN], credentials)
        assert ended.code == grpc.StatusCode.UNAUTHENTICATED, (key, ended)
        assert ended.messages == [] and len(ended.details) < 200
        async with aio_channel(service.address, credentials) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest())
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert auth.bearer_key([("authorization", f"Basic {keys['user']}")]) is None
    assert auth.bearer_key([("authorization", f"bearer  {keys['user']} ")]) == keys["user"]
    assert service.stats().sessions == 0  # nothing was opened for any of them


async def test_stats_needs_an_admin_key_and_health_needs_none(service, keys, certs) -> None:
    async with aio_channel(service.address, creds(keys, certs, "user")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest())
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with aio_channel(service.address, creds(keys, certs, "admin")) as channel:
        stats = await pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest())
        assert stats.slots_total == 8 and len(stats.replicas) == 1
    async with aio_channel(service.address, creds(keys, certs, None)) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_session_belongs_to_the_key_that_opened_it(service, keys, certs) -> None:
    session = await AsyncSession.open(service.address, credentials=creds(keys, certs, "user"))
    await session.reply(text="mine", generate=GREEDY)
    await session.disconnect()
    with pytest.raises(SessionError) as denied:
        await AsyncSession.resume(
            service.address,
            session.session_id,
            session.resume_token,
            credentials=creds(keys, certs, "other"),
        )
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "another API key" in denied.value.details
    # The same owner with another key (a rotated key under the same name) may resume it.
    resumed = await AsyncSession.resume(
        service.address,
        session.session_id,
        session.resume_token,
        credentials=creds(keys, certs, "user2"),
    )
    async with aio_channel(service.address, creds(keys, certs, "admin")) as channel:
        stats = await pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest())
    assert dict(stats.replicas[0].sessions_by_key) == {"user": 1}
    await resumed.close()


async def test_a_key_over_its_token_rate_is_paced_then_refused(service, keys, certs) -> None:
    """tokens_per_s=40 with 2 s of burst: a 200-token reply takes about (200 - 80) / 40 s, and an
    append arriving with more than the burst's worth of debt ends the stream RESOURCE_EXHAUSTED
    naming the quota; the session stays and resumes once the bucket refills."""
    session = await AsyncSession.open(service.address, credentials=creds(keys, certs, "paced"))
    long = pb.GenerationParams(max_new_tokens=200, temperature=0.0, ignore_eos=True)
    started = time.monotonic()
    reply = await asyncio.wait_for(session.reply(tokens=[1, 2, 3], generate=long), 60)
    elapsed = time.monotonic() - started
    assert len(reply.ids) == 200
    assert elapsed > (200 - PACED_RATE * BURST_S) / PACED_RATE * 0.8, elapsed
    # A large input is charged when its turn ends: the key is now deep in debt.
    await asyncio.wait_for(session.reply(tokens=list(range(1, 400))), 30)
    with pytest.raises(SessionError) as refused:
        await asyncio.wait_for(session.reply(tokens=[5], generate=GREEDY), 30)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tokens_per_s" in refused.value.details and "paced" in refused.value.details
    resumed = await AsyncSession.resume(
        service.address,
        session.session_id,
        session.resume_token,
        credentials=creds(keys, certs, "paced"),
    )
    await resumed.close()
    # Other keys were never slowed down.
    other = await AsyncSession.open(service.address, credentials=creds(keys, certs, "other"))
    started = time.monotonic()
    assert len((await other.reply(tokens=[1, 2, 3], generate=long)).ids) == 200
    await other.close()
    assert time.monotonic() - started < elapsed


# -- TLS --------------------------------------------------------------------------------------------
async def test_the_gateway_port_speaks_tls_only(service, keys, certs) -> None:
    plain = await exchange(service.address, [OPEN], Credentials(api_key=keys["user"]), timeout=10)
    assert plain.code == grpc.StatusCode.UNAVAILABLE
    wrong_ca = Credentials(api_key=keys["user"], ca=certs.other_ca)
    assert (await exchange(service.address, [OPEN], wrong_ca, timeout=10)).code == (
        grpc.StatusCode.UNAVAILABLE
    )
    session = await AsyncSession.open(
        service.address.replace("127.0.0.1", "localhost"),
        credentials=creds(keys, certs, "user"),
    )
    await session.reply(text="over TLS", generate=GREEDY)
    await session.close()


@pytest.fixture
async def bare_gateway(certs, tmp_path):
    """A gateway with no replicas, over mTLS, whose certificate files can be rewritten."""
    files = {name: tmp_path / name for name in ("cert", "key", "ca")}
    files["cert"].write_bytes(Path(certs.server_cert).read_bytes())
    files["key"].write_bytes(Path(certs.server_key).read_bytes())
    files["ca"].write_bytes(Path(certs.ca).read_bytes())
    settings = AppSettings.from_args(
        {
            "host": "127.0.0.1",
            "tls_cert": str(files["cert"]),
            "tls_key": str(files["key"]),
            "tls_client_ca": str(files["ca"]),
            "resume_secret": "a" * 16 + "b" * 16 + "0123456789abcdef",
        }
    )
    settings.validate()
    gateway = GatewayService(guard=GatewayGuard.from_settings(settings))
    port = free_port()
    server = await gateway.start("127.0.0.1", port, credentials=gateway_credentials(settings))
    yield f"127.0.0.1:{port}", files
    await gateway.close()
    await server.stop(0)


async def _health(address: str, credentials: Credentials) -> grpc.StatusCode:
    async with aio_channel(address, credentials) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def test_mtls_needs_a_client_certificate_and_renewed_certificates_load(
    bare_gateway, certs, tmp_path
) -> None:
    address, files = bare_gateway
    with_cert = Credentials(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    assert await _health(address, with_cert) == grpc.StatusCode.OK
    assert await _health(address, Credentials(ca=certs.ca)) == grpc.StatusCode.UNAVAILABLE
    # Renewal: a certificate from a new CA is written over the files; new connections get it
    # (clients trusting only the old CA are turned away), with no restart.
    (tmp_path / "renewed").mkdir()
    renewed = make_certs(tmp_path / "renewed")
    files["cert"].write_bytes(Path(renewed.server_cert).read_bytes())
    files["key"].write_bytes(Path(renewed.server_key).read_bytes())
    files["ca"].write_bytes(Path(renewed.ca).read_bytes())
    new_client = Credentials(ca=renewed.ca, cert=renewed.client_cert, key=renewed.client_key)
    assert await _health(address, new_client) == grpc.StatusCode.OK
    assert await _health(address, with_cert) == grpc.StatusCode.UNAVAILABLE


# -- replicas serve gateways only --------------------------------------------------------------------
async def test_a_replica_serves_only_callers_with_the_internal_credential(service) -> None:
    replica = service.replica_address
    assert replica.startswith("127.0.0.1:")  # bound to the node's address, not every interface
    for metadata in (None, (("sinkserve-internal", "guess"), ("sinkserve-owner", "user"))):
        ended = await exchange(replica, [OPEN], metadata=metadata)
        assert ended.code == grpc.StatusCode.UNAUTHENTICATED and ended.messages == []
        async with grpc.aio.insecure_channel(replica) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest(), metadata=metadata)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(replica) as channel:  # probes still work
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    ended = await exchange(
        replica, [OPEN, pb.ClientMessage(close=pb.Close())], metadata=service.internal_metadata()
    )
    assert ended.code == grpc.StatusCode.OK and ended.kinds() == ["opened", "closed"]


# -- settings --------------------------------------------------------------------------------------
def _settings(**values) -> AppSettings:
    return AppSettings.from_args({"model": "tiny", **values})


def test_an_open_gateway_binds_loopback_unless_told_insecure(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SINKSERVE_API_KEYS", raising=False)
    assert _settings().listen_host == "127.0.0.1"
    _settings().validate()
    with pytest.raises(ValueError, match="--insecure"):
        _settings(host="0.0.0.0").validate()
    _settings(host="0.0.0.0", insecure=True).validate()
    keys = tmp_path / "keys"
    keys.write_text(hash_line(new_key()[0]) + "\n")
    with_keys = _settings(api_keys=str(keys))
    with_keys.validate()
    assert with_keys.listen_host == "0.0.0.0"
    monkeypatch.setenv("SINKSERVE_API_KEYS", keys.read_text())
    assert _settings().listen_host == "0.0.0.0"
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        _settings(tls_cert=str(keys)).validate()
    with pytest.raises(ValueError, match="no such file"):
        _settings(api_keys=str(tmp_path / "missing")).validate()


def test_the_resume_secret_comes_from_a_secret_and_placeholders_are_refused(
    monkeypatch, tmp_path
) -> None:
    monkeypatch.delenv(ENV_RESUME_SECRET, raising=False)
    monkeypatch.delenv("SINKSERVE_STATE_DIR", raising=False)  # tests/conftest.py sets one
    monkeypatch.setenv("SINKSERVE_CACHE", str(tmp_path))
    local = _settings()  # made up and kept on this machine: fine for one node only
    assert local.resume_secret_source == "local" and len(local.resume_secret) == 64
    assert _settings().resume_secret == local.resume_secret  # kept: old tokens stay valid
    check_resume_secret(local, single_node=True)
    with pytest.raises(ValueError, match="multi-node"):
        check_resume_secret(local, single_node=False)
    placeholder = _settings(resume_secret="change-me-to-a-long-random-string")
    with pytest.raises(ValueError, match="placeholder"):
        check_resume_secret(placeholder, single_node=True)
    with pytest.raises(ValueError, match="at least 32"):
        check_resume_secret(_settings(resume_secret="0123456789abcdefg"), single_node=False)
    real = os.urandom(32).hex()
    monkeypatch.setenv(ENV_RESUME_SECRET, real)
    from_secret = _settings()
    assert from_secret.resume_secret == real and from_secret.resume_secret_source == "env"
    check_resume_secret(from_secret, single_node=False)

    from deployments.app import build_app  # Ray is not started here: one node, but a resource

    monkeypatch.delenv(ENV_RESUME_SECRET)
    with pytest.raises(ValueError, match="multi-node"):
        build_app({"model": "tiny", "gateway_resource": "sinkserve-gateway"})
    with pytest.raises(ValueError, match="placeholder"):
        build_app({"model": "tiny", "resume_secret": "change-me-to-a-long-random-string"})


# -- clients ---------------------------------------------------------------------------------------
def test_cli_clients_take_keys_and_tls(service, keys, certs) -> None:
    made = subprocess.run(
        [sys.executable, "-m", "sinkserve.cli", "api-key", "--name", "n", "--max-sessions", "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    key, line = made.stdout.split("\n")[:2]
    (entry,) = parse_keys(line, "out").values()
    assert key.startswith("ssk_") and entry.principal.quota.max_sessions == 2

    env = {**os.environ, "SINKSERVE_API_KEY": keys["user"], "PYTHONPATH": os.getcwd()}
    chat = subprocess.run(
        [
            sys.executable, "-m", "sinkserve.cli", "chat", "--target", service.address,
            "--ca", certs.ca, "--max-new-tokens", "4",
        ],
        input="hello\n/close\n", capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert "resume with: --session" in chat.stdout
    env.pop("SINKSERVE_API_KEY")
    load = subprocess.run(
        [
            sys.executable, "-m", "sinkserve.cli", "loadtest", "--target", service.address,
            "--api-key", keys["user"], "--ca", certs.ca, "--sessions", "2", "--duration", "2",
            "--ramp", "0", "--max-new-tokens", "4", "--think-min", "0", "--think-max", "0.1",
        ],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert load.returncode == 0, load.stdout + load.stderr
    refused = subprocess.run(
        [
            sys.executable, "-m", "sinkserve.cli", "chat", "--target", service.address,
            "--ca", certs.ca,
        ],
        input="hello\n", capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr


def test_gateways_share_token_charges_and_count_sessions_by_owner() -> None:
    from deployments.directory import ReplicaDirectory
    from deployments.quotas import GatewayQuotas, Quota

    directory = ReplicaDirectory.func_or_class()
    assert directory.share_charges("g1", {"alice": 10}) == {}  # nobody else yet
    assert directory.share_charges("g2", {}) == {}
    assert directory.share_charges("g1", {"alice": 5, "bob": 1}) == {}
    assert directory.share_charges("g2", {"alice": 2}) == {"alice": 5, "bob": 1}
    assert directory.share_charges("g1", {}) == {"alice": 2}

    quotas = GatewayQuotas(burst_s=1.0)
    limited = Quota(max_sessions=2, tokens_per_s=10.0)
    quotas.replicas_report([{"alice": 1}, {"alice": 0, "bob": 3}])
    quotas.admit_open("alice", limited)  # 1 reported + this one
    with pytest.raises(Exception, match="max_sessions quota"):
        quotas.admit_open("alice", limited)
    quotas.admit_open("bob", Quota())  # no quota, no limit
    quotas.replicas_report([{"alice": 1}])  # the new session not reported yet: placed was reset
    quotas.admit_open("alice", limited)
    bucket = quotas.bucket("alice", limited)
    assert bucket.wait_s() == 0
    quotas.charge("alice", bucket, 30)  # 10 in the bucket: 20 in debt, 2 s to wait
    assert 1.5 < bucket.wait_s() <= 2.0
    with pytest.raises(Exception, match="tokens_per_s quota"):
        quotas.admit_append("alice", limited, bucket)  # more than the 1 s burst to wait
    quotas.charge_others({"alice": 5, "carol": 7})
    assert bucket.wait_s() > 2.0 and quotas.take_charges() == {"alice": 30}


async def test_blocking_and_asyncio_clients_send_keys_over_plaintext_too(keys) -> None:
    """Without TLS (loopback, or TLS ended by a proxy) the key goes as metadata added by a client
    interceptor, on blocking and asyncio channels alike."""
    from sinkwire.channels import sync_channel

    settings = AppSettings.from_args({"host": "127.0.0.1", "api_keys": keys["file"]})
    gateway = GatewayService(guard=GatewayGuard.from_settings(settings))
    port = free_port()
    server = await gateway.start("127.0.0.1", port)
    address = f"127.0.0.1:{port}"

    def stats(who: str | None) -> grpc.StatusCode:
        with sync_channel(address, Credentials(api_key=keys[who] if who else None)) as channel:
            try:
                pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest(), timeout=10)
            except grpc.RpcError as error:
                return error.code()
        return grpc.StatusCode.OK

    try:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, stats, "admin") == grpc.StatusCode.OK
        assert await loop.run_in_executor(None, stats, "user") == grpc.StatusCode.PERMISSION_DENIED
        assert await loop.run_in_executor(None, stats, None) == grpc.StatusCode.UNAUTHENTICATED
        async with aio_channel(address, Credentials(api_key=keys["admin"])) as channel:
            await pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest(), timeout=10)
    finally:
        await gateway.close()
        await server.stop(0)

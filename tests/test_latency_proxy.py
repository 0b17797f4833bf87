"""The latency proxy adds its round-trip time to every exchange and passes bytes unchanged."""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time

import boto3
import pytest

from tests.support.latencyproxy import LatencyProxy
from tests.support.net import LOOPBACK

ROUND_TRIP_S = 0.05


class _Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(1 << 16):
            self.request.sendall(data)


@pytest.fixture
def echo_server():
    server = socketserver.ThreadingTCPServer((LOOPBACK, 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address
    server.shutdown()
    server.server_close()


def _exchange(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    received = bytearray()
    while len(received) < len(payload):
        data = sock.recv(1 << 16)
        assert data, "the connection closed before the echo was complete"
        received += data
    return bytes(received)


def test_each_exchange_takes_the_round_trip(echo_server):
    with LatencyProxy(*echo_server, round_trip_s=ROUND_TRIP_S) as proxy:
        with socket.create_connection((LOOPBACK, proxy.port)) as sock:
            for number in range(3):
                started = time.monotonic()
                assert _exchange(sock, b"ping %d" % number) == b"ping %d" % number
                assert time.monotonic() - started >= ROUND_TRIP_S


def test_large_payload_arrives_unchanged(echo_server):
    payload = os.urandom(3 << 20)
    with LatencyProxy(*echo_server, round_trip_s=ROUND_TRIP_S) as proxy:
        with socket.create_connection((LOOPBACK, proxy.port)) as sock:
            assert _exchange(sock, payload) == payload
        assert proxy.connections == 1


def test_end_of_stream_passes_through(echo_server):
    with LatencyProxy(*echo_server, round_trip_s=ROUND_TRIP_S) as proxy:
        with socket.create_connection((LOOPBACK, proxy.port)) as sock:
            sock.sendall(b"last words")
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while data := sock.recv(1024):
                received += data
    assert received == b"last words"


def test_finished_connections_closed(echo_server):
    with LatencyProxy(*echo_server, round_trip_s=ROUND_TRIP_S) as proxy:
        clients = [socket.create_connection((LOOPBACK, proxy.port)) for _ in range(3)]
        for number, client in enumerate(clients):
            assert _exchange(client, b"ping %d" % number) == b"ping %d" % number
        # Two sockets per connection while the clients keep theirs open.
        assert proxy.wait_for_open_sockets(6, 10.0)
        assert not proxy.wait_for_open_sockets(5, 0.0)
        for client in clients:
            client.close()
        assert proxy.wait_for_open_sockets(0, 10.0)
    assert proxy.connections == 3


def test_s3_request_through_proxy_is_delayed(s3_server):
    host, port = s3_server.endpoint_url.removeprefix("http://").split(":")
    with LatencyProxy(host, int(port), round_trip_s=ROUND_TRIP_S) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.endpoint_url)
        client.create_bucket(Bucket="latency")
        client.put_object(Bucket="latency", Key="object", Body=b"chunk bytes")
        started = time.monotonic()
        body = client.get_object(Bucket="latency", Key="object")["Body"].read()
        elapsed = time.monotonic() - started
        client.close()
    assert body == b"chunk bytes"
    assert elapsed >= ROUND_TRIP_S

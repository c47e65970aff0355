"""An asyncio client of the SPIFFE Workload API (the SPIFFE standard "The SPIFFE Workload API",
messages from `identity/workload/workload.proto`), with grpc.aio over the agent's socket.

    client = WorkloadApiClient.from_environment()        # SPIFFE_ENDPOINT_SOCKET
    async for context in client.watch_x509_svids():      # a new X509Context at each rotation
        ...
    svids = await client.fetch_jwt_svids(["duragate"])   # JWT-SVIDs for an audience
    bundles = await client.fetch_jwt_bundles()           # {trust domain: TrustBundle}

Every call carries the `workload.spiffe.io: true` metadata header, which the standard requires
(an agent refuses a call without it, so a browser-style request forgery cannot reach it). Every
unary call and the first message of a stream are bounded by `timeout`; a stream then stays open
for as long as the agent keeps it, and the agent sends a new message whenever an SVID or a
bundle changes.

Endpoint addresses (SPIFFE Workload Endpoint 4): `unix:///path`, `unix:/path` or
`tcp://<IP>:<port>`; anything else is refused with the reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from identity.bundle import BundleError, TrustBundle
from identity.spiffe_id import SpiffeId, SpiffeIdError, parse_trust_domain
from identity.workload import workload_pb2 as pb

ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"
SECURITY_HEADER = ("workload.spiffe.io", "true")
SERVICE = "/SpiffeWorkloadAPI"
DEFAULT_TIMEOUT_SECONDS = 10.0
# Far above any real SVID response; a bound all the same.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class WorkloadApiError(RuntimeError):
    """The Workload API cannot be used, or answered something unusable; the message says why."""


@dataclass(frozen=True)
class X509Svid:
    """One X.509-SVID from the agent: the chain (leaf first), its private key, and the
    authorities of its trust domain."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKeyTypes
    bundle: tuple[x509.Certificate, ...]
    hint: str = ""

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def __repr__(self) -> str:  # never the key
        return f"X509Svid({self.spiffe_id}, serial={self.leaf.serial_number})"


@dataclass(frozen=True)
class X509Context:
    """One message of the FetchX509SVID stream: the SVIDs (the first is the default one, as
    the standard says) and the federated trust domains' authorities."""

    svids: tuple[X509Svid, ...]
    federated: Mapping[str, tuple[x509.Certificate, ...]] = field(default_factory=dict)

    @property
    def default(self) -> X509Svid:
        return self.svids[0]


@dataclass(frozen=True)
class JwtSvidToken:
    spiffe_id: SpiffeId
    token: str
    hint: str = ""

    def __repr__(self) -> str:  # never the token
        return f"JwtSvidToken({self.spiffe_id})"


def grpc_target(address: str) -> str:
    """The grpc target of a Workload API endpoint address."""
    parts = urlsplit(address)
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise WorkloadApiError(
                f"{address!r}: a unix endpoint is unix:///absolute/path (no host part)"
            )
        if parts.query or parts.fragment:
            raise WorkloadApiError(f"{address!r}: a unix endpoint has no query or fragment")
        return f"unix://{parts.path}"
    if parts.scheme == "tcp":
        try:
            ipaddress.ip_address((parts.hostname or "").strip("[]"))
            port = parts.port
        except ValueError:
            raise WorkloadApiError(
                f"{address!r}: a tcp endpoint is tcp://<IP address>:<port> (no host name)"
            ) from None
        if port is None or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise WorkloadApiError(f"{address!r}: a tcp endpoint is tcp://<IP address>:<port>")
        return f"{parts.hostname}:{port}" if ":" not in (parts.hostname or "") else parts.netloc
    raise WorkloadApiError(f"{address!r}: a Workload API endpoint is unix:///path or tcp://IP:port")


def split_der(data: bytes) -> list[bytes]:
    """ASN.1 DER values concatenated (as the Workload API sends certificate chains)."""
    values = []
    i = 0
    while i < len(data):
        if data[i] != 0x30 or i + 2 > len(data):
            raise WorkloadApiError("certificates: not a sequence of DER values")
        first = data[i + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            count = first & 0x7F
            if not 0 < count <= 4 or i + 2 + count > len(data):
                raise WorkloadApiError("certificates: a DER length cannot be read")
            header, length = 2 + count, int.from_bytes(data[i + 2 : i + 2 + count], "big")
        end = i + header + length
        if end > len(data):
            raise WorkloadApiError("certificates: a DER value is cut short")
        values.append(data[i:end])
        i = end
    return values


def parse_certificates(data: bytes, what: str) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_der_x509_certificate(d) for d in split_der(data))
    except ValueError as exc:
        raise WorkloadApiError(f"{what}: a certificate cannot be parsed: {exc}") from None


def _trust_domain_key(key: str) -> str:
    # Keyed by trust domain name in the standard; older agents used `spiffe://<td>`.
    try:
        return parse_trust_domain(key.removeprefix("spiffe://"))
    except SpiffeIdError as exc:
        raise WorkloadApiError(f"bundle key {key!r}: {exc}") from None


def parse_x509_response(response: Any) -> X509Context:
    svids = []
    for index, item in enumerate(response.svids):
        where = f"X.509-SVID #{index}"
        try:
            spiffe_id = SpiffeId.parse(item.spiffe_id)
        except SpiffeIdError as exc:
            raise WorkloadApiError(f"{where}: {exc}") from None
        chain = parse_certificates(item.x509_svid, where)
        if not chain:
            raise WorkloadApiError(f"{where}: no certificate")
        try:
            key = serialization.load_der_private_key(item.x509_svid_key, password=None)
        except (ValueError, TypeError) as exc:
            raise WorkloadApiError(f"{where}: the private key cannot be parsed: {exc}") from None
        bundle = parse_certificates(item.bundle, f"{where} bundle")
        svids.append(X509Svid(spiffe_id, chain, key, bundle, item.hint))
    if not svids:
        raise WorkloadApiError("the Workload API sent no X.509-SVID: this workload has none")
    federated = {
        _trust_domain_key(td): parse_certificates(der, f"bundle of {td}")
        for td, der in response.federated_bundles.items()
    }
    return X509Context(tuple(svids), federated)


class WorkloadApiClient:
    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.address = address
        self.target = grpc_target(address)
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> WorkloadApiClient:
        address = (os.environ if env is None else env).get(ENDPOINT_ENV)
        if not address:
            raise WorkloadApiError(
                f"{ENDPOINT_ENV} is not set: it names the Workload API socket "
                "(unix:///path/to/agent.sock)"
            )
        return cls(address)

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            options = [
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # The agent is local: a unix socket or a loopback address, no proxy.
                ("grpc.enable_http_proxy", 0),
            ]
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> WorkloadApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _stream(self, method: str, request: Any, response_type: Any) -> Any:
        call = self._open().unary_stream(
            f"{SERVICE}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return call(request, metadata=(SECURITY_HEADER,))

    async def _unary(self, method: str, request: Any, response_type: Any) -> Any:
        call = self._open().unary_unary(
            f"{SERVICE}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            return await call(request, metadata=(SECURITY_HEADER,), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(method, exc) from None

    async def watch_x509_svids(self) -> AsyncGenerator[X509Context, None]:
        """Every X509Context the agent sends, the first within `timeout`, then one per change,
        until the agent closes the stream (WorkloadApiError) or the caller stops iterating."""
        stream = self._stream("FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
        try:
            first = True
            while True:
                try:
                    if first:
                        response = await _with_timeout(stream.read(), self.timeout)
                    else:
                        response = await stream.read()
                except grpc.aio.AioRpcError as exc:
                    raise _error("FetchX509SVID", exc) from None
                if response is grpc.aio.EOF:
                    raise WorkloadApiError("FetchX509SVID: the Workload API closed the stream")
                first = False
                yield parse_x509_response(response)
        finally:
            stream.cancel()

    async def fetch_x509_svids(self) -> X509Context:
        """The current X509Context (the first message of the stream)."""
        watch = self.watch_x509_svids()
        try:
            return await anext(watch)
        finally:
            await watch.aclose()

    async def fetch_jwt_svids(
        self, audience: list[str], spiffe_id: str | None = None
    ) -> list[JwtSvidToken]:
        if not audience or not all(audience):
            raise ValueError("a JWT-SVID needs at least one non-empty audience")
        request = pb.JWTSVIDRequest(audience=audience, spiffe_id=spiffe_id or "")
        response = await self._unary("FetchJWTSVID", request, pb.JWTSVIDResponse)
        tokens = []
        for item in response.svids:
            try:
                tokens.append(JwtSvidToken(SpiffeId.parse(item.spiffe_id), item.svid, item.hint))
            except SpiffeIdError as exc:
                raise WorkloadApiError(f"FetchJWTSVID: {exc}") from None
        if not tokens:
            raise WorkloadApiError("FetchJWTSVID: the Workload API sent no JWT-SVID")
        return tokens

    async def fetch_jwt_bundles(self) -> dict[str, TrustBundle]:
        """The JWT authorities by trust domain (the first message of FetchJWTBundles)."""
        stream = self._stream("FetchJWTBundles", pb.JWTBundlesRequest(), pb.JWTBundlesResponse)
        try:
            response = await _with_timeout(stream.read(), self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error("FetchJWTBundles", exc) from None
        finally:
            stream.cancel()
        if response is grpc.aio.EOF:
            raise WorkloadApiError("FetchJWTBundles: the Workload API closed the stream")
        bundles = {}
        for key, document in response.bundles.items():
            domain = _trust_domain_key(key)
            try:
                bundles[domain] = TrustBundle.parse_spiffe(domain, document)
            except BundleError as exc:
                raise WorkloadApiError(f"FetchJWTBundles: {domain}: {exc}") from None
        return bundles


async def _with_timeout(awaitable: Any, timeout: float) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise WorkloadApiError(f"the Workload API did not answer within {timeout:g} s") from None


def _error(method: str, exc: grpc.aio.AioRpcError) -> WorkloadApiError:
    code = exc.code()
    detail = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return WorkloadApiError(f"{method}: the Workload API is not reachable: {detail}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return WorkloadApiError(f"{method}: this workload has no identity there: {detail}")
    return WorkloadApiError(f"{method}: {code.name}: {detail}")

"""The gateway's own identity, for its outbound calls (remote MCP servers, A2A agents, token
endpoints): an X.509-SVID for mTLS and JWT-SVIDs for bearer tokens, always the current ones.

    own = own_identity(config, data_dir)     # None without `identity.own`
    await own.start()
    own.credentials()                        # Credentials: SPIFFE ID, chain, key, authorities
    own.client_ssl_context()                 # ssl.SSLContext presenting the current SVID
    await own.jwt_svid("https://mcp.example/")
    await own.stop()

Three sources (`identity.own.source`):
- `files`: a certificate chain, its key and the trust bundle (PEM, or a SPIFFE bundle), and
  optionally a JWT-SVID file (as a projected token volume provides); re-read when they change
  (one stat each, at most every `reload_seconds`), a broken rewrite logged and the previous
  credentials kept;
- `dev_ca`: issued from the development CA (`duragate identity init`), again when half of the
  SVID's lifetime is gone;
- `workload_api`: a SPIFFE Workload API agent (`endpoint`, else `SPIFFE_ENDPOINT_SOCKET`): the
  FetchX509SVID stream is watched, so a rotation by the agent is in use at once; if the stream
  breaks, the last SVID stays in use and the stream is re-opened (1 s, doubling to 30 s).
JWT-SVIDs are cached per audience until half of their lifetime is gone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from gateway.config import GatewayConfig, OwnIdentityConfig
from identity.bundle import BundleError, TrustBundle
from identity.dev_ca import DevCA
from identity.spiffe_id import SpiffeId
from identity.workload_api import WorkloadApiClient, WorkloadApiError, X509Context
from identity.x509_svid import X509SvidError, spiffe_id_of

log = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0


class OwnIdentityError(RuntimeError):
    """The gateway's own identity cannot be had; the message says why."""


@dataclass(frozen=True)
class Credentials:
    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]  # leaf first
    private_key: PrivateKeyTypes
    authorities: tuple[x509.Certificate, ...]  # to verify the servers we call

    @property
    def expires_at(self) -> datetime:
        return min(c.not_valid_after_utc for c in self.chain)

    def __repr__(self) -> str:  # never the key
        return f"Credentials({self.spiffe_id}, expires={self.expires_at.isoformat()})"

    @classmethod
    def of(
        cls,
        chain: Sequence[x509.Certificate],
        key: PrivateKeyTypes,
        authorities: Sequence[x509.Certificate],
    ) -> Credentials:
        if not chain:
            raise OwnIdentityError("no certificate")
        try:
            spiffe_id = spiffe_id_of(chain[0])
        except X509SvidError as exc:
            raise OwnIdentityError(f"the certificate is not an X.509-SVID: {exc}") from None
        public = (
            chain[0]
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        if (
            key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            != public
        ):
            raise OwnIdentityError("the private key is not the certificate's key")
        return cls(spiffe_id, tuple(chain), key, tuple(authorities))


def ssl_context_for(credentials: Credentials) -> ssl.SSLContext:
    """A TLS client context that presents `credentials` and trusts their authorities. The key
    passes through a private temporary file (the ssl module loads keys from files only), which
    is removed at once."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    authorities = b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in credentials.authorities
    )
    if authorities:
        context.load_verify_locations(cadata=authorities.decode())
    with tempfile.TemporaryDirectory(prefix="duragate-svid-") as directory:
        cert_path, key_path = Path(directory) / "svid.pem", Path(directory) / "svid.key"
        cert_path.write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in credentials.chain)
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(
                credentials.private_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        context.load_cert_chain(cert_path, key_path)
    return context


def token_expiry(token: str) -> float:
    """The `exp` of a JWT we were given by our own source (not a verification)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise OwnIdentityError(f"the JWT-SVID has no readable exp: {exc}") from None


class _JwtCache:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}

    def get(self, audience: tuple[str, ...]) -> str | None:
        entry = self._tokens.get(audience)
        if entry is not None and self._clock() < entry[1]:
            return entry[0]
        return None

    def put(self, audience: tuple[str, ...], token: str) -> str:
        now = self._clock()
        exp = token_expiry(token)
        # Renewed at half-life: a token handed out is never about to expire.
        self._tokens[audience] = (token, now + (exp - now) / 2)
        if len(self._tokens) > 256:  # bounded: audiences come from configuration
            self._tokens.pop(next(iter(self._tokens)))
        return token


def _audiences(audience: str | Sequence[str]) -> tuple[str, ...]:
    values = (audience,) if isinstance(audience, str) else tuple(audience)
    if not values or not all(values):
        raise ValueError("at least one non-empty audience is required")
    return values


class OwnIdentity(ABC):
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._jwt = _JwtCache(clock)
        self._context: tuple[Credentials, ssl.SSLContext] | None = None

    async def start(self) -> None:  # noqa: B027 - most sources have nothing to start
        """Load or fetch the first credentials; OwnIdentityError if there are none."""

    async def stop(self) -> None:  # noqa: B027
        """Release what `start` opened."""

    @abstractmethod
    def credentials(self) -> Credentials:
        """The current X.509-SVID and authorities."""

    @abstractmethod
    async def _fetch_jwt_svid(self, audience: tuple[str, ...]) -> str: ...

    async def jwt_svid(self, audience: str | Sequence[str]) -> str:
        """A JWT-SVID for `audience`, from the cache while it has half its life left."""
        key = _audiences(audience)
        token = self._jwt.get(key)
        if token is None:
            token = self._jwt.put(key, await self._fetch_jwt_svid(key))
        return token

    def client_ssl_context(self) -> ssl.SSLContext:
        """A TLS client context with the current SVID, rebuilt when the SVID changes."""
        current = self.credentials()
        if self._context is None or self._context[0] is not current:
            self._context = (current, ssl_context_for(current))
        return self._context[1]


# -- files ------------------------------------------------------------------------------------


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_authorities(path: Path, trust_domain: str) -> tuple[x509.Certificate, ...]:
    try:
        return TrustBundle.load(trust_domain, path).x509_authorities
    except BundleError as exc:
        raise OwnIdentityError(str(exc)) from None


class FileIdentity(OwnIdentity):
    def __init__(
        self,
        cert: Path,
        key: Path,
        bundle: Path,
        *,
        jwt_svid_file: Path | None = None,
        reload_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(clock)
        self.paths = (cert, key, bundle)
        self.jwt_svid_file = jwt_svid_file
        self.reload_seconds = reload_seconds
        self._stamps = tuple(_stamp(p) for p in self.paths)
        self._current = self._load()
        self._next_check = clock() + reload_seconds

    def _load(self) -> Credentials:
        cert, key, bundle = self.paths
        try:
            chain = x509.load_pem_x509_certificates(cert.read_bytes())
            private_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise OwnIdentityError(f"{cert} / {key}: cannot load the SVID: {exc}") from None
        partial = Credentials.of(chain, private_key, ())
        authorities = load_authorities(bundle, partial.spiffe_id.trust_domain)
        return Credentials.of(chain, private_key, authorities)

    def credentials(self) -> Credentials:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self.reload_seconds
            stamps = tuple(_stamp(p) for p in self.paths)
            if stamps != self._stamps:
                self._stamps = stamps
                try:
                    self._current = self._load()
                    log.info("own SVID reloaded: %s", self._current)
                except OwnIdentityError as exc:
                    log.error("own SVID files do not load; keeping the previous SVID: %s", exc)
        return self._current

    async def _fetch_jwt_svid(self, audience: tuple[str, ...]) -> str:
        if self.jwt_svid_file is None:
            raise OwnIdentityError(
                "no JWT-SVID: identity.own.jwt_svid_file is not set (the files source has no "
                "key to sign one)"
            )
        try:
            token = (await asyncio.to_thread(self.jwt_svid_file.read_text)).strip()
        except OSError as exc:
            raise OwnIdentityError(f"{self.jwt_svid_file}: {exc.strerror or exc}") from None
        return token


# -- the development CA -----------------------------------------------------------------------


class DevCaIdentity(OwnIdentity):
    def __init__(
        self,
        ca: DevCA,
        spiffe_id: str,
        *,
        ttl: timedelta = timedelta(hours=1),
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(clock)
        self.ca = ca
        self.spiffe_id = spiffe_id
        self.ttl = ttl
        self._current = self._issue()

    def _issue(self) -> Credentials:
        now = datetime.fromtimestamp(self._clock(), UTC)
        cert, key = self.ca.issue_x509_svid(self.spiffe_id, self.ttl, now=now)
        self._renew_at = self._clock() + self.ttl.total_seconds() / 2
        return Credentials.of([cert], key, self.ca.x509_authorities)

    def credentials(self) -> Credentials:
        if self._clock() >= self._renew_at:
            self._current = self._issue()
        return self._current

    async def _fetch_jwt_svid(self, audience: tuple[str, ...]) -> str:
        now = datetime.fromtimestamp(self._clock(), UTC)
        return self.ca.issue_jwt_svid(self.spiffe_id, list(audience), self.ttl, now=now)


# -- the Workload API -------------------------------------------------------------------------


class WorkloadApiIdentity(OwnIdentity):
    def __init__(
        self,
        client: WorkloadApiClient,
        *,
        spiffe_id: str | None = None,
        hint: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(clock)
        self.client = client
        self.spiffe_id = spiffe_id
        self.hint = hint
        self._current: Credentials | None = None
        self._watch: asyncio.Task[None] | None = None
        self._first = asyncio.Event()
        self._problem: str | None = None
        self.rotations = 0  # credentials received after the first (for tests and metrics)

    def _choose(self, context: X509Context) -> Credentials:
        for svid in context.svids:
            if (self.spiffe_id is None or str(svid.spiffe_id) == self.spiffe_id) and (
                self.hint is None or svid.hint == self.hint
            ):
                return Credentials.of(svid.chain, svid.private_key, svid.bundle)
        offered = ", ".join(f"{s.spiffe_id} (hint {s.hint!r})" for s in context.svids)
        raise OwnIdentityError(
            f"the Workload API offers no SVID matching spiffe_id={self.spiffe_id!r}, "
            f"hint={self.hint!r}: it offers {offered}"
        )

    async def start(self) -> None:
        self._watch = asyncio.create_task(self._run(), name="workload-api-watch")
        waiter = asyncio.create_task(self._first.wait())
        await asyncio.wait({waiter, self._watch}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self._current is None:
            await self.stop()
            raise OwnIdentityError(f"no SVID from the Workload API: {self._problem}")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await self.client.close()

    async def _run(self) -> None:
        delay = RETRY_FIRST_SECONDS
        while True:
            try:
                async for context in self.client.watch_x509_svids():
                    chosen = self._choose(context)
                    if self._current is not None:
                        self.rotations += 1
                        log.info("own SVID rotated by the Workload API: %s", chosen)
                    self._current = chosen
                    self._first.set()
                    delay = RETRY_FIRST_SECONDS
            except (WorkloadApiError, OwnIdentityError) as exc:
                self._problem = str(exc)
                if not self._first.is_set():
                    return  # start() reports it: no SVID at all is a failed start
                log.warning("Workload API: %s; retrying in %g s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    def credentials(self) -> Credentials:
        if self._current is None:
            raise OwnIdentityError("the Workload API identity is not started")
        return self._current

    async def _fetch_jwt_svid(self, audience: tuple[str, ...]) -> str:
        try:
            tokens = await self.client.fetch_jwt_svids(list(audience), self.spiffe_id)
        except WorkloadApiError as exc:
            raise OwnIdentityError(str(exc)) from None
        for token in tokens:
            if self.hint is None or token.hint == self.hint:
                return token.token
        raise OwnIdentityError(f"the Workload API sent no JWT-SVID with hint {self.hint!r}")


# -- from the configuration -------------------------------------------------------------------


def own_identity(config: GatewayConfig, data_dir: Path) -> OwnIdentity | None:
    """The own identity `identity.own` describes (not started), or None without it."""
    own: OwnIdentityConfig | None = config.identity.own
    if own is None:
        return None
    if own.source == "files":
        assert own.cert and own.key and own.bundle  # the config model requires them
        return FileIdentity(
            own.cert, own.key, own.bundle, jwt_svid_file=own.jwt_svid_file,
            reload_seconds=own.reload_seconds,
        )  # fmt: skip
    if own.source == "dev_ca":
        directory = own.ca_dir or data_dir / "identity" / "ca"
        try:
            ca = DevCA.load(directory)
        except (OSError, ValueError) as exc:
            raise OwnIdentityError(
                f"{directory}: no development CA ({exc}); run `duragate identity init`"
            ) from None
        spiffe_id = own.spiffe_id or f"spiffe://{ca.trust_domain}/duragate"
        return DevCaIdentity(ca, spiffe_id)
    client = (
        WorkloadApiClient(own.endpoint) if own.endpoint else WorkloadApiClient.from_environment()
    )
    return WorkloadApiIdentity(client, spiffe_id=own.spiffe_id, hint=own.hint)


__all__ = [
    "Credentials",
    "DevCaIdentity",
    "FileIdentity",
    "OwnIdentity",
    "OwnIdentityError",
    "WorkloadApiIdentity",
    "own_identity",
    "ssl_context_for",
]

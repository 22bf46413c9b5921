"""ZMQ sockets: a ROUTER for commands (one reply per request) and a PUB for telemetry.

Localhost by default; a bind reachable from other hosts is only allowed with CURVE (the config
refuses otherwise): the server's key pair plus a directory of allowed client public keys, checked by
pyzmq's ZAP authenticator, so an unknown client cannot even complete the handshake. With
`curve_operator_keys` the allowed clients split in two: operators may send every command, the others
only what looks or stops (protocol.OBSERVER_COMMANDS); the key comes from ZAP's User-Id on each message.
Each socket is used by exactly one thread after `start` (ROUTER: this server's thread; PUB: the
daemon's monitor thread). Commands are answered one at a time, but an `estop` among the requests
waiting is taken before the others (clients polling `status` must not delay a stop).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import msgpack
import zmq

from edge_steer.runtime.config import ZmqConfig
from edge_steer.runtime.protocol import OBSERVER_COMMANDS, ProtocolError, decode_request, error_reply, ok_reply

log = logging.getLogger("edge_steer.serve.zmq")
_ESTOP = msgpack.packb("estop")
MAX_BATCH = 64     # requests held off the socket at most: the e-stop look-ahead


def estops_first(batch: list) -> list:
    """The waiting requests with those that may be an e-stop moved to the front, each group in arrival
    order. A byte test for msgpack's "estop", not a decode: a payload that holds that string elsewhere
    (an instruction's text) is only answered earlier, and validated like any other."""
    def maybe_estop(frames) -> bool:
        return _ESTOP in frames[-1].bytes
    return [f for f in batch if maybe_estop(f)] + [f for f in batch if not maybe_estop(f)]


class CommandServer:
    def __init__(self, cfg: ZmqConfig, daemon: Any):
        self.cfg, self.daemon = cfg, daemon
        self.ctx = zmq.Context()
        self._auth = None
        self._operators: set[str] | None = None   # z85 public keys; None: every allowed client operates
        self.requests = 0
        self.errors = 0
        self._running = False
        self._thread: threading.Thread | None = None
        self.router: zmq.Socket | None = None
        self.pub: zmq.Socket | None = None

    def _secure(self, sock: zmq.Socket) -> None:
        if not self.cfg.curve:
            return
        import zmq.auth
        public, secret = zmq.auth.load_certificate(self.cfg.curve_secret_key)
        if secret is None:
            raise ValueError(f"{self.cfg.curve_secret_key} holds no secret key")
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_server = True

    def start(self) -> None:
        if self.cfg.curve:
            from zmq.auth.thread import ThreadAuthenticator
            self._auth = ThreadAuthenticator(self.ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=self.cfg.curve_authorized_keys)
            if self.cfg.curve_operator_keys:
                from zmq.auth import load_certificates
                # ZAP's User-Id for a CURVE client is its z85 public key, as the certificates store it
                self._operators = {k.decode() for k in load_certificates(self.cfg.curve_operator_keys)}
        try:
            self.router = self.ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            # hard cap against memory abuse; between max_message_bytes and this we still answer "too_large"
            self.router.setsockopt(zmq.MAXMSGSIZE, 4 * self.cfg.max_message_bytes)
            self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
            self._secure(self.router)
            self.router.bind(self.cfg.command)
            self.pub = self.ctx.socket(zmq.PUB)
            self.pub.setsockopt(zmq.LINGER, 0)
            self.pub.setsockopt(zmq.SNDHWM, 100)  # a slow subscriber loses telemetry, never stalls us
            self._secure(self.pub)
            self.pub.bind(self.cfg.telemetry)
        except (zmq.ZMQError, ValueError, OSError) as e:
            self._close_sockets()
            raise RuntimeError(f"cannot bind the ZMQ sockets ({self.cfg.command}, {self.cfg.telemetry}): {e}") from e
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="commands", daemon=True)
        self._thread.start()

    def make_pub(self) -> zmq.Socket:
        return self.pub

    def _loop(self) -> None:
        sock = self.router
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        waiting: list = []
        while self._running:
            if not waiting and not poller.poll(50):
                continue
            # look again before every request, not once per batch: an e-stop that came in while the
            # previous request was handled waits for that one only
            waiting = estops_first(waiting + self._take_waiting(sock, MAX_BATCH - len(waiting)))
            if not waiting:
                continue
            frames = waiting.pop(0)
            envelope, payload = [f.bytes for f in frames[:-1]], frames[-1]
            user = payload.get("User-Id") if self._operators is not None else None
            reply = self.handle_bytes(payload.bytes, user)
            try:
                sock.send_multipart([*envelope, reply], zmq.NOBLOCK)
            except zmq.ZMQError as e:  # the client went away
                log.debug("reply not delivered: %s", e)

    @staticmethod
    def _take_waiting(sock: zmq.Socket, room: int) -> list[list[zmq.Frame]]:
        batch = []
        while len(batch) < room:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:
                break
            if len(frames) >= 2:   # else no routing envelope: nobody to answer
                batch.append(frames)
        return batch

    def handle_bytes(self, payload: bytes, user: str | None = None) -> bytes:
        """Decode, validate, check the sender's role, dispatch; always returns a reply (ok or error
        with a reason). `user`: the client's public key (z85) when operators are configured."""
        self.requests += 1
        rid = None
        try:
            req = decode_request(payload, self.cfg.max_message_bytes)
            rid = req.id
            if self._operators is not None and req.cmd not in OBSERVER_COMMANDS and user not in self._operators:
                raise ProtocolError("forbidden", f"'{req.cmd}' can move the arm and needs an operator key "
                                                 f"(zmq.curve_operator_keys); this client may only send "
                                                 f"{', '.join(sorted(OBSERVER_COMMANDS))}")
            result = self.daemon.handle(req)
            return ok_reply(rid, result)
        except ProtocolError as e:
            self.errors += 1
            return error_reply(rid if rid is not None else e.id, e.code, e.reason)
        except Exception as e:  # noqa: BLE001 - CommandError and anything unexpected still get an answer
            self.errors += 1
            code = getattr(e, "code", "internal")
            reason = getattr(e, "reason", f"{type(e).__name__}: {e}")
            if code == "internal":
                log.exception("command failed")
            return error_reply(rid, code, reason)

    def _close_sockets(self) -> None:
        for s in (self.router, self.pub):
            if s is not None and not s.closed:
                s.close(linger=0)

    def stop(self) -> None:
        self._running = False
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._close_sockets()  # the monitor thread (PUB's user) has been joined by the daemon
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()

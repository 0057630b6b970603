#!/usr/bin/env python3
"""A third-party device written only from schemas/PROTOCOL.md, with Python's standard
library (no WebSocket package): wss handshake with a bearer token and the hub.v1.json
subprotocol, hello/welcome, telemetry batches, acks, pongs, and command acks/results.

It prints one JSON object per line on stdout for every event, so tests can follow it.

usage: json_device.py URL TOKEN CA_FILE [--batches N] [--interval-ms MS] [--stay]
"""
import base64
import json
import os
import select
import socket
import ssl
import struct
import sys
import time
import urllib.parse


def emit(**event):
    print(json.dumps(event), flush=True)


class Socket:
    def __init__(self, url, token, ca_file):
        u = urllib.parse.urlparse(url)
        ctx = ssl.create_default_context(cafile=ca_file)
        raw = socket.create_connection((u.hostname, u.port))
        self.sock = ctx.wrap_socket(raw, server_hostname=u.hostname)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: hub.v1.json\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise SystemExit("connection closed during handshake")
            head += chunk
        head, self.buf = head.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n")[0].decode()
        if " 101 " not in status + " ":
            emit(event="refused", status=status)
            sys.exit(3)

    def send(self, opcode, payload):
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def readable(self, timeout):
        if self.buf or self.sock.pending():
            return True
        r, _, _ = select.select([self.sock], [], [], timeout)
        return bool(r)

    def recv_frame(self):
        b0, b1 = self._need(2)
        opcode, n = b0 & 0x0F, b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._need(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._need(8))[0]
        return opcode, self._need(n)


def main():
    args = sys.argv[1:]
    url, token, ca = args[0], args[1], args[2]
    batches = int(args[args.index("--batches") + 1]) if "--batches" in args else 3
    interval = int(args[args.index("--interval-ms") + 1]) / 1000 if "--interval-ms" in args else 0.05
    stay = "--stay" in args
    ws = Socket(url, token, ca)
    ws.send(0x1, json.dumps({"hello": {"firmware": "py-1.0", "capabilities": ["commands"], "last_acked_seq": 0}}).encode())
    next_seq, sent, last_send = None, 0, 0.0
    while True:
        if next_seq is not None and sent < batches and time.time() - last_send >= interval:
            now_ms = int(time.time() * 1000)
            batch = {"telemetry": {"seq": next_seq, "readings": [
                {"metric": "py.counter", "ts": now_ms, "value": float(next_seq)},
                {"metric": "py.temperature", "ts": now_ms, "value": 20.0 + next_seq / 10},
            ]}}
            ws.send(0x1, json.dumps(batch).encode())
            emit(event="sent", seq=next_seq)
            next_seq, sent, last_send = next_seq + 1, sent + 1, time.time()
        if not ws.readable(0.02):
            continue
        try:
            opcode, payload = ws.recv_frame()
        except EOFError:
            emit(event="eof")
            return
        if opcode == 0x9:
            ws.send(0xA, payload)
            emit(event="ping")
        elif opcode == 0x8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            emit(event="closed", code=code, reason=payload[2:].decode(errors="replace"))
            return
        elif opcode == 0x1:
            msg = json.loads(payload)
            kind, body = next(iter(msg.items()))
            if kind == "welcome":
                next_seq = body["last_seq"] + 1
                emit(event="welcome", **body)
            elif kind == "ack":
                emit(event="ack", up_to_seq=body["up_to_seq"])
                if not stay and sent >= batches and body["up_to_seq"] >= next_seq - 1:
                    ws.send(0x8, struct.pack("!H", 1000))
            elif kind == "command":
                ws.send(0x1, json.dumps({"command_ack": {"id": body["id"]}}).encode())
                ws.send(0x1, json.dumps({"command_result": {"id": body["id"], "ok": True, "code": 0,
                                                            "output": "py did " + body["name"]}}).encode())
                emit(event="command", **body)
            else:
                emit(event=kind, **body)


if __name__ == "__main__":
    main()

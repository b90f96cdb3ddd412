#!/usr/bin/env python3
"""Floods a WireGuard listen port, for tests/tests/flood.rs.

    flood.py TARGET_IP PORT RESPONDER_PUBKEY_B64 SECONDS SOURCE_IP[,SOURCE_IP...] PORTS_PER_SOURCE

From PORTS_PER_SOURCE sockets on each source address, round robin and as fast
as the sockets take them, it sends two handshake initiations with a valid
mac1 (random ephemeral key, static and timestamp, so they cost the receiver
its checks but can never complete) for every datagram of junk: random bytes
of random length, and every WireGuard message type truncated, lengthened or
with its reserved bytes set. Prints the number of datagrams sent and the CPU
seconds the generator used, which the test measures the receiver's against.
"""
import base64
import hashlib
import os
import random
import socket
import sys
import time


def mac1_key(responder_public):
    return hashlib.blake2s(b"mac1----" + responder_public).digest()


def initiation(key):
    body = b"\x01\x00\x00\x00" + os.urandom(4 + 32 + 48 + 28)
    return body + hashlib.blake2s(body, key=key, digest_size=16).digest() + bytes(16)


SIZES = {1: 148, 2: 92, 3: 64, 4: 32}


def junk(rng):
    kind = rng.randrange(4)
    if kind == 0:
        return os.urandom(rng.randrange(0, 300))
    msg_type = rng.choice([1, 2, 3, 4])
    size = SIZES[msg_type]
    if kind == 1:  # truncated
        size = rng.randrange(1, size)
    elif kind == 2:  # valid length (data: with a payload) and random contents
        size += 16 * rng.randrange(0, 4) if msg_type == 4 else 0
    reserved = bytes(3) if kind != 3 else os.urandom(3)
    return bytes([msg_type]) + reserved + os.urandom(max(size - 4, 0))


def main():
    target, port, pub, seconds, sources, per_source = sys.argv[1:7]
    key = mac1_key(base64.b64decode(pub))
    socks = []
    for src in sources.split(","):
        for _ in range(int(per_source)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((src, 0))
            s.setblocking(False)
            socks.append(s)
    dest = (target, int(port))
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    sent = 0
    i = 0
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        for _ in range(256):
            s = socks[i % len(socks)]
            payload = junk(rng) if i % 3 == 2 else initiation(key)
            i += 1
            try:
                s.sendto(payload, dest)
                sent += 1
            except (BlockingIOError, OSError):
                pass
    print(sent, time.process_time())


if __name__ == "__main__":
    main()

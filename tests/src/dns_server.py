"""The lab's DNS server: answers, NXDOMAINs, SERVFAILs, REFUSEs or ignores each query by the
first label of its name, over UDP and TCP, and logs every query it receives and what it did, one
JSON object per line, flushed at once. It is the ground truth of the DNS tests.

    ok-*       NOERROR, one A record (ANSWER_V4, TTL 30) for A queries, none for others
    nx-*       NXDOMAIN
    fail-*     SERVFAIL
    refuse-*   REFUSED
    silent-*   no answer at all
    flaky-*    for A queries NOERROR with 127.0.0.1 (the asker's own loopback: a connect there
               is refused at once, and no other name's answer shares the address), no answer
               to the others (AAAA): the query of a pair that a conntrack race or a broken
               server loses; glibc waits, then uses the A answer
    anything else: NXDOMAIN

Usage: dns_server.py ADDR PORT ANSWER_V4 LOG. It prints "ready" once both sockets listen, and
runs until killed. Standard library only.
"""
import json
import socket
import socketserver
import struct
import sys
import threading

ADDR, PORT, ANSWER_V4, LOG_PATH = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
LOG = open(LOG_PATH, "a", buffering=1)
LOCK = threading.Lock()

RCODES = {"ok": 0, "nx": 3, "fail": 2, "refuse": 5}


def question(msg):
    """(id, flags, name, qtype, end of question) of a query."""
    qid, flags, qd = struct.unpack("!HHH", msg[:6])
    at, labels = 12, []
    while msg[at] != 0:
        n = msg[at]
        labels.append(msg[at + 1 : at + 1 + n].decode("ascii"))
        at += 1 + n
    qtype = struct.unpack("!H", msg[at + 1 : at + 3])[0]
    return qid, flags, ".".join(labels).lower(), qtype, at + 5


def answer(msg, transport):
    qid, flags, name, qtype, end = question(msg)
    kind = name.split("-", 1)[0] if "-" in name else "other"
    action = kind if kind in RCODES or kind == "silent" else "nx"
    if kind == "flaky":
        action = "ok" if qtype == 1 else "silent"
    with LOCK:
        LOG.write(json.dumps({"id": qid, "name": name, "qtype": qtype,
                              "transport": transport, "action": action}) + "\n")
    if action == "silent":
        return None
    rcode = RCODES[action]
    records = b""
    ancount = 0
    if action == "ok" and qtype == 1:
        address = "127.0.0.1" if kind == "flaky" else ANSWER_V4
        records = struct.pack("!HHHIH", 0xC00C, 1, 1, 30, 4) + socket.inet_aton(address)
        ancount = 1
    # QR, the query's opcode and RD, RA; then the counts: one question, the answers.
    out_flags = 0x8000 | (flags & 0x7900) | 0x0080 | rcode
    header = struct.pack("!HHHHHH", qid, out_flags, 1, ancount, 0, 0)
    return header + msg[12:end] + records


class Udp(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        reply = answer(data, "udp")
        if reply is not None:
            sock.sendto(reply, self.client_address)


class Tcp(socketserver.BaseRequestHandler):
    def handle(self):
        conn = self.request
        buf = b""
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buf += chunk
            while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                n = struct.unpack("!H", buf[:2])[0]
                msg, buf = buf[2 : 2 + n], buf[2 + n :]
                reply = answer(msg, "tcp")
                if reply is not None:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)


class ThreadedUdp(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True


class ThreadedTcp(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


udp = ThreadedUdp((ADDR, PORT), Udp)
tcp = ThreadedTcp((ADDR, PORT), Tcp)
threading.Thread(target=tcp.serve_forever, daemon=True).start()
print("ready", flush=True)
udp.serve_forever()

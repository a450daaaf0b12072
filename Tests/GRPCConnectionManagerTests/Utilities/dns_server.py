"""A DNS server on loopback whose answers the tests change (UDP, A and AAAA only).

    python3 dns_server.py [HOST PORT]    (default 127.0.0.1, a free port)

Prints its port, then reads commands on stdin until it closes (each change is acknowledged with "ok" once in
force):

  set NAME IP[,IP...]   answer A (IPv4) and AAAA (IPv6) queries for NAME with these addresses
  empty NAME            answer NOERROR with no address
  silent NAME           never answer (a resolver timeout)
  lateaaaa NAME IP      answer A queries for NAME with IP at once, AAAA ones (with no address) only after 5 s: a
                        server or middlebox that drops them, as far as a resolver timeout under 5 s can tell (a
                        client that waited for the answer still ends, rather than hang its test)
  count                 print "count N": queries received so far

Any other name gets NXDOMAIN. TTLs are 1 s.
"""
import ipaddress, socket, struct, sys, threading

records = {}
mode = {}
queries = 0
lock = threading.Lock()


def read_name(data, offset):
    labels = []
    while True:
        length = data[offset]
        offset += 1
        if length == 0:
            return ".".join(labels).lower(), offset
        labels.append(data[offset:offset + length].decode())
        offset += length


def answer(data):
    global queries
    ident, flags, qdcount = struct.unpack(">HHH", data[:6])
    name, end = read_name(data, 12)
    qtype, qclass = struct.unpack(">HH", data[end:end + 4])
    question = data[12:end + 4]
    with lock:
        queries += 1
        how = mode.get(name)
        addresses = records.get(name)
    if how == "silent":
        return None
    rcode = 0
    answers = []
    if how == "empty":
        pass
    elif addresses is None:
        rcode = 3  # NXDOMAIN
    else:
        for address in addresses:
            ip = ipaddress.ip_address(address)
            if qtype == 1 and ip.version == 4 or qtype == 28 and ip.version == 6:
                rdata = ip.packed
                answers.append(struct.pack(">HHHIH", 0xC00C, qtype, 1, 1, len(rdata)) + rdata)
    header = struct.pack(">HHHHHH", ident, 0x8180 | (flags & 0x0100) | rcode, 1, len(answers), 0, 0)
    return header + question + b"".join(answers)


def is_late(data):
    name, end = read_name(data, 12)
    (qtype,) = struct.unpack(">H", data[end:end + 2])
    with lock:
        return mode.get(name) == "lateaaaa" and qtype == 28


def serve(sock):
    while True:
        try:
            data, peer = sock.recvfrom(4096)
        except OSError:
            return
        try:
            reply = answer(data)
        except Exception:
            continue
        if reply is None:
            continue
        if is_late(data):
            threading.Timer(5, sock.sendto, (reply, peer)).start()
        else:
            sock.sendto(reply, peer)


sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], int(sys.argv[2])) if len(sys.argv) == 3 else ("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
threading.Thread(target=serve, args=(sock,), daemon=True).start()
for line in sys.stdin:
    parts = line.split()
    if not parts:
        continue
    with lock:
        if parts[0] == "set" and len(parts) == 3:
            records[parts[1].lower()] = parts[2].split(",")
            mode.pop(parts[1].lower(), None)
            print("ok", flush=True)
        elif parts[0] == "lateaaaa" and len(parts) == 3:
            records[parts[1].lower()] = [parts[2]]
            mode[parts[1].lower()] = "lateaaaa"
            print("ok", flush=True)
        elif parts[0] in ("empty", "silent") and len(parts) == 2:
            mode[parts[1].lower()] = parts[0]
            print("ok", flush=True)
        elif parts[0] == "count":
            print("count %d" % queries, flush=True)
sock.close()

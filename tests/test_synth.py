"""hushsim.synth: the synthetic sessions are deterministic, well-formed on the wire, carry the
names and shapes design.md section 7 describes, and their ground truth matches their packets.
Also bench/eval_captures.evaluate() on hand-made analyze results."""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import socket
import struct
import time
from collections import defaultdict
from pathlib import Path

import dpkt
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hushsim import synth

REPO = Path(__file__).resolve().parents[1]
VOICE_REMOTE = (synth.AVS.ip, 443)
EXPECTED_NAMES = {
    "bob-dispatch-prod-na.amazon.com",
    "device-metrics-us.amazon.com",
    "unagi-na.amazon.com",
    "api.amazonalexa.com",
    "alexa-comms-mobile-service.amazon.com",
    "d3p8zr0ffa9t17.cloudfront.net",
}


# ---------------------------------------------------------------------------------------------
# helpers


def _read(path: Path) -> list[tuple[float, bytes]]:
    with path.open("rb") as f:
        reader = dpkt.pcap.Reader(f)
        assert reader.datalink() == dpkt.pcap.DLT_EN10MB
        return list(reader)


@pytest.fixture(scope="module")
def session_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.write_session(tmp_path_factory.mktemp("synth") / "session.pcap", seed=1)


@pytest.fixture(scope="module")
def session(session_file: Path) -> list[tuple[float, dpkt.ethernet.Ethernet]]:
    return [(ts, dpkt.ethernet.Ethernet(buf)) for ts, buf in _read(session_file)]


@pytest.fixture(scope="module")
def nest(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[float, dpkt.ethernet.Ethernet]]:
    path = synth.write_nest_quic(tmp_path_factory.mktemp("synth") / "nest.pcap", seed=1)
    return [(ts, dpkt.ethernet.Ethernet(buf)) for ts, buf in _read(path)]


def _addr(raw: bytes) -> str:
    return socket.inet_ntoa(raw)


def _client_streams(frames) -> dict[tuple, bytes]:
    """Client-to-server TCP byte streams from the SYN on, keyed by (client, sport, server, dport)."""
    isn: dict[tuple, int] = {}
    pieces: dict[tuple, dict[int, bytes]] = defaultdict(dict)
    for _, eth in frames:
        ip = eth.data
        if not isinstance(ip.data, dpkt.tcp.TCP):
            continue
        tcp = ip.data
        key = (_addr(ip.src), tcp.sport, _addr(ip.dst), tcp.dport)
        if tcp.flags & dpkt.tcp.TH_SYN and not tcp.flags & dpkt.tcp.TH_ACK:
            isn[key] = tcp.seq
        elif key in isn and tcp.data:
            pieces[key][(tcp.seq - isn[key] - 1) % 2**32] = bytes(tcp.data)
    streams = {}
    for key, segs in pieces.items():
        data = b""
        for off in sorted(segs):
            if off == len(data):
                data += segs[off]
        streams[key] = data
    return streams


def _sni_from_client_hello(msg: bytes) -> str | None:
    """SNI of a ClientHello handshake message (type 1), written independently of guard."""
    assert msg[0] == 1
    p = 4 + 2 + 32
    p += 1 + msg[p]  # session id
    p += 2 + int.from_bytes(msg[p : p + 2], "big")  # cipher suites
    p += 1 + msg[p]  # compression
    end = p + 2 + int.from_bytes(msg[p : p + 2], "big")
    p += 2
    while p < end:
        ext_type, ext_len = struct.unpack_from("!HH", msg, p)
        if ext_type == 0:
            name_len = int.from_bytes(msg[p + 7 : p + 9], "big")
            return msg[p + 9 : p + 9 + name_len].decode()
        p += 4 + ext_len
    return None


def _upstream_payload(frames, src: str, dst: tuple[str, int]) -> list[tuple[float, int]]:
    out = []
    for ts, eth in frames:
        ip = eth.data
        l4 = ip.data
        if _addr(ip.src) == src and (_addr(ip.dst), l4.dport) == dst and len(l4.data):
            out.append((ts, len(l4.data)))
    return out


def _bursts(packets: list[tuple[float, int]], gap_s: float = 0.35) -> list[dict]:
    """labels.toml's burst rule: upstream payload packets with gaps below 0.35 s."""
    bursts: list[dict] = []
    for ts, n in packets:
        if bursts and ts - bursts[-1]["end"] < gap_s:
            b = bursts[-1]
            b["end"], b["bytes"], b["packets"] = ts, b["bytes"] + n, b["packets"] + 1
        else:
            bursts.append({"start": ts, "end": ts, "bytes": n, "packets": 1})
    return bursts


# ---------------------------------------------------------------------------------------------
# determinism, speed, well-formedness


def test_same_seed_gives_the_same_file_and_another_seed_does_not(tmp_path: Path) -> None:
    a = synth.write_session(tmp_path / "a.pcap", seed=3).read_bytes()
    synth._echo_session_cached.cache_clear()
    synth._nest_session_cached.cache_clear()
    b = synth.write_session(tmp_path / "b.pcap", seed=3).read_bytes()
    c = synth.write_session(tmp_path / "c.pcap", seed=4).read_bytes()
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
    assert a != c
    n1 = synth.write_nest_quic(tmp_path / "n1.pcap", seed=3).read_bytes()
    synth._nest_session_cached.cache_clear()
    assert synth.write_nest_quic(tmp_path / "n2.pcap", seed=3).read_bytes() == n1
    assert synth.session_truth(3) == synth.session_truth(3)
    assert synth.session_truth(3) != synth.session_truth(4)


def test_generation_takes_under_a_second() -> None:
    synth._echo_session_cached.cache_clear()
    synth._nest_session_cached.cache_clear()
    t0 = time.perf_counter()
    synth.generate_session(11)
    synth.generate_nest_quic(11)
    assert time.perf_counter() - t0 < 1.0


def test_session_is_about_ten_minutes_from_the_fixed_epoch(session) -> None:
    times = [ts for ts, _ in session]
    assert times[0] == synth.EPOCH
    assert times == sorted(times)
    assert 540 <= times[-1] - times[0] <= 660


def test_timestamps_survive_the_pcap_round_trip(session) -> None:
    generated = [ts for ts, _ in synth.generate_session(1)]
    assert len(generated) == len(session)
    assert all(abs(a - b) < 1e-6 for a, b in zip(generated, (ts for ts, _ in session)))


def test_every_frame_is_ipv4_with_valid_checksums(session, nest) -> None:
    for _, eth in session + nest:
        ip = eth.data
        assert isinstance(ip, dpkt.ip.IP)
        raw = bytes(eth)[14:]
        assert dpkt.in_cksum(raw[:20]) == 0
        seg = raw[20 : ip.len]
        pseudo = struct.pack("!4s4sBBH", ip.src, ip.dst, 0, ip.p, len(seg))
        assert ip.p in (6, 17)
        assert dpkt.in_cksum(pseudo + seg) == 0


def test_devices_carry_vendor_ouis(session, nest) -> None:
    macs = {_addr(eth.data.src): eth.src.hex(":") for _, eth in session + nest}
    assert macs[synth.ECHO.ip].startswith("68:db:f5")  # Amazon Technologies Inc.
    assert macs[synth.NEST.ip].startswith("20:df:b9")  # Google, Inc.
    assert macs[synth.ROUTER.ip] == synth.ROUTER.mac


# ---------------------------------------------------------------------------------------------
# names: TLS SNI, DNS, QUIC Initial


def test_tcp_client_hellos_are_real_and_carry_the_snis(session) -> None:
    names = set()
    for (client, _, _, _), stream in _client_streams(session).items():
        if stream[:1] != b"\x16":
            continue
        assert stream[1:3] == b"\x03\x01" and stream[5] == 1  # TLS record holding a ClientHello
        length = int.from_bytes(stream[3:5], "big")
        names.add((client, _sni_from_client_hello(stream[5 : 5 + length])))
    assert {(synth.ECHO.ip, n) for n in EXPECTED_NAMES} <= names
    assert (synth.LAPTOP.ip, "www.wikipedia.org") in names


def test_sni_assembler_finds_the_names_if_present(session) -> None:
    from guard.core import sni
    found = set()
    for stream in _client_streams(session).values():
        asm = sni.SniAssembler()
        asm.syn(1000)
        name = asm.feed_tcp(1001, stream[:4096])
        if name:
            found.add(name)
    assert EXPECTED_NAMES <= found


def test_dns_answers_have_ttls_and_one_cname_chain(session) -> None:
    answers: dict[str, list] = defaultdict(list)
    for _, eth in session:
        udp = eth.data.data
        if isinstance(udp, dpkt.udp.UDP) and udp.sport == 53:
            msg = dpkt.dns.DNS(udp.data)
            answers[msg.qd[0].name] += [
                (
                    rr.name,
                    rr.type,
                    rr.ttl,
                    getattr(rr, "cname", None) or socket.inet_ntoa(rr.rdata)
                    if rr.type == 1
                    else rr.cname,
                )
                for rr in msg.an
            ]
    assert EXPECTED_NAMES <= set(answers)
    assert all(ttl > 0 for rrs in answers.values() for _, _, ttl, _ in rrs)
    assert (synth.AVS.name, dpkt.dns.DNS_A, answers[synth.AVS.name][0][2], synth.AVS.ip) in answers[
        synth.AVS.name
    ]
    chain = answers["api.amazonalexa.com"]
    assert [t for _, t, _, _ in chain] == [dpkt.dns.DNS_CNAME, dpkt.dns.DNS_CNAME, dpkt.dns.DNS_A]
    assert chain[0][3] == chain[1][0] and chain[1][3] == chain[2][0]
    assert chain[2][3] == synth.ALEXA_API.ip


def test_guard_packet_maps_the_cname_chain_to_the_asked_name(session_file: Path) -> None:
    from guard.core.packet import parse_frame

    names = set()
    for _, buf in _read(session_file):
        pkt = parse_frame(buf, 1)
        for answer in getattr(pkt, "dns", ()):
            names.add((answer.name, answer.address))
    assert ("api.amazonalexa.com", synth.ALEXA_API.ip) in names
    assert (synth.AVS.name, synth.AVS.ip) in names


def _quic_unprotect_initial(datagram: bytes) -> tuple[bytes, bytes]:
    """Independent RFC 9001 decryption of a client Initial: returns (DCID, plaintext)."""

    def expand_label(secret: bytes, label: bytes, length: int) -> bytes:
        full = b"tls13 " + label
        info = struct.pack("!HB", length, len(full)) + full + b"\x00"
        out, block, i = b"", b"", 1
        while len(out) < length:  # HKDF-Expand (RFC 5869), stdlib hmac
            block = hmac.new(secret, block + info + bytes([i]), hashlib.sha256).digest()
            out += block
            i += 1
        return out[:length]

    assert datagram[0] & 0xF0 == 0xC0  # long header, Initial
    assert datagram[1:5] == b"\x00\x00\x00\x01"
    dcid = datagram[6 : 6 + datagram[5]]
    p = 6 + len(dcid)
    p += 1 + datagram[p]  # SCID
    assert datagram[p] == 0  # empty token
    p += 1
    length = int.from_bytes(datagram[p : p + 2], "big") & 0x3FFF
    p += 2
    salt = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")
    initial = hmac.new(salt, dcid, hashlib.sha256).digest()
    client = expand_label(initial, b"client in", 32)
    key, iv, hp = (
        expand_label(client, b"quic key", 16),
        expand_label(client, b"quic iv", 12),
        expand_label(client, b"quic hp", 16),
    )
    sample = datagram[p + 4 : p + 20]
    mask = Cipher(algorithms.AES(hp), modes.ECB()).encryptor().update(sample)
    first = datagram[0] ^ (mask[0] & 0x0F)
    pn_len = (first & 0x03) + 1
    pn = bytes(a ^ b for a, b in zip(datagram[p : p + pn_len], mask[1:]))
    header = bytes([first]) + datagram[1:p] + pn
    nonce = bytes(a ^ b for a, b in zip(iv, int.from_bytes(pn, "big").to_bytes(12, "big")))
    plain = AESGCM(key).decrypt(nonce, datagram[p + pn_len : p + length], header)
    return dcid, plain


def _first_client_initial(nest) -> bytes:
    for _, eth in nest:
        udp = eth.data.data
        if (
            _addr(eth.data.src) == synth.NEST.ip
            and isinstance(udp, dpkt.udp.UDP)
            and udp.dport == 443
        ):
            return bytes(udp.data)
    raise AssertionError("no QUIC datagram from the Nest")


def test_quic_initial_decrypts_to_a_client_hello_with_sni(nest) -> None:
    datagram = _first_client_initial(nest)
    assert len(datagram) == 1200
    _, plain = _quic_unprotect_initial(datagram)
    assert plain[0] == 0x06 and plain[1] == 0x00  # CRYPTO frame at offset 0
    length = int.from_bytes(plain[2:4], "big") & 0x3FFF
    hello = plain[4 : 4 + length]
    assert _sni_from_client_hello(hello) == "embeddedassistant.googleapis.com"
    assert set(plain[4 + length :]) == {0}  # PADDING to 1,200 B


def test_quic_initial_keys_match_rfc9001_appendix_a() -> None:
    keys = synth.quic_initial_keys(bytes.fromhex("8394c8f03e515708"))
    assert keys.key.hex() == "1f369613dd76d5467730efcbe3b1a22d"
    assert keys.iv.hex() == "fa044b2f42a3fd3b46fb255c"
    assert keys.hp.hex() == "9f50449e04a0e810283a1e9933adedd2"
    server = synth.quic_initial_keys(bytes.fromhex("8394c8f03e515708"), client=False)
    assert server.key.hex() == "cf3a5331653c364c88f0f379b6067e37"


def test_sni_assembler_reads_the_quic_initial_if_present(nest) -> None:
    from guard.core import sni
    asm = sni.SniAssembler()
    assert asm.feed_quic(_first_client_initial(nest)) == "embeddedassistant.googleapis.com"


# ---------------------------------------------------------------------------------------------
# ground truth and shapes


def test_truth_matches_the_voice_connection_bursts(session) -> None:
    truth = synth.session_truth(1)
    assert 4 <= len(truth) <= 5
    bursts = _bursts(_upstream_payload(session, synth.ECHO.ip, VOICE_REMOTE))
    for t in truth:
        assert t["device"] == synth.ECHO.ip and t["remote"] == f"{synth.AVS.ip}:443"
        match = [b for b in bursts if abs(b["start"] - t["start"]) < 1e-6]
        assert len(match) == 1, t
        b = match[0]
        assert abs(b["end"] - t["end"]) < 1e-6
        assert (b["bytes"], b["packets"]) == (t["bytes"], t["packets"])
    # Every other burst that labels.toml's rule (>= 6,000 B and >= 0.8 s) would call an upload
    # is a scripted look-alike.
    lookalikes = [a for a in synth.session_activities(1) if a["kind"] == "volume-change"]
    for b in bursts:
        if b["bytes"] >= 6_000 and b["end"] - b["start"] >= 0.8:
            assert any(abs(b["start"] - t["start"]) < 1e-6 for t in truth) or any(
                abs(b["start"] - a["start"]) < 1e-6 for a in lookalikes
            ), b


def test_uploads_have_the_echo_shape(session) -> None:
    packets = _upstream_payload(session, synth.ECHO.ip, VOICE_REMOTE)
    modes = set()
    for t in synth.session_truth(1):
        inside = [(ts, n) for ts, n in packets if t["start"] - 1e-6 <= ts <= t["end"] + 1e-6]
        mss = [(ts, n) for ts, n in inside if n == synth.MSS_BYTES]
        assert 8_000 <= t["burst_bytes"] <= 28_000
        assert mss[-1][0] - inside[0][0] < 0.3  # the start burst
        records = [n for _, n in inside[len(mss) + 1 :]]
        assert set(records) == {t["record_bytes"]}
        rate = len(records) / (t["end"] - inside[len(mss)][0])
        assert abs(rate - t["rate_hz"]) < 3
        assert 1.5 <= t["end"] - t["start"] <= 5.2
        modes.add(t["record_bytes"])
    assert modes == {118, 437}


def test_each_upload_gets_a_tts_reply_and_one_is_a_follow_up() -> None:
    truth = synth.session_truth(1)
    acts = synth.session_activities(1)
    tts = [a for a in acts if a["kind"] == "tts-response"]
    assert len(tts) == len(truth)
    for t, r in zip(truth, tts):
        assert t["end"] < r["start"] < t["end"] + 1.0
        assert 20_000 <= r["bytes_down"] <= 80_000
    follow = [i for i, t in enumerate(truth) if t["turn"] == 2]
    assert len(follow) == 1
    i = follow[0]
    assert 3.5 <= truth[i]["start"] - tts[i - 1]["end"] <= 4.5
    assert truth[i]["start"] - truth[i - 1]["end"] < 10.0  # followup_window_s


def test_lookalikes_are_present() -> None:
    acts = synth.session_activities(1)
    kinds = defaultdict(list)
    for a in acts:
        kinds[a["kind"]].append(a)
    for a in kinds["telemetry"]:
        if a["host"] == synth.METRICS.name:
            assert 22_000 <= a["bytes_up"] <= 100_000 and a["end"] - a["start"] < 0.3
        else:
            assert a["host"] == synth.UNAGI.name
            assert 6_000 <= a["bytes_up"] <= 9_000 and 0.7 <= a["end"] - a["start"] <= 1.3
            assert 0.7 <= a["bytes_down"] / a["bytes_up"] <= 1.3
    assert len([a for a in kinds["telemetry"] if a["host"] == synth.METRICS.name]) >= 3
    (vol,) = kinds["volume-change"]
    assert vol["bytes_up"] == 13_500 and 0.7 <= vol["end"] - vol["start"] <= 0.9
    assert kinds["messaging"] and all(a["host"] == synth.COMMS.name for a in kinds["messaging"])
    assert len(kinds["keepalive"]) >= 5
    events = [a for a in kinds["event"]]
    assert events and all(2_000 <= a["bytes_up"] <= 6_000 for a in events)
    (report,) = kinds["post-query-report"]
    assert 8_000 <= report["bytes_up"] <= 10_000


def test_dropin_is_stun_then_constant_rate_two_way_udp(session) -> None:
    flow = [
        (ts, eth.data)
        for ts, eth in session
        if isinstance(eth.data.data, dpkt.udp.UDP)
        and 3478 in (eth.data.data.sport, eth.data.data.dport)
    ]
    first = bytes(flow[0][1].data.data)
    assert _addr(flow[0][1].src) == synth.ECHO.ip
    assert struct.unpack("!HHI", first[:8]) == (0x0001, 0, 0x2112A442)  # Binding request
    assert struct.unpack("!HHI", bytes(flow[1][1].data.data)[:8])[::2] == (0x0101, 0x2112A442)
    up = [ts for ts, ip in flow[6:] if _addr(ip.src) == synth.ECHO.ip]
    down = [ts for ts, ip in flow[6:] if _addr(ip.dst) == synth.ECHO.ip]
    for times in (up, down):
        rate = (len(times) - 1) / (times[-1] - times[0])
        assert 45 <= rate <= 55 and times[-1] - times[0] > 20


def test_nest_truth_matches_its_quic_datagrams(nest) -> None:
    (t,) = synth.nest_quic_truth(1)
    packets = _upstream_payload(nest, synth.NEST.ip, (synth.ASSISTANT.ip, 443))
    inside = [(ts, n) for ts, n in packets if t["start"] - 1e-6 <= ts <= t["end"] + 1e-6]
    assert (len(inside), sum(n for _, n in inside)) == (t["packets"], t["bytes"])
    assert 180_000 <= t["bytes"] <= 220_000 and t["end"] - t["start"] < 3.0
    assert 78 <= t["packets"] / (t["end"] - t["start"]) <= 126
    assert sum(n == 1350 for _, n in inside) >= len(inside) - 1
    assert all(n >= 1200 for ts, n in packets if ts < t["start"] and n > 1000)


def test_session_labels_have_the_labels_toml_shape() -> None:
    labels = synth.session_labels(1, file="x.pcap")
    assert labels["device"] == synth.ECHO.ip and labels["file"] == "x.pcap"
    assert [set(v) for v in labels["voice"]] == [{"start", "end", "remote", "bytes"}] * len(
        synth.session_truth(1)
    )


# ---------------------------------------------------------------------------------------------
# bench/eval_captures.evaluate on hand-made dicts


def _eval_module():
    spec = importlib.util.spec_from_file_location(
        "eval_captures", REPO / "bench" / "eval_captures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _upload(
    remote: str,
    start: float,
    end: float,
    action: str = "hold",
    leaked: int = 0,
    nbytes: int = 40_000,
) -> dict:
    return {
        "device": "10.0.0.2",
        "remote": remote,
        "host": None,
        "category": "voice",
        "start": start,
        "end": end,
        "bytes": nbytes,
        "packets": 100,
        "action": action,
        "leaked_bytes": leaked,
        "turn": 1,
        "decided": start + 0.1,
        "decided_after_packets": 10,
    }


R = "52.94.1.1:443"


def _hand_made() -> list[tuple[dict, dict]]:
    labels = {
        "file": "a.pcap",
        "device": "10.0.0.2",
        "voice": [
            {"start": 100.0, "end": 103.0, "remote": R, "bytes": 40_000},  # detected, leaks 400 B
            {"start": 200.0, "end": 202.0, "remote": R, "bytes": 60_000},  # missed (passed)
        ],
    }
    result = {
        "capture": "a.pcap",
        "packets": 1000,
        "devices": [],
        "uploads": [
            _upload(R, 100.2, 103.1, leaked=400),
            _upload(R, 200.0, 202.0, action="pass"),
            _upload(R, 500.0, 502.0),  # a false prompt
            _upload("1.2.3.4:443", 100.0, 103.0),  # overlaps in time, other remote: false
        ],
        "releases": [
            {
                "device": "10.0.0.2",
                "remote": R,
                "host": None,
                "start": float(s),
                "bytes": 9000,
                "delay_s": d,
                "decided": s + d,
                "decided_after_packets": 3,
            }
            for s, d in zip(range(10), [0.1 * k for k in range(1, 11)])
        ],
        "flows": [
            {
                "device": "10.0.0.2",
                "remote": R,
                "host": None,
                "category": "voice",
                "bytes_up": 0,
                "bytes_down": 0,
                "packets_up": 0,
                "packets_down": 0,
                "first": 0.0,
                "last": 1800.0,
            },
            {
                "device": "10.0.0.2",
                "remote": "1.2.3.4:443",
                "host": None,
                "category": "unknown",
                "bytes_up": 0,
                "bytes_down": 0,
                "packets_up": 0,
                "packets_down": 0,
                "first": 10.0,
                "last": 900.0,
            },
        ],
    }
    return [(labels, result)]


def test_evaluate_counts_detection_leak_false_prompts_and_delays() -> None:
    ev = _eval_module()
    summary = ev.evaluate(_hand_made())
    (c,) = summary["captures"]
    assert (c["labels"], c["detected"], c["recall_pct"]) == (2, 1, 50.0)
    assert c["missed"] == [{"start": 200.0, "end": 202.0, "remote": R, "bytes": 60_000}]
    assert c["leaked_bytes"] == 400 and c["leak_pct"] == pytest.approx(0.4)  # 400 / 100,000
    assert c["false_prompts"] == 2 and c["duration_s"] == 1800.0
    assert c["false_prompts_per_h"] == pytest.approx(4.0)
    assert c["delay_p50_s"] == pytest.approx(0.55)
    assert c["delay_p95_s"] == pytest.approx(0.955)  # linear between 0.9 and 1.0
    o = summary["overall"]
    assert (o["labels"], o["detected"], o["false_prompts"]) == (2, 1, 2)
    failures = ev.check(summary)
    assert any("recall" in f for f in failures) and any("false prompts" in f for f in failures)
    # the stream hold's targets: leak <= 0.1 % (0.4 % here), release p95 <= 0.3 s (0.955 here)
    assert any("leak" in f for f in failures) and any("p95" in f for f in failures)


def test_evaluate_pools_captures_and_passes_a_clean_run() -> None:
    ev = _eval_module()
    labels = {
        "file": "b.pcap",
        "device": "10.0.0.2",
        "voice": [{"start": 10.0, "end": 12.0, "remote": R, "bytes": 30_000}],
    }
    result = {
        "capture": "b.pcap",
        "packets": 10,
        "devices": [],
        "uploads": [_upload(R, 10.5, 12.0, leaked=0)],
        "releases": [],
        "flows": [
            {
                "device": "10.0.0.2",
                "remote": R,
                "host": None,
                "category": "voice",
                "bytes_up": 0,
                "bytes_down": 0,
                "packets_up": 0,
                "packets_down": 0,
                "first": 0.0,
                "last": 3600.0,
            }
        ],
    }
    clean = ev.evaluate([(labels, result)])
    assert clean["overall"]["recall_pct"] == 100.0 and ev.check(clean) == []
    pooled = ev.evaluate(_hand_made() + [(labels, result)])["overall"]
    assert (pooled["labels"], pooled["detected"]) == (3, 2)
    assert pooled["leak_pct"] == pytest.approx(100 * 400 / 130_000)
    assert pooled["false_prompts_per_h"] == pytest.approx(2 / 1.5)  # 2 over 0.5 h + 1 h


def test_evaluate_followups_marks_first_turns_follow_ups_and_long_passes() -> None:
    ev = _eval_module()
    labels = {
        "file": "c.pcap",
        "device": "10.0.0.2",
        "voice": [
            {"start": 10.0, "end": 12.0, "remote": R, "bytes": 1},  # first turn
            {"start": 16.0, "end": 19.0, "remote": R, "bytes": 1},  # follow-up (4 s later)
            {"start": 100.0, "end": 102.0, "remote": R, "bytes": 1},  # new dialogue
            {"start": 108.0, "end": 110.0, "remote": R, "bytes": 1},  # follow-up, not held
        ],
    }
    result = {
        "capture": "c.pcap",
        "uploads": [
            _upload(R, 10.0, 12.0, action="pass"),
            _upload(R, 16.0, 19.0, action="hold"),
            _upload(R, 108.0, 110.0, action="pass"),
            _upload(R, 300.0, 309.0, action="pass"),
        ],
        "releases": [],
        "flows": [],
    }
    summary = ev.evaluate_followups([(labels, result)])
    rows = summary["dialogues"]
    assert [r["turns"] for r in rows] == [2, 2]
    assert rows[0]["first_action"] == "pass" and rows[0]["followup_actions"] == ["hold"]
    assert rows[0]["ok"] and not rows[1]["ok"]
    assert rows[1]["first_action"] == "undetected" and rows[1]["first_ok"]
    o = summary["overall"]
    assert (o["followups"], o["followups_held"], o["long_passed"]) == (2, 1, 1)
    assert len(ev.check_followups(summary)) == 2


@pytest.mark.parametrize("seed", [2, 7, 42])
def test_truth_matches_the_packets_for_other_seeds(seed: int) -> None:
    frames = [(ts, dpkt.ethernet.Ethernet(buf)) for ts, buf in synth.generate_session(seed)]
    bursts = _bursts(_upstream_payload(frames, synth.ECHO.ip, VOICE_REMOTE))
    by_start = {round(b["start"], 6): b for b in bursts}
    for t in synth.session_truth(seed):
        b = by_start[round(t["start"], 6)]
        assert (round(b["end"], 6), b["bytes"], b["packets"]) == (
            round(t["end"], 6),
            t["bytes"],
            t["packets"],
        )

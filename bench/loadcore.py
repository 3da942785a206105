"""
What every mode of ``bench/loadgen.py`` shares: the mergeable latency histogram (2%
buckets) and its percentiles, the HTTP/1.1 request writer and response parser, the
error-sampling counters, TLS client contexts, and the process's limits and CPU time.
The parent (``bench/run.py`` and its sections) reads the histograms with
:func:`merge_histograms` and :func:`percentile`.
"""

import math
import resource
import ssl

_LOG_BASE = math.log(1.02)


class Histogram:
    """Latency histogram in 2% buckets, in seconds."""

    def __init__(self):
        self.buckets = {}
        self.count = 0

    def add(self, seconds):
        b = int(math.log(max(seconds, 1e-7) * 1e7) / _LOG_BASE)
        self.buckets[b] = self.buckets.get(b, 0) + 1
        self.count += 1

    def to_json(self):
        return {str(k): v for k, v in self.buckets.items()}


def merge_histograms(dicts):
    """Merge histogram dicts (as produced by :obj:`Histogram.to_json`)."""
    out = {}
    for d in dicts:
        for k, v in d.items():
            out[int(k)] = out.get(int(k), 0) + v
    return out


def percentile(buckets, q):
    """:return: the q-quantile (0..1) in seconds of a merged histogram, or None."""
    total = sum(buckets.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for k in sorted(buckets):
        seen += buckets[k]
        if seen >= rank:
            return math.exp((k + 0.5) * _LOG_BASE) / 1e7
    return None


def raise_nofile():
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def client_context(ca, certfile=None):
    """A TLS client context trusting the fleet CA, with our certificate if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    if certfile:
        ctx.load_cert_chain(certfile)
    return ctx


def http_request(body, close=False, host=b"bench"):
    return (
        b"POST /rpc HTTP/1.1\r\nHost: "
        + host
        + b"\r\nContent-Type: application/json\r\n"
        + (b"Connection: close\r\n" if close else b"")
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


class Parser:
    """Incremental parser of HTTP/1.1 responses with a Content-Length."""

    __slots__ = ("buf",)

    def __init__(self):
        self.buf = b""

    def feed(self, data):
        """:return: list of (status, body) of complete responses"""
        self.buf += data
        out = []
        while True:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return out
            head = buf[:end]
            i = head.find(b"\ncontent-length:")
            if i < 0:
                i = head.lower().find(b"\ncontent-length:")
            if i < 0:
                length = 0
            else:
                j = head.find(b"\r", i + 16)
                length = int(head[i + 16 : j if j >= 0 else len(head)])
            total = end + 4 + length
            if len(buf) < total:
                return out
            status = int(head[9:12])
            out.append((status, buf[end + 4 : total]))
            self.buf = buf[total:]


class Stats:
    def __init__(self):
        self.hist = Histogram()
        self.ok = 0
        self.errors = 0
        self.error_samples = []
        self.conn_errors = 0
        self.lateness = Histogram()

    def error(self, what):
        self.errors += 1
        # one sample of each kind of error (a flood of one kind hides the others)
        if len(self.error_samples) < 5 and not any(
            x[:24] == what[:24] for x in self.error_samples
        ):
            self.error_samples.append(what[:300])

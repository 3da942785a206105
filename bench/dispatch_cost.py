"""
The dispatcher's per-call cost in process, without HTTP: ``Dispatcher.answer`` on a
small body, best of 7 runs of 100,000 calls (``time.process_time``), for a synchronous
handler, one answering through a fired Deferred, batches of ten (10,000 of them) and the
node's schema-checked ``node.info``.  For changes to rpc/dispatch.py, before and after.

Usage: python bench/dispatch_cost.py [sync|deferred|batch10|schema]...
"""

import json
import sys
import time

from twisted.internet import defer

from hero_compute.rpc.dispatch import CallContext, Dispatcher, service_dispatcher
from hero_compute.rpc.limits import Limits

ctx = CallContext("tcp", "127.0.0.1:5555", host="127.0.0.1")
rpc = Dispatcher()
rpc.register("echo", lambda value=None: value)
rpc.register("later", lambda value=None: defer.succeed(value))
node = service_dispatcher("node", Limits(), None)
node.register("node.info", lambda: {"node_id": "n", "name": "x", "vm_count": 0})
cases = {
    "sync": (rpc, b'{"jsonrpc":"2.0","method":"echo","params":[1],"id":1}'),
    "deferred": (rpc, b'{"jsonrpc":"2.0","method":"later","params":[1],"id":1}'),
    "batch10": (
        rpc,
        json.dumps(
            [
                {"jsonrpc": "2.0", "method": "echo", "params": [i], "id": i}
                for i in range(10)
            ]
        ).encode(),
    ),
    "schema": (node, b'{"jsonrpc":"2.0","method":"node.info","id":1}'),
}
N = 100_000
for name, (d, body) in cases.items():
    if len(sys.argv) > 1 and name not in sys.argv[1:]:
        continue
    n = N // 10 if name == "batch10" else N
    answer = d.answer
    best = float("inf")
    for _ in range(7):
        t = time.process_time()
        for _ in range(n):
            answer(body, ctx)
        best = min(best, time.process_time() - t)
    print(f"{name:9s} {best / n * 1e6:7.3f} us/call (n={n})")

"""
A local HTTP server for image imports, on loopback: whole files, files cut mid-body,
files streamed slowly (held until released), files bigger than they say, redirects.
"""

import hashlib
import http.server
import socket
import threading

#: Bytes per chunk of the slow route.
CHUNK = 64 * 1024


class ImageServer:
    """
    ``ImageServer(files)`` serves ``files`` (``name -> bytes``) on 127.0.0.1:

    - ``/f/NAME``: the whole file, with Content-Length;
    - ``/cut/NAME``: Content-Length of the whole, then half of it, then the connection
      closes;
    - ``/slow/NAME``: chunks of :data:`CHUNK` bytes, one each time :meth:`release`
      allows for that name, with Content-Length;
    - ``/chunked/NAME``: the whole file without Content-Length (chunked);
    - ``/redirect/N/NAME``: N redirects, then ``/f/NAME``.

    :ivar requests: the paths asked, in order
    """

    def __init__(self, files):
        self.files = dict(files)
        self.requests = []
        self._allowed = {name: threading.Semaphore(0) for name in self.files}
        self._closed = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                parts = self.path.strip("/").split("/")
                route, name = parts[0], parts[-1]
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                if route == "redirect":
                    left = int(parts[1])
                    target = f"/redirect/{left - 1}/{name}" if left > 1 else f"/f/{name}"
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                if route == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(data), CHUNK):
                        piece = data[i : i + CHUNK]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                if route == "cut":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif route == "slow":
                    for i in range(0, len(data), CHUNK):
                        while not server._allowed[name].acquire(timeout=0.1):
                            if server._closed.is_set():
                                return
                        self.wfile.write(data[i : i + CHUNK])
                        self.wfile.flush()
                else:
                    self.wfile.write(data)
                self.close_connection = True

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, route, name, host="127.0.0.1"):
        """:return: the URL of ``name`` on ``route``"""
        return f"http://{host}:{self.port}/{route}/{name}"

    def release(self, chunks=1, name="slow"):
        """Let the slow route send ``chunks`` more chunks of ``name``."""
        for _ in range(chunks):
            self._allowed[name].release()

    def close(self):
        """Stop serving; slow responses still waiting end."""
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()


def sha256(data):
    """:return: the hex SHA-256 of ``data``"""
    return hashlib.sha256(data).hexdigest()

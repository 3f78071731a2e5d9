"""Downloads (``python -m lss_megatron.data.enwik8 --download``) end, and leave nothing partial.

A local HTTP server on 127.0.0.1 plays the bad servers: one that accepts the connection and never
answers, one that sends headers and then stalls, one that sends a short body and hangs up, one
that answers 404, one that sends a complete file that is not enwik8. Each download fails within
its timeout (plus a margin), with one line naming the URL, and leaves no ``enwik8.zip.part``
(nor an ``enwik8.zip``) behind.
"""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time

import pytest

from lss_megatron.data import DataError
from lss_megatron.data.enwik8 import download
from tests.support import ROOT, clean_env

pytestmark = pytest.mark.faults


TIMEOUT_S = 1.0


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/stall":  # headers, then nothing
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.flush()
            time.sleep(30)
        elif self.path == "/short":  # promises 1000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
        elif self.path == "/notzip":
            body = b"<html>a captive portal, not enwik8</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404, "no such file")


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    silent = socket.socket()  # listens, never accepts: the request is never answered
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    yield {
        "http": f"http://127.0.0.1:{httpd.server_address[1]}",
        "silent": f"http://127.0.0.1:{silent.getsockname()[1]}/enwik8.zip",
    }
    httpd.shutdown()
    silent.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "path,fragment",
    [
        ("silent", "no data for 1 s (timeout); nothing kept"),
        ("/stall", "no data for 1 s (timeout); nothing kept"),
        ("/short", "ended"),
        ("/missing", "failed: HTTP 404"),
        ("/notzip", "is not what was expected"),
    ],
)
def test_bad_servers(server, tmp_path, path, fragment):
    url = server["silent"] if path == "silent" else server["http"] + path
    t0 = time.monotonic()
    with pytest.raises(DataError) as e:
        download(tmp_path, url, timeout_s=TIMEOUT_S)
    took = time.monotonic() - t0
    msg = str(e.value)
    assert fragment in msg and url in msg and "\n" not in msg, msg
    assert took < TIMEOUT_S + 10, f"took {took:.1f} s"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "partial files left behind"


@pytest.mark.timeout(90)
def test_cli_against_a_stalled_server(server, tmp_path):
    """The user's view: exit 1, one error line, no traceback, no partial file, within the
    timeout (plus interpreter start-up)."""
    t0 = time.monotonic()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "lss_megatron.data.enwik8",
            "--download",
            str(tmp_path),
            "--url",
            server["http"] + "/stall",
            "--timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=80,
        cwd=ROOT,
        env=clean_env(),
    )
    assert res.returncode == 1, res.stderr
    errors = [x for x in res.stderr.splitlines() if "error" in x]
    assert len(errors) == 1 and "no data for 1 s" in errors[0], res.stderr
    assert "Traceback" not in res.stderr and list(tmp_path.iterdir()) == []
    assert time.monotonic() - t0 < 60


def test_bad_timeout_is_refused(tmp_path):
    with pytest.raises(DataError, match="timeout must be > 0"):
        download(tmp_path, "http://127.0.0.1:9/x", timeout_s=0)


@pytest.mark.parametrize("value", ["nan", "inf", "0.001", "1e9"])
def test_cli_timeout_is_bounded(tmp_path, capsys, value):
    """--timeout is a finite number of seconds in [0.1, 86400]: inf would never give up."""
    from lss_megatron.data.enwik8 import main

    with pytest.raises(SystemExit) as e:
        main(["--download", str(tmp_path / "d"), "--timeout", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--timeout must be in [0.1, 86400] seconds" in err, err
    assert not (tmp_path / "d").exists()

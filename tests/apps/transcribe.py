"""A transcription-shaped app for Tollgate's tests: POST /transcribe with a WAV body reads
its duration and answers a (fake) transcript, reporting the seconds of audio it processed in
the usage header, as an app behind Tollgate would. Everything else echoes what it got.

    python3 transcribe.py PORT

GET /seen answers the request headers of the last POST, so a test can see what reached
the app. An answer's report can be chosen with `?report=` (sent verbatim) to test bad ones,
`?status=` sets the answer's status and `?sleep=MS` holds the answer that long. GET /count
answers how many POSTs to /transcribe reached it.
"""
import io
import json
import sys
import time
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

LAST = {}
COUNT = {"transcribe": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if urlparse(self.path).path == "/seen":
            return self.answer(200, LAST)
        if urlparse(self.path).path == "/count":
            return self.answer(200, COUNT)
        self.answer(200, {"path": self.path})

    def do_POST(self):
        url = urlparse(self.path)
        q = parse_qs(url.query)
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        LAST.clear()
        LAST.update({k.lower(): v for k, v in self.headers.items()})
        status = int(q.get("status", ["200"])[0])
        time.sleep(int(q.get("sleep", ["0"])[0]) / 1000)
        if url.path != "/transcribe":
            return self.answer(status, {"path": self.path, "bytes": len(body)})
        COUNT["transcribe"] += 1
        try:
            with wave.open(io.BytesIO(body)) as w:
                seconds = w.getnframes() // w.getframerate()
        except (wave.Error, EOFError, ZeroDivisionError):
            return self.answer(400, {"error": "not a WAV file"})
        report = q.get("report", [f"audio_seconds={seconds}, files=1"])[0]
        self.answer(
            status,
            {"seconds": seconds, "transcript": "…"},
            [("Tollgate-Usage", report)],
        )


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print("listening", flush=True)
    server.serve_forever()

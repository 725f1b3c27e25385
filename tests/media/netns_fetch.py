"""Run inside a fresh network namespace (`unshare -rn`), where 1.2.3.4 is an address of
the namespace's own loopback device: a "public" server there leads the download process
to 127.0.0.1 (by a redirect, or by a page pointing at media). No packet can leave the
namespace. Prints {"reply": the download process's answer, "loopback_hits": requests the
private server saw}.

    python -m tests.media.netns_fetch redirect|page CLIP FOLDER
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PUBLIC = "1.2.3.4"


def serve(address: str, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((address, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(mode: str, clip: Path, folder: Path) -> None:
    hits: list[str] = []
    media = clip.read_bytes()

    class Private(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "audio/mpeg")
            self.send_header("Content-Length", str(len(media)))
            self.end_headers()
            self.wfile.write(media)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    private = serve("127.0.0.1", Private)
    target = f"http://127.0.0.1:{private.server_address[1]}/clip.mp3"

    class Public(Private):
        def do_GET(self) -> None:
            if mode == "redirect":
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            page = f'<html><body><audio src="{target}"></audio></body></html>'.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

    public = serve(PUBLIC, Public)
    job = {"url": f"http://{PUBLIC}:{public.server_address[1]}/talk", "folder": str(folder),
           "archive": str(folder / "archive.txt"), "max_filesize": 2**30,
           "max_duration": 3600.0, "allow_private": False}
    done = subprocess.run([sys.executable, "-m", "traxd.pipeline.ytdlp_worker", json.dumps(job)],
                          capture_output=True, text=True, timeout=120, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    reply = json.loads(lines[-1]) if lines else {"stderr": done.stderr[-2000:]}
    print(json.dumps({"reply": reply, "loopback_hits": hits}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))

"""A real HTTP server speaking the OpenAI endpoints traxd uses, scriptable for faults.

POST /v1/audio/transcriptions and /v1/audio/translations (multipart), POST
/v1/chat/completions (JSON). Replies queued in `script` are sent first, in order (e.g. a
429 with Retry-After, a 500, a 401); otherwise `transcribe` and `chat` make the answer.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: Any = None  # JSON-able, or str for a plain-text answer
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None  # instead of application/json or text/plain
    pace: float = 0.0  # seconds between the bytes of the body: a server that dribbles
    pause: float = 0.0  # seconds of silence after the headers, before the body


def html_page(status: int = 200) -> Reply:
    """What a proxy in front of the API sends when the API is down, with status 200."""
    return Reply(status, "<html><body><h1>502 Bad Gateway</h1>nginx</body></html>",
                 content_type="text/html")


def dribble(seconds_per_byte: float = 0.5) -> Reply:
    """A valid answer sent one byte at a time: each read succeeds, the whole takes long."""
    return Reply(200, {"text": "x" * 400}, pace=seconds_per_byte)


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]  # names in lower case
    fields: dict[str, str]  # form fields of a multipart upload
    files: dict[str, bytes]  # uploaded files by field name
    json: Any  # the body of a JSON request

    @property
    def user_text(self) -> str:
        return str(self.json["messages"][-1]["content"])


def error(status: int, message: str, **headers: str) -> Reply:
    return Reply(status, {"error": {"message": message, "type": "test", "code": None}}, headers)


def verbose_json(request: Request) -> Reply:
    """Two segments per upload, at 0.5-1.5 s and 2.0-3.0 s of the chunk."""
    segments = [{"id": i, "seek": 0, "start": start, "end": start + 1.0, "text": f" part {i}",
                 "tokens": [], "temperature": 0.0, "avg_logprob": -0.2,
                 "compression_ratio": 1.0, "no_speech_prob": 0.01}
                for i, start in enumerate((0.5, 2.0))]
    return Reply(200, {"task": "transcribe", "language": "english", "duration": 3.5,
                       "text": "part 0 part 1", "segments": segments})


def echo_chat(text: str) -> str:
    """An 'editor' that capitalises the first word and ends with a full stop."""
    return text[:1].upper() + text[1:] + "."


class FakeOpenAI:
    def __init__(self) -> None:
        self.script: deque[Reply] = deque()
        self.requests: list[Request] = []
        self.transcribe: Callable[[Request], Reply] = verbose_json
        self.chat: Callable[[str], str] = echo_chat
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def answer(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self.script:
                return self.script.popleft()
        if request.path.endswith(("/audio/transcriptions", "/audio/translations")):
            return self.transcribe(request)
        if request.path.endswith("/chat/completions"):
            return _completion(self.chat(request.user_text))
        return error(404, f"no route {request.path}")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                reply = server.answer(_parse(self.path, headers, body))
                _send(self, reply)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        return Handler

    @contextmanager
    def running(self) -> Iterator[FakeOpenAI]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join()


def _completion(content: str) -> Reply:
    return Reply(200, {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "test",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def _parse(path: str, headers: dict[str, str], body: bytes) -> Request:
    content_type = headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        fields, files = _multipart(content_type, body)
        return Request(path, headers, fields, files, None)
    return Request(path, headers, {}, {}, json.loads(body or b"null"))


def _multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, bytes]]:
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        assert isinstance(part, Message)
        name = str(part.get_param("name", header="content-disposition"))
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        if part.get_filename():
            files[name] = payload
        else:
            fields[name] = fields[name] + "," + payload.decode() if name in fields \
                else payload.decode()
    return fields, files


def _send(handler: BaseHTTPRequestHandler, reply: Reply) -> None:
    text = isinstance(reply.body, str)
    data = (reply.body if text else json.dumps(reply.body)).encode()
    handler.send_response(reply.status)
    handler.send_header("Content-Type", reply.content_type or (
        "text/plain" if text else "application/json"))
    handler.send_header("Content-Length", str(len(data)))
    for key, value in reply.headers.items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.flush()
    try:
        if reply.pause:
            time.sleep(reply.pause)  # a server thread standing still, not the test
        if not reply.pace:
            handler.wfile.write(data)
            return
        for index in range(len(data)):
            handler.wfile.write(data[index:index + 1])
            handler.wfile.flush()
            time.sleep(reply.pace)
    except (BrokenPipeError, ConnectionResetError):  # the client gave up: as it should
        return

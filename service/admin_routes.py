"""Admin routes under /adapters (admin token, see service.auth): upload, unload, deny, allow.

- `POST /adapters/upload?name=N`: a LoRA file (kohya/A1111, diffusers or PEFT safetensors) as the
  request body, or as the `file` field of a multipart form (with `name` as a field or in the
  query). It is imported as `bentolora-models import-lora` does (`models.lora_exchange.
  import_lora`: checked against the served base, origin in the metadata), stored as a regular
  adapter version, and served at once. Over BENTOLORA_MAX_ADAPTER_BYTES: 413.
- `POST /adapters/unload {"name": N}`: this server stops serving N's versions now and drops
  their loaded weights; a version saved later is served again (service.adapter_policy).
- `POST /adapters/deny {"name": N, "version": V?}`: N (or its version V) is refused from now on,
  on every replica that shares the store, across restarts.
- `POST /adapters/allow {"name": N, "version": V?}`: lifts a deny (and, without a version, an
  unload).

Each answers with what the server serves afterwards (as GET /adapters/ does). Bad input gets a
4xx with a one-line reason and changes nothing: 400 (no or bad name, not a safetensors file),
404 (no such adapter), 409 (uploading to a denied name), 413 (too big), 422 (a file that is not
a LoRA this base can serve: LyCORIS, DoRA, layers the base lacks, non-finite weights).
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from models.store import StoreError, adapter_store_name, check_name
from service.adapter_policy import ALL, DenyListError
from service.settings import Settings
from service.state import ServerState

if TYPE_CHECKING:  # the watcher and the importer pull in transformers: imported when used
    from service.store_watcher import StoreWatcher

log = logging.getLogger(__name__)

UPLOAD_PATH = "/adapters/upload"
MULTIPART_SLACK = 64 * 2**10
"""What a multipart form adds around the file, at most (boundaries, headers, the name field)."""
LOADING = {"error": "models are still loading"}


def upload_body_limit(settings: Settings) -> int:
    """The body size cap of an upload (the request guard's): the adapter cap and a form's frame."""
    return settings.max_adapter_bytes + MULTIPART_SLACK


class Refusal(Exception):
    """Bad input: answered `status` with `message`, nothing changed."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def admin_routes(state: ServerState, watcher: Callable[[], StoreWatcher]) -> list[Route]:
    """The routes, for the /adapters app; `watcher()` is the running instance's store watcher
    (it exists only once BentoML has made the instance)."""

    def guarded(handler):
        async def endpoint(request: Request) -> JSONResponse:
            if not state.snapshot.loaded:
                return JSONResponse(LOADING, status_code=503)
            try:
                status, body = await handler(request, watcher())
            except Refusal as refusal:
                return JSONResponse({"error": str(refusal)}, status_code=refusal.status)
            except DenyListError as err:
                log.error("%s", err)
                return JSONResponse({"error": str(err)}, status_code=500)
            return JSONResponse(body, status_code=status)

        return endpoint

    return [
        Route("/upload", guarded(upload), methods=["POST"]),
        Route("/unload", guarded(unload), methods=["POST"]),
        Route("/deny", guarded(deny), methods=["POST"]),
        Route("/allow", guarded(allow), methods=["POST"]),
    ]


# --- upload


async def upload(request: Request, watcher: StoreWatcher) -> tuple[int, dict[str, Any]]:
    limit = watcher.settings.max_adapter_bytes
    with tempfile.TemporaryDirectory(prefix="bentolora-upload-") as scratch:
        name, path = await _received_file(request, Path(scratch), limit)
        _check_not_denied(watcher, name)
        entry = await anyio.to_thread.run_sync(_import, path, name, watcher)
    snapshot = await anyio.to_thread.run_sync(watcher.reload)
    served = snapshot.adapters.get(name)
    body = {
        "tag": entry.tag,
        "name": name,
        "version": entry.version,
        "origin": entry.metadata.get("origin"),
        "served": served is not None and served.tag == entry.tag,
        **snapshot.listing(),
    }
    if not body["served"]:
        body["why_not_served"] = (
            snapshot.why_not_served(name)
            if served is None
            else (f"{served.tag} is served (newer, or the only promoted one)")
        )
    return 201, body


async def _received_file(request: Request, scratch: Path, limit: int) -> tuple[str, Path]:
    """(adapter name, the uploaded file written under `scratch`), checked: a valid name, a
    `.safetensors` file name, at most `limit` bytes, a safetensors header."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        name, filename, write = await _form_file(request)
    else:
        name, filename = request.query_params.get("name"), request.query_params.get("filename")
        body = await request.body()
        write = _writer(body)
    name = _checked_name(name)
    filename = Path(filename or f"{name}.safetensors").name
    if not filename.endswith(".safetensors"):
        raise Refusal(400, f"{filename}: only .safetensors files are taken (pickles are refused)")
    path = scratch / filename
    size = await anyio.to_thread.run_sync(write, path)
    if size > limit:
        raise Refusal(413, f"the file is {size} bytes; BENTOLORA_MAX_ADAPTER_BYTES is {limit}")
    _check_safetensors(path, size)
    return name, path


async def _form_file(request: Request) -> tuple[str | None, str | None, Callable[[Path], int]]:
    try:
        form = await request.form(max_files=1, max_fields=4)
    except Exception as err:  # malformed multipart: starlette raises several types
        raise Refusal(400, f"not a readable multipart form ({err})") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise Refusal(400, "the form has no `file` field holding the LoRA file")
    name = form.get("name") or request.query_params.get("name")

    def write(path: Path) -> int:
        upload.file.seek(0)
        with upload.file as spooled, open(path, "wb") as out:
            shutil.copyfileobj(spooled, out, 1 << 20)
        return path.stat().st_size

    return (name if isinstance(name, str) else None), upload.filename, write


def _writer(body: bytes) -> Callable[[Path], int]:
    def write(path: Path) -> int:
        path.write_bytes(body)
        return len(body)

    return write


def _checked_name(name: str | None) -> str:
    if not name:
        raise Refusal(400, "name the adapter: ?name=NAME (or a `name` form field)")
    name = name.removeprefix("lora-")
    try:
        check_name(adapter_store_name(name), "adapter name")
    except StoreError as err:
        raise Refusal(400, str(err)) from None
    return name


def _check_safetensors(path: Path, size: int) -> None:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian), then
    the header, a JSON object."""
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = f.read(length) if 1 < length <= min(size - 8, 100 * 2**20) else b""
    try:
        ok = isinstance(json.loads(header), dict)
    except ValueError:
        ok = False
    if not ok:
        raise Refusal(
            400, f"{path.name} is not a safetensors file (pickles and others are refused)"
        )


def _check_not_denied(watcher: StoreWatcher, name: str) -> None:
    if ALL in watcher.policy.denied().get(name, []):
        raise Refusal(409, f"adapter {name!r} is denied by an admin; POST /adapters/allow first")


def _import(path: Path, name: str, watcher: StoreWatcher):
    from models.adapter import AdapterError
    from models.lora_exchange import import_lora

    try:
        return import_lora(path, name, base=watcher.engine.base.tag)
    except AdapterError as err:  # LoraFileError too: LyCORIS, DoRA, layers the base lacks
        raise Refusal(422, str(err).splitlines()[0]) from None
    except StoreError as err:
        status = 507 if "no space left" in str(err) else 500
        raise Refusal(status, str(err)) from None
    except OSError as err:  # a read-only store, one mounted apart from its staging folder, ...
        log.exception("upload of %s: the model store cannot be written", name)
        raise Refusal(500, f"the model store cannot be written: {err}") from None


# --- unload, deny, allow


async def unload(request: Request, watcher: StoreWatcher) -> tuple[int, dict[str, Any]]:
    name, _ = await _named(request)
    snapshot = watcher.engine.state.snapshot
    if name not in snapshot.adapters:
        raise Refusal(404, f"not served, nothing to unload: {snapshot.why_not_served(name)}")
    versions = await anyio.to_thread.run_sync(_stored_versions, name)
    watcher.policy.unload(name, {*versions, snapshot.adapters[name].version})
    snapshot = await anyio.to_thread.run_sync(watcher.reload)
    return 200, {"unloaded": name, **snapshot.listing()}


async def deny(request: Request, watcher: StoreWatcher) -> tuple[int, dict[str, Any]]:
    name, version = await _named(request)
    versions = await anyio.to_thread.run_sync(_stored_versions, name)
    if not versions:
        raise Refusal(404, f"no adapter {name!r} in the store")
    if version is not None and version not in versions:
        raise Refusal(
            404, f"adapter {name!r} has no version {version!r}; it has {', '.join(versions)}"
        )
    await anyio.to_thread.run_sync(watcher.policy.deny, name, version)
    snapshot = await anyio.to_thread.run_sync(watcher.reload)
    return 200, {"denied": watcher.policy.denied(), **snapshot.listing()}


async def allow(request: Request, watcher: StoreWatcher) -> tuple[int, dict[str, Any]]:
    name, version = await _named(request)
    lifted = await anyio.to_thread.run_sync(watcher.policy.allow, name, version)
    if not lifted:
        what = f"version {version!r} of {name!r}" if version else repr(name)
        raise Refusal(404, f"{what} is neither denied nor unloaded (GET /adapters/ lists refusals)")
    snapshot = await anyio.to_thread.run_sync(watcher.reload)
    return 200, {
        "allowed": name,
        "lifted": lifted,
        "denied": watcher.policy.denied(),
        **snapshot.listing(),
    }


async def _named(request: Request) -> tuple[str, str | None]:
    """(name, version or None) from a JSON body {"name": ..., "version": ...}."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise Refusal(400, 'send JSON: {"name": "...", "version": "..." (optional)}') from None
    if not isinstance(body, dict):
        raise Refusal(400, 'send a JSON object: {"name": "...", "version": "..." (optional)}')
    version = body.get("version")
    if version is not None and (not isinstance(version, str) or not version):
        raise Refusal(400, "version: a store version (a string), or leave it out")
    name = body.get("name")
    return _checked_name(name if isinstance(name, str) else None), version


def _stored_versions(name: str) -> list[str]:
    """The versions of adapter `name` in the store, for any base."""
    from models.adapter import list_adapters

    store_name = adapter_store_name(name)
    return sorted(e.version for e in list_adapters() if e.name == store_name)

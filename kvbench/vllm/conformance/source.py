"""vLLM's unit tests from its source release, unpacked once into .cache/vllm-src.

The wheel ships no tests; the sdist on PyPI does. Its address comes from PyPI's simple index
(PEP 691 JSON, what pip's own index code reads), its content is checked against the pinned
sha256, and only `tests/` and `pyproject.toml` (vLLM's pytest markers) are unpacked.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import urllib.request
from pathlib import Path

from kvbench.errors import KvbenchError

VERSION = "0.32.0"
SDIST = f"vllm-{VERSION}.tar.gz"
SHA256 = "d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad"
INDEX = "https://pypi.org/simple/vllm/"
CACHE = Path(".cache/vllm-src")
# The tests' models that are plain OPT configs, as local config.json files (Hugging Face's
# configs of facebook/opt-125m, the tests' default model, and of opt-350m, the priority tests').
LOCAL_MODELS = {f"facebook/{name}": Path(__file__).resolve().parent / name
                for name in ("opt-125m", "opt-350m")}


def sdist_url() -> str:
    """The sdist's address in PyPI's simple index."""
    request = urllib.request.Request(INDEX, headers={
        "Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
    except OSError as exc:
        raise KvbenchError(f"cannot read PyPI's index {INDEX}: {exc}") from None
    for entry in files:
        if entry["filename"] == SDIST:
            return entry["url"]
    raise KvbenchError(f"PyPI's index {INDEX} lists no {SDIST}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(cache: Path = CACHE) -> Path:
    """The sdist in `cache`, downloaded unless already there, its sha256 checked."""
    path = cache / SDIST
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        try:
            with urllib.request.urlopen(sdist_url(), timeout=300) as response, \
                    partial.open("wb") as file:
                shutil.copyfileobj(response, file)
        except OSError as exc:
            raise KvbenchError(f"cannot download {SDIST}: {exc}") from None
        partial.replace(path)
    if sha256(path) != SHA256:
        raise KvbenchError(f"{path}: sha256 is not {SHA256}; delete it to download again")
    return path


def unpacked(cache: Path = CACHE) -> Path:
    """The release's root with `tests/` and `pyproject.toml` unpacked (once)."""
    root = cache / f"vllm-{VERSION}"
    done = root / ".unpacked"
    if not done.is_file():
        prefix = f"vllm-{VERSION}/"
        with tarfile.open(download(cache)) as archive:
            members = [m for m in archive.getmembers()
                       if m.name.startswith(prefix + "tests/")
                       or m.name == prefix + "pyproject.toml"]
            archive.extractall(cache, members=members, filter="data")
        done.write_text(SHA256)
    return root


def model_redirect(cache: Path = CACHE) -> Path:
    """VLLM_MODEL_REDIRECT_PATH's file: the test models' names -> their local configs."""
    path = cache / "model-redirect.json"
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({name: str(local) for name, local in LOCAL_MODELS.items()}))
    return path

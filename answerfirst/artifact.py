"""The `answerfirst.json` manifest that every checkpoint and export directory carries.

It records what a runtime needs to score with the artifact and what a person needs to trust it:
format version, the AFRL format (grades, their token ids and values, rubric, template pieces, max
lengths), the source checkpoint and its hash, the export kind, and per-file variants with the
parity measured against torch at export time.

    {
      "format_version": 1,
      "kind": "checkpoint" | "onnx" | "gguf",
      "format": {grades, values, rubric, max_doc_tokens, prompt_template, answer_end},
      "grade_token_ids": [...],
      "source": {"model": "...", "sha256": "..."},
      "variants": [{"name", "file", "quantization", "parity": {..., "passed": bool}}],
      "info": {...}            # free-form: training config, metrics, export settings
    }
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from answerfirst.afrl import AFRLFormat, FormatError, PromptTokenizer

FORMAT_VERSION = 1
MANIFEST_NAME = "answerfirst.json"
KINDS = ("checkpoint", "onnx", "gguf")


class ManifestError(ValueError):
    """A manifest is missing, malformed, or disagrees with the files beside it."""


@dataclass
class Variant:
    """One model file of an export (e.g. fp32 / int8 ONNX, F16 / Q8_0 GGUF) and its parity report."""

    name: str
    file: str
    quantization: str
    parity: dict[str, Any] | None = None

    @property
    def parity_passed(self) -> bool:
        return bool(self.parity and self.parity.get("passed"))


@dataclass
class Manifest:
    kind: str
    format: AFRLFormat
    grade_token_ids: tuple[int, ...]
    source: dict[str, Any] = field(default_factory=dict)
    variants: list[Variant] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ManifestError(f"kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        self.grade_token_ids = tuple(int(i) for i in self.grade_token_ids)
        if len(self.grade_token_ids) != len(self.format.grades):
            raise ManifestError(
                f"grade_token_ids: {len(self.grade_token_ids)} ids for {len(self.format.grades)} grades"
            )
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ManifestError(f"variants: names must be unique, got {names}")

    # -- variants ------------------------------------------------------------------------------

    def variant(self, name: str | None) -> Variant:
        """The named variant; by default the first (fastest-first order) whose parity passed."""
        if not self.variants:
            raise ManifestError(f"this {self.kind} manifest lists no variants")
        if name is not None:
            for v in self.variants:
                if v.name == name:
                    return v
            raise ManifestError(f"no variant {name!r}; this export has {', '.join(v.name for v in self.variants)}")
        for v in self.variants:
            if v.parity_passed:
                return v
        raise ManifestError(
            "no variant of this export passed its parity check "
            f"({', '.join(v.name for v in self.variants)}); pick one explicitly with variant=..."
        )

    # -- files ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "kind": self.kind,
            "format": self.format.to_dict(),
            "grade_token_ids": list(self.grade_token_ids),
            "source": self.source,
            "variants": [vars(v) for v in self.variants],
            "info": self.info,
        }

    def write(self, directory: str | Path) -> Path:
        """Write atomically (temp file + rename), so a crash never leaves half a manifest."""
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected a JSON object")
        missing = {"format_version", "kind", "format", "grade_token_ids"} - data.keys()
        if missing:
            raise ManifestError(f"{where}: missing field(s) {', '.join(sorted(missing))}")
        if data["format_version"] != FORMAT_VERSION:
            raise ManifestError(
                f"{where}: format_version {data['format_version']} is not supported by this answerfirst "
                f"(it reads version {FORMAT_VERSION}); re-export with this version"
            )
        try:
            fmt = AFRLFormat.from_dict(data["format"])
            variants = [Variant(**v) for v in data.get("variants", [])]
            return cls(
                kind=data["kind"],
                format=fmt,
                grade_token_ids=data["grade_token_ids"],
                source=data.get("source", {}),
                variants=variants,
                info=data.get("info", {}),
            )
        except (FormatError, TypeError) as e:
            raise ManifestError(f"{where}: {e}") from None

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        """Read and validate: the JSON, its fields, and that every file it names exists."""
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{directory} has no {MANIFEST_NAME}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{path} is not valid JSON: {e}") from None
        manifest = cls.from_dict(data, where=str(path))
        for v in manifest.variants:
            if not (directory / v.file).is_file():
                raise ManifestError(f"{path}: variant {v.name!r} names {v.file}, which is missing from {directory}")
        if manifest.kind == "checkpoint" and not (directory / "config.json").is_file():
            raise ManifestError(f"{path}: a checkpoint manifest, but {directory} has no config.json")
        return manifest


FILES_KEY = "files"  # manifest.info[FILES_KEY]: {file name: size in bytes} of an export's files


def record_file_sizes(manifest: Manifest, directory: str | Path, names: list[str]) -> None:
    """Note the sizes of an export's files, so a truncated copy is caught before a runtime reads it."""
    directory = Path(directory)
    manifest.info[FILES_KEY] = {name: (directory / name).stat().st_size for name in names if (directory / name).is_file()}


def check_file_sizes(directory: str | Path, manifest: Manifest, names: list[str], fix: str) -> None:
    """Each of `names` that the manifest recorded must exist with its recorded size (exports written
    before sizes were recorded skip the check). `fix` ends each message: how to rebuild the export."""
    directory = Path(directory)
    sizes = manifest.info.get(FILES_KEY, {})
    for name in names:
        expected = sizes.get(name)
        if expected is None:
            continue
        path = directory / name
        if not path.is_file():
            raise ManifestError(f"{directory}: {name} is missing (the export lists it); {fix}")
        actual = path.stat().st_size
        if actual != expected:
            raise ManifestError(f"{path} is {actual} bytes but was {expected} bytes when exported: it is truncated or corrupted; {fix}")


def has_manifest(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST_NAME).is_file()


def artifact_kind(path: str | os.PathLike[str]) -> tuple[str, Manifest | None]:
    """What `path` holds, the one way load() and the demo tell: (kind, its manifest or None).

    A directory with answerfirst.json is what its manifest says; a .gguf file, or a directory of
    .gguf files, is "gguf"; anything else that is not a file is a "checkpoint" (a directory
    without manifest, or a hub id). Raises ManifestError for what no backend can load."""
    location = Path(path)
    if location.is_dir() and has_manifest(location):
        manifest = Manifest.read(location)
        return manifest.kind, manifest
    if (location.is_file() and location.suffix == ".gguf") or (location.is_dir() and any(location.glob("*.gguf"))):
        return "gguf", None
    if location.is_dir() and any(location.glob("*.onnx")):
        raise ManifestError(f"{location} holds .onnx files but no answerfirst.json; export it with `answerfirst export onnx`")
    if location.exists() and not location.is_dir():
        raise ManifestError(f"{location} is a file answerfirst cannot load (expected a directory or a .gguf file)")
    return "checkpoint", None


def bind_format(tokenizer: Any, manifest: Manifest | None, where: str, max_doc_tokens: int | None = None) -> PromptTokenizer:
    """The AFRL prompt tokenizer of an artifact: its manifest's format, else the default format
    derived from the tokenizer's chat template; the manifest's grade ids must match the tokenizer.
    max_doc_tokens (None = the format's) overrides the document truncation length."""
    fmt = manifest.format if manifest is not None else AFRLFormat.from_chat_template(tokenizer)
    fmt = fmt.with_overrides(max_doc_tokens=max_doc_tokens)
    prompts = PromptTokenizer(tokenizer, fmt)
    if manifest is not None and prompts.grade_ids != manifest.grade_token_ids:
        raise ManifestError(
            f"{where}: the manifest's grade token ids {list(manifest.grade_token_ids)} do not match the "
            f"tokenizer's {list(prompts.grade_ids)} for grades {list(fmt.grades)}; the manifest and "
            "tokenizer come from different models"
        )
    return prompts


def checkpoint_hash(directory: str | Path) -> str:
    """sha256 over a checkpoint's weight files (sorted by name): identifies the exact weights."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise ManifestError(f"{directory} holds no .safetensors or .bin weight files")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()

"""The `answerfirst.json` manifest that every checkpoint and export directory carries.

It records what a runtime needs to score with the artifact and what a person needs to trust it:
format version, the AFRL format (grades, their token ids and values, rubric, template pieces, max
lengths), the source checkpoint and its hash, the export kind, and per-file variants with the
parity measured against torch at export time.

    {
      "format_version": 1,
      "kind": "checkpoint" | "onnx" | "gguf" | "openvino",
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
KINDS = ("checkpoint", "onnx", "gguf", "openvino")


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
        version = data["format_version"]
        if version != FORMAT_VERSION:
            if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
                fix = "it was written by a newer answerfirst: upgrade (pip install -U answerfirst) to load it"
            else:
                fix = "re-export (or re-train) it with this answerfirst"
            raise ManifestError(
                f"{where}: format_version {version!r} is not supported by this answerfirst "
                f"(it reads version {FORMAT_VERSION}); {fix}"
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
SHA256_KEY = "files_sha256"  # manifest.info[SHA256_KEY]: {file name: sha256 hex} of the same files


def finalize_files(manifest: Manifest, directory: str | Path, names: list[str]) -> None:
    """The last step of an export, for each of `names` that exists: give it the permissions of any new
    file here (writers that go through temp files leave 0600, so another service user could not read
    the export), and record its size (checked at every load) and sha256 (load(verify=True), `answerfirst
    verify`)."""
    directory = Path(directory)
    present = give_default_mode(directory, names)
    manifest.info[FILES_KEY] = {name: (directory / name).stat().st_size for name in present}
    manifest.info[SHA256_KEY] = {name: file_sha256(directory / name) for name in present}


def give_default_mode(directory: str | Path, names: list[str]) -> list[str]:
    """chmod each of `names` that exists in `directory` to the mode of a file newly created there;
    returns those names. (transformers 5 writes model.safetensors 0600, onnx writes .onnx.data 0600.)"""
    directory = Path(directory)
    present = [name for name in names if (directory / name).is_file()]
    mode = default_file_mode(directory)
    for name in present:
        os.chmod(directory / name, mode)
    return present


def default_file_mode(directory: str | Path) -> int:
    """The mode a file newly created in `directory` gets (0o666 less the umask), read from a probe file
    rather than os.umask, which would change the umask of every thread for a moment."""
    fd, probe = None, Path(directory) / f".mode-probe-{os.getpid()}-{id(directory)}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        return os.stat(probe).st_mode & 0o777
    finally:
        if fd is not None:
            os.close(fd)
        probe.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


# -- checkpoints: safetensors structure, checksums --------------------------------------------------

SAFETENSORS_INDEX = "model.safetensors.index.json"
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors library refuses larger headers too


def check_safetensors(path: str | Path, fix: str) -> None:
    """A .safetensors file is an 8-byte header length, a JSON header with each tensor's byte range,
    then the data: the file must hold exactly what its header describes. Reads only the header."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= header_len <= min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise ManifestError(f"{path} is not a complete safetensors file (its header is cut or garbled); {fix}")
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError, AttributeError):
            raise ManifestError(f"{path} has a corrupt safetensors header; {fix}") from None
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says (corrupt)"
        raise ManifestError(f"{path} is {state}: {size} bytes where its header describes {expected}; {fix}")


def check_checkpoint_files(directory: str | Path) -> None:
    """The cheap checks of a checkpoint directory before torch reads it: every shard its index names is
    there and every .safetensors file is complete."""
    directory = Path(directory)
    fix = "copy the checkpoint again, or re-run the training that wrote it"
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError):
            raise ManifestError(f"{index} is not a valid safetensors index; {fix}") from None
        missing = sorted(name for name in shards if not (directory / name).is_file())
        if missing:
            raise ManifestError(f"{directory}: weight shard(s) {', '.join(missing)} named by {index.name} are missing; {fix}")
    for path in sorted(directory.glob("*.safetensors")):
        check_safetensors(path, fix)


def check_checksums(directory: str | Path, manifest: Manifest | None, names: list[str] | None = None) -> dict[str, str | None]:
    """sha256 of an artifact's files against what its manifest recorded: {file: None if it matches,
    else the problem, one line with the fix}.

    An export (onnx, gguf) recorded each file's sha256 at export time (`names`: only those, default
    all). A checkpoint recorded the sha256 of its weight files together (source.sha256, see
    checkpoint_hash). Raises ManifestError when nothing was recorded to check against."""
    directory = Path(directory)
    if manifest is None:
        raise ManifestError(f"{directory} has no {MANIFEST_NAME}, so no recorded checksums to verify against")
    if manifest.kind == "checkpoint":
        expected = manifest.source.get("sha256")
        if not expected:
            raise ManifestError(f"{directory / MANIFEST_NAME} records no sha256 of the weights; nothing to verify against")
        weights = ", ".join(p.name for p in _weight_files(directory))
        problem = None
        if checkpoint_hash(directory) != expected:
            problem = (
                f"{directory}: the weight files ({weights}) do not match the sha256 recorded when the checkpoint "
                "was written: they are corrupted or were replaced; copy it again or re-train"
            )
        return {weights: problem}
    recorded = manifest.info.get(SHA256_KEY)
    if not recorded:
        raise ManifestError(
            f"{directory / MANIFEST_NAME} records no file checksums (exported by an older answerfirst); "
            f"re-run `answerfirst export {manifest.kind}` to record them"
        )
    fix = f"re-run `answerfirst export {manifest.kind}` (or copy the export again)"
    sizes = manifest.info.get(FILES_KEY, {})
    results: dict[str, str | None] = {}
    for name in recorded if names is None else [n for n in names if n in recorded]:
        path = directory / name
        if not path.is_file():
            results[name] = f"{directory}: {name} is missing (the export lists it); {fix}"
        elif name in sizes and path.stat().st_size != sizes[name]:
            results[name] = f"{path} is {path.stat().st_size} bytes, not the {sizes[name]} recorded at export: truncated; {fix}"
        elif (actual := file_sha256(path)) != recorded[name]:
            results[name] = (
                f"{path}: sha256 {actual[:12]}… differs from the {recorded[name][:12]}… recorded at export: "
                f"the file is corrupted; {fix}"
            )
        else:
            results[name] = None
    return results


def verify_checksums(directory: str | Path, manifest: Manifest | None, names: list[str] | None = None) -> None:
    """check_checksums, raising ManifestError with the first problem."""
    problems = [p for p in check_checksums(directory, manifest, names).values() if p]
    if problems:
        raise ManifestError(problems[0])


def variant_files(manifest: Manifest, variant: Variant) -> list[str]:
    """The recorded files that loading `variant` reads: its own (its file and e.g. file.data) and the
    ones no variant owns (the tokenizer)."""
    recorded = set(manifest.info.get(SHA256_KEY, {})) | set(manifest.info.get(FILES_KEY, {}))

    def owners(name: str) -> list[Variant]:  # two variants may read one file (GGUF: logits and rank paths)
        return [v for v in manifest.variants if name == v.file or name.startswith(v.file + ".")]

    return sorted(name for name in recorded if not owners(name) or variant in owners(name))


def has_manifest(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST_NAME).is_file()


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise ManifestError(f"{directory} holds no .safetensors or .bin weight files")
    return files


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
    digest = hashlib.sha256()
    for path in _weight_files(directory):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()

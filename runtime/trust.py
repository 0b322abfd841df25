"""Integrity and authenticity of the artifacts a device loads (after TUF: two separate guarantees).

**Integrity, always.** Every JSON descriptor h2t-edge writes (task-graph sidecar, engine record,
shared-backbone and head descriptors, cache manifest) is *sealed*: `content_sha256` is the sha256 of
its canonical JSON without `content_sha256` and `signature`, and the descriptor records the sha256
of every other file of the artifact (the graph, the engine, the head tensors, the cache's arrays).
A loader recomputes both and refuses a mismatch, a missing digest or a malformed one; nothing is
checked "when present". Artifacts of the format before sealing became mandatory are refused with
the fix, or load under an explicit, loud `allow_unverified=True`.

**Authenticity, once keys are configured.** `seal(data, signing_key)` also signs the descriptor
with ed25519: the signature covers its canonical JSON without `signature`, that is the digests of
every file, the format and version, the task names and `issued` (when it was sealed). With trusted
keys configured (`trusted_keys=` / $H2T_EDGE_TRUSTED_KEYS / `predict --trusted-key`), a loader
refuses an unsigned descriptor, one signed by another key, and a bad signature.

**Rollback.** A device may keep a version record (`version_record=` / $H2T_EDGE_VERSION_RECORD): the
newest `issued` it has loaded per task. An artifact older than that for one of its tasks is refused.
The record is created explicitly (`VersionRecord.create`, `h2t-edge versions init`); a missing,
unreadable or malformed record is an error, never "empty", and updates are serialized by `flock`.

**One read.** A loader reads each file once (`read_verified`), checks those bytes and hands the same
bytes to the engine; nothing reopens a path after its check. File digests are BLAKE3 (`*_blake3`
fields, hashed on every core); artifacts of the previous sealed formats carry sha256 (`*_sha256`)
and are checked the old way.

`cryptography` is imported only when a key is used, `blake3` only when a file is checked.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .io import atomic_write_bytes, atomic_write_json, read_json
from .schema import canonical_bytes, is_digest, is_sha256

DIGEST_FIELD = "content_sha256"
SIGNATURE_FIELD = "signature"
ISSUED_FIELD = "issued"
ALGORITHM = "ed25519"
TRUSTED_KEYS_ENV = "H2T_EDGE_TRUSTED_KEYS"  # os.pathsep-separated .pub files
VERIFY_FIRST_ENV = "H2T_EDGE_VERIFY_FIRST"  # "1": digests finish before an engine parses the bytes
VERSION_RECORD_ENV = "H2T_EDGE_VERSION_RECORD"  # a JSON file the device keeps
VERSION_RECORD_FORMAT = "h2t-edge/version-record"
SIGN_EXTRA = "pip install 'h2t-edge[sign]' (it adds the `cryptography` package)"
FILE_DIGESTS = ("blake3", "sha256")  # a file digest field ends in its algorithm: graph_blake3, graph_sha256


class IntegrityError(ArtifactError):
    """A descriptor or file that does not match its digest, or has none."""


class SignatureError(ArtifactError):
    """A descriptor that is unsigned, signed by an untrusted key, or whose signature does not verify."""


class RollbackError(ArtifactError):
    """An artifact older than the one this device has already loaded for the same task."""


def content_digest(data: Mapping[str, Any]) -> str:
    """sha256 of the descriptor without its digest and signature."""
    return hashlib.sha256(canonical_bytes(data, (DIGEST_FIELD, SIGNATURE_FIELD))).hexdigest()


# -- keys ------------------------------------------------------------------------------------------


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SignatureError(f"signing keys need the `cryptography` package: {SIGN_EXTRA}") from None
    return serialization, ed25519


def _key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    """An ed25519 private key (`KEYDIR/signing.key`, PEM, PKCS#8, unencrypted, mode 0600)."""

    key: Any  # cryptography Ed25519PrivateKey
    path: str = "<memory>"

    @classmethod
    def generate(cls) -> "SigningKey":
        _, ed25519 = _crypto()
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SigningKey":
        serialization, ed25519 = _crypto()
        path = Path(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except OSError as exc:
            raise SignatureError(f"cannot read signing key {path}: {exc}; make one with `h2t-edge keys generate`") \
                from None
        except (ValueError, TypeError) as exc:
            raise SignatureError(f"{path} is not an unencrypted PEM private key ({exc}); make one with "
                                 "`h2t-edge keys generate`") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise SignatureError(f"{path} holds a {type(key).__name__}, not an ed25519 key; make one with "
                                 "`h2t-edge keys generate`")
        return cls(key, str(path))

    @property
    def public_raw(self) -> bytes:
        serialization, _ = _crypto()
        return self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        return _key_id(self.public_raw)

    def public_pem(self) -> bytes:
        serialization, _ = _crypto()
        return self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, payload: bytes) -> dict:
        return {"algorithm": ALGORITHM, "key_id": self.key_id,
                "value": base64.b64encode(self.key.sign(payload)).decode("ascii")}

    def save(self, key_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write KEYDIR/signing.key (private, mode 0600) and KEYDIR/signing.pub; refuses to overwrite."""
        serialization, _ = _crypto()
        key_dir = Path(key_dir)
        private, public = key_dir / "signing.key", key_dir / "signing.pub"
        if private.exists() or public.exists():
            raise SignatureError(f"{key_dir} already holds a key pair; choose another folder (a device that trusts "
                                 "the old public key would refuse everything signed with a new one)")
        key_dir.mkdir(parents=True, exist_ok=True)
        pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        # created 0600 from the start: the private key is never readable by others, not even briefly
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        atomic_write_bytes(public, self.public_pem())
        return private, public


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys a device trusts, by key id. Empty: no authenticity check (integrity only)."""

    keys: Mapping[str, Any]  # key id -> cryptography Ed25519PublicKey
    sources: Mapping[str, str]  # key id -> where it was read

    @classmethod
    def load(cls, paths: Sequence[str | os.PathLike]) -> "TrustedKeys":
        keys, sources = {}, {}
        for p in paths:
            serialization, ed25519 = _crypto()
            path = Path(p)
            try:
                key = serialization.load_pem_public_key(path.read_bytes())
            except OSError as exc:
                raise SignatureError(f"cannot read trusted key {path}: {exc}; pass the signing.pub that "
                                     "`h2t-edge keys generate` wrote") from None
            except (ValueError, TypeError) as exc:
                raise SignatureError(f"trusted key {path} is not a PEM public key ({exc}); pass a signing.pub "
                                     "from `h2t-edge keys generate`") from None
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise SignatureError(f"trusted key {path} is a {type(key).__name__}, not an ed25519 key")
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            keys[_key_id(raw)], sources[_key_id(raw)] = key, str(path)
        return cls(keys, sources)

    @classmethod
    def resolve(cls, trusted_keys: "TrustedKeys | Sequence[str | os.PathLike] | None" = None) -> "TrustedKeys":
        """`trusted_keys` as given (paths or TrustedKeys), plus the files in $H2T_EDGE_TRUSTED_KEYS."""
        given = trusted_keys if isinstance(trusted_keys, TrustedKeys) else cls.load(list(trusted_keys or ()))
        setting = os.environ.get(TRUSTED_KEYS_ENV)
        if setting is None:
            return given
        env = [p for p in setting.split(os.pathsep) if p.strip()]
        if not env or len(env) != len(setting.split(os.pathsep)):
            # A setting that names no key (blank, ':', an empty entry) is a mistake, not "trust nothing".
            raise SignatureError(f"${TRUSTED_KEYS_ENV} is set to {setting!r}, which names no key (or has an empty "
                                 f"entry); set it to the signing.pub file(s) to trust, separated by {os.pathsep!r}, "
                                 "or unset it to check integrity only")
        extra = cls.load(env)
        return cls({**given.keys, **extra.keys}, {**given.sources, **extra.sources})

    def __bool__(self) -> bool:
        return bool(self.keys)

    def verify(self, data: Mapping[str, Any], source: str, fix: str) -> None:
        signature = data.get(SIGNATURE_FIELD)
        if signature is None:
            raise SignatureError(f"{source} is not signed, and this device trusts only artifacts signed by "
                                 f"{', '.join(sorted(self.sources.values()))}; {fix} with --sign-key")
        if (not isinstance(signature, Mapping) or signature.get("algorithm") != ALGORITHM
                or not isinstance(signature.get("key_id"), str) or not isinstance(signature.get("value"), str)):
            raise SignatureError(f"{source}: field '{SIGNATURE_FIELD}' is malformed (expected algorithm "
                                 f"{ALGORITHM!r}, key_id and value); {fix} with --sign-key")
        key = self.keys.get(signature["key_id"])
        if key is None:
            raise SignatureError(f"{source} is signed by key {signature['key_id']}, which this device does not trust "
                                 f"(trusted: {', '.join(sorted(self.keys))}); {fix} with a trusted --sign-key")
        from cryptography.exceptions import InvalidSignature

        try:
            value = base64.b64decode(signature["value"], validate=True)
            key.verify(value, canonical_bytes(data, (SIGNATURE_FIELD,)))
        except (InvalidSignature, ValueError):
            raise SignatureError(f"{source}: the signature does not verify (the descriptor was changed after it "
                                 f"was signed); {fix}") from None


# -- sealing and checking ---------------------------------------------------------------------------


def seal(data: dict, signing_key: SigningKey | None = None, *, issued: int | None = None) -> dict:
    """Seal a descriptor in place (and return it): `issued`, `content_sha256`, and with a key the
    ed25519 `signature` over everything else. Record every file digest in `data` first."""
    data.pop(SIGNATURE_FIELD, None)
    data[ISSUED_FIELD] = int(issued if issued is not None else data.get(ISSUED_FIELD) or time.time_ns())
    data[DIGEST_FIELD] = content_digest(data)
    if signing_key is not None:
        data[SIGNATURE_FIELD] = signing_key.sign(canonical_bytes(data, (SIGNATURE_FIELD,)))
    return data


def warn_unverified(source: str, why: str) -> None:
    warnings.warn(f"LOADING AN UNVERIFIED ARTIFACT: {source} {why}; it was loaded only because "
                  "allow_unverified / --allow-unverified was given", RuntimeWarning, stacklevel=3)


def verify_seal(data: Mapping[str, Any], source: str | os.PathLike, *, fix: str,
                trusted: TrustedKeys | None = None, allow_unverified: bool = False) -> bool:
    """Check a sealed descriptor read from `source`: its digest always, its signature when keys are
    trusted. Returns True when it is verified, False when it has no digest and `allow_unverified`
    let it load (with a loud warning). Raises IntegrityError / SignatureError naming the file."""
    source = str(source)
    digest = data.get(DIGEST_FIELD)
    if digest is None:
        if not allow_unverified or trusted:
            raise IntegrityError(f"{source} has no {DIGEST_FIELD}: it is from an h2t-edge without mandatory "
                                 f"integrity checks, or the digest was removed; {fix}"
                                 + ("" if trusted else " (or load it with --allow-unverified)"))
        warn_unverified(source, f"has no {DIGEST_FIELD}")
        return False
    if not is_sha256(digest):
        raise IntegrityError(f"{source}: field '{DIGEST_FIELD}' must be a sha256 (64 lowercase hex digits); {fix}")
    if content_digest(data) != digest:
        raise IntegrityError(f"{source} was changed after it was written (its content does not match its "
                             f"{DIGEST_FIELD}); {fix}")
    if trusted:
        trusted.verify(data, source, fix)
    return True


def file_digest(blob: bytes | bytearray | memoryview, algorithm: str = "blake3", threads: int | None = None) -> str:
    """Hex digest of a file's bytes: BLAKE3 over every core, or over `threads` (what h2t-edge records
    now), or sha256 (artifacts of the previous sealed formats)."""
    if algorithm == "sha256":
        return hashlib.sha256(blob).hexdigest()
    if algorithm != "blake3":
        raise ValueError(f"unknown file digest {algorithm!r}; expected one of {FILE_DIGESTS}")
    try:
        import blake3
    except ImportError:
        raise IntegrityError("checking h2t-edge artifacts needs the `blake3` package; pip install blake3") from None
    return blake3.blake3(blob, max_threads=threads or blake3.blake3.AUTO).hexdigest()


def read_file(path: str | os.PathLike, *, what: str, fix: str) -> bytes:
    """The bytes of `path`, read once (IntegrityError naming the file when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except (OSError, MemoryError) as exc:
        raise IntegrityError(f"cannot read {what} {path} ({exc}); {fix}") from None


_PIPELINE_BYTES = 32 << 20  # larger files are hashed while they are read (measured: a gain from ~100 MB)
_CHUNK = 4 << 20


def read_hashed(path: str | os.PathLike, *, what: str, fix: str) -> tuple[bytes, str]:
    """The bytes of `path`, read once, and their BLAKE3, computed while the file is read: a reader
    thread fills the buffer chunk by chunk while this thread hashes the chunks already in (both release
    the GIL), so a large file costs about max(read, hash), not their sum. The digest is of exactly the
    bytes returned, whatever happens to the file meanwhile."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size < _PIPELINE_BYTES:
                data = f.read()
                return data, file_digest(data)
            return _read_and_hash(f, size, path)
    except (OSError, MemoryError) as exc:
        raise IntegrityError(f"cannot read {what} {path} ({exc}); {fix}") from None


def _read_and_hash(f, size: int, path) -> tuple[bytes, str]:
    import ctypes
    import threading

    import blake3

    # An uninitialized bytes object of `size` (what C extensions build and fill before anyone sees it):
    # engines take `bytes`, and filling one in place avoids a second copy of the whole file.
    new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    new_bytes.argtypes, new_bytes.restype = [ctypes.c_void_p, ctypes.c_ssize_t], ctypes.py_object
    as_string = ctypes.pythonapi.PyBytes_AsString
    as_string.argtypes, as_string.restype = [ctypes.py_object], ctypes.c_void_p
    data = new_bytes(None, size)
    view = memoryview((ctypes.c_char * size).from_address(as_string(data))).cast("B")
    done, failed, ready = [0], [], threading.Condition()

    def reader() -> None:
        position = 0
        try:
            while position < size:
                n = f.readinto(view[position:position + _CHUNK])
                if not n:
                    raise OSError(f"{path} became shorter while it was read")
                position += n
                with ready:
                    done[0] = position
                    ready.notify()
        except BaseException as exc:  # noqa: BLE001 - handed to the hashing thread, which raises it
            with ready:
                failed.append(exc)
                ready.notify()

    thread = threading.Thread(target=reader, name="h2t-read", daemon=True)
    thread.start()
    hasher, hashed = blake3.blake3(max_threads=blake3.blake3.AUTO), 0
    try:
        while hashed < size:
            with ready:
                ready.wait_for(lambda hashed=hashed: done[0] > hashed or failed)
                if failed:
                    raise failed[0]
                upto = done[0]
            hasher.update(view[hashed:upto])
            hashed = upto
    finally:
        thread.join()
        view.release()
    return data, hasher.hexdigest()


def verify_bytes(blob: bytes, expected: Any, *, field: str, path: str | os.PathLike,
                 descriptor: str | os.PathLike, fix: str, what: str = "file", algorithm: str | None = None,
                 digest: str | None = None) -> bytes:
    """Refuse `blob` (read from `path`) unless its digest is `expected`, recorded in `descriptor` as
    `field`; the algorithm is the field's suffix (`_blake3` or `_sha256`) unless given. `digest`: the
    blob's digest where the caller computed it while reading (`read_hashed`). Returns `blob`."""
    algorithm = _expected_digest(expected, field, descriptor, fix, algorithm)
    if (digest or file_digest(blob, algorithm)) != expected:
        raise _mismatch(field, path, descriptor, fix, what)
    return blob


def _expected_digest(expected: Any, field: str, descriptor, fix: str, algorithm: str | None = None) -> str:
    """The algorithm of digest field `field` (its suffix unless given); refuses a malformed `expected`."""
    algorithm = algorithm or field.rsplit("_", 1)[-1]
    if not is_digest(expected):
        raise IntegrityError(f"{descriptor}: field '{field}' must be a {algorithm} (64 lowercase hex digits); {fix}")
    return algorithm


def _mismatch(field: str, path, descriptor, fix: str, what: str) -> IntegrityError:
    return IntegrityError(f"{what} {path} does not match the {field} recorded in {descriptor} (it changed after "
                          f"it was written, or it was swapped in from another artifact); {fix}")


class FileChanging(IntegrityError):
    """A leased file that someone opened for writing while it was loaded (`FileLease.verify`): the
    load is done again from a copy of its bytes."""


class FileLease:
    """A read lease (Linux `fcntl(F_SETLEASE, F_RDLCK)`) on a file opened read-only: the kernel grants
    it only while nobody has the file open for writing (a writable mapping included), and while it is
    held, whoever opens the file for writing or truncates it waits for its release. So the bytes of the
    leased inode cannot change while it is held: its digest (`DigestCheck` over a read-only mapping)
    and an engine that opens `path` (`/proc/self/fd/N`, this very inode, whatever is renamed over the
    original path) see the same bytes, with no copy of the file. `verify` says whether the lease held
    throughout (a writer that asked meanwhile ends it: `FileChanging`). `take` returns None where no
    lease can be had (another OS, a file system without leases, a file this user does not own, a
    writer that has it open): callers then read the bytes into memory instead."""

    def __init__(self, fd: int, source: str | os.PathLike):
        import weakref

        self.fd, self.source = fd, str(source)
        self.size = os.fstat(fd).st_size
        self.readers: list = []  # threads reading a mapping of the file: the lease outlives them
        self._close = weakref.finalize(self, _drop_lease, fd)

    @classmethod
    def take(cls, path: str | os.PathLike) -> FileLease | None:
        try:
            import fcntl
            import signal

            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (ImportError, OSError):
            return None
        try:
            # A writer's open sends the holder a signal; SIGURG's default is to be ignored (SIGIO's kills).
            fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except (AttributeError, OSError):
            os.close(fd)
            return None
        return cls(fd, path)

    @property
    def path(self) -> str:
        """A path that opens the leased inode itself (not whatever the original path names now)."""
        return f"/proc/self/fd/{self.fd}"

    def mapped(self):
        """The file's bytes as a read-only mapping (no copy)."""
        import mmap

        return mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ) if self.size else b""

    def verify(self) -> None:
        """FileChanging unless the lease has held until now (nobody asked to write the file)."""
        import fcntl

        if not self._close.alive or fcntl.fcntl(self.fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
            raise FileChanging(f"{self.source} was opened for writing while it was loaded")

    def close(self) -> None:
        """Drop the lease and close the file (again: nothing), once its readers are done: a file
        truncated under a mapping that is still read would kill the process (SIGBUS)."""
        for reader in self.readers:
            reader.join()
        self._close()


def _drop_lease(fd: int) -> None:
    import fcntl

    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    finally:
        os.close(fd)


class DigestCheck:
    """The check of bytes whose digest is computed on another thread while an engine parses them
    (`read_checking`). `verify` waits for it and raises IntegrityError unless the digest is the one
    recorded; whoever hands the bytes to an engine calls it before the engine runs anything
    (`runtime.backends.base.ModelBytes.confirm`). The digest is of the very bytes object the engine
    gets: neither the file nor anyone else can change it."""

    def __init__(self, blob: bytes | FileLease, expected: Any, *, field: str, path: str | os.PathLike,
                 descriptor: str | os.PathLike, fix: str, what: str = "file", threads: int | None = None):
        import threading

        algorithm = _expected_digest(expected, field, descriptor, fix)
        self._mismatch = lambda: _mismatch(field, path, descriptor, fix, what)
        self._expected, self._result = expected, {}

        data = blob.mapped() if isinstance(blob, FileLease) else blob  # mapped here, while the file is open

        def digest() -> None:
            try:
                self._result["digest"] = file_digest(data, algorithm, threads)
            except BaseException as exc:  # noqa: BLE001 - raised by `verify`, on the caller's thread
                self._result["error"] = exc

        self._thread = threading.Thread(target=digest, name="h2t-digest", daemon=True)
        if isinstance(blob, FileLease):
            blob.readers.append(self._thread)
        self._thread.start()

    def verify(self) -> None:
        self._thread.join()
        if "error" in self._result:
            raise self._result["error"]
        if self._result["digest"] != self._expected:
            raise self._mismatch()


def resolve_verify_first(verify_first: bool | None = None) -> bool:
    """`verify_first` as given, else $H2T_EDGE_VERIFY_FIRST: "1" yes, "0" or unset no; any other value
    is an error (a trust setting that fails closed, never a guess)."""
    if verify_first is not None:
        return bool(verify_first)
    setting = os.environ.get(VERIFY_FIRST_ENV)
    if setting is None or setting == "0":
        return False
    if setting == "1":
        return True
    raise IntegrityError(f"${VERIFY_FIRST_ENV} is set to {setting!r}; set it to 1 (finish every digest before "
                         "an engine parses the bytes) or 0, or unset it")


def read_checking(path: str | os.PathLike, expected: Any, *, field: str, descriptor: str | os.PathLike, fix: str,
                  what: str = "file") -> tuple[bytes, DigestCheck]:
    """The bytes of `path`, read once, and their `DigestCheck`, started: an engine may parse the bytes
    while the digest is computed (on 2 cores that hides the hash), and must not run before
    `DigestCheck.verify`. `read_verified` checks before it returns instead."""
    data = read_file(path, what=what, fix=fix)
    return data, DigestCheck(data, expected, field=field, path=path, descriptor=descriptor, fix=fix, what=what)


def read_verified(path: str | os.PathLike, expected: Any, *, field: str, descriptor: str | os.PathLike, fix: str,
                  what: str = "file") -> bytes:
    """The bytes of `path`, read once and refused unless they match `expected` (`field` of `descriptor`).
    Hand these bytes to whatever uses the file: never open the path again."""
    if not field.endswith("_blake3"):
        return verify_bytes(read_file(path, what=what, fix=fix), expected, field=field, path=path,
                            descriptor=descriptor, fix=fix, what=what)
    data, digest = read_hashed(path, what=what, fix=fix)
    return verify_bytes(data, expected, field=field, path=path, descriptor=descriptor, fix=fix, what=what,
                        digest=digest)


def digest_field(name: str, *, legacy: bool) -> str:
    """The name of file digest field NAME: NAME_blake3, or NAME_sha256 in a descriptor of the previous
    sealed format (`legacy`)."""
    return f"{name}_sha256" if legacy else f"{name}_blake3"


def verify_file(path: str | os.PathLike, expected: Any, *, field: str, descriptor: str | os.PathLike, fix: str,
                what: str = "file") -> None:
    """Refuse `path` unless its digest is `expected` (a check only: use `read_verified` for a file
    whose bytes are then used)."""
    read_verified(path, expected, field=field, descriptor=descriptor, fix=fix, what=what)


# -- rollback ----------------------------------------------------------------------------------------


VERSION_MAX = 2**63 - 1  # `issued` is nanoseconds since 1970 in a signed 64-bit integer


class VersionRecord:
    """The newest `issued` a device has loaded per task: a JSON file the device keeps (not shipped
    with artifacts). `check_and_update` refuses an older artifact and records a newer one, under an
    exclusive `flock` on PATH.lock, so concurrent loads lose no update.

    The record fails closed: it is created explicitly (`VersionRecord.create`, `h2t-edge versions
    init`); once a device uses one, a missing (deleted, dangling), unreadable or malformed record, or a
    version that is not an integer in 0..2^63-1, is an error, never an empty record."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def resolve(cls, version_record: "VersionRecord | str | os.PathLike | None") -> "VersionRecord | None":
        if isinstance(version_record, VersionRecord):
            return version_record
        if version_record is None:
            setting = os.environ.get(VERSION_RECORD_ENV)
            if setting is not None and not setting.strip():
                raise ArtifactError(f"${VERSION_RECORD_ENV} is set but blank; set it to the device's version record "
                                    "file, or unset it to keep no record")
            version_record = setting
        return None if version_record is None else cls(version_record)

    @classmethod
    def create(cls, path: str | os.PathLike) -> "VersionRecord":
        """Create an empty record at `path` (the explicit first step); refuses one that exists."""
        record = cls(path)
        with record._lock():
            if os.path.lexists(record.path):
                raise ArtifactError(f"version record {record.path} already exists; a device keeps one record, "
                                    "do not reset it (a reset would accept rollbacks)")
            atomic_write_json(record.path, {"format": VERSION_RECORD_FORMAT, "version": 1, "tasks": {}})
        return record

    def _lock(self):
        from .io import FileLock

        return FileLock(self.path.with_name(self.path.name + ".lock"), f"version record {self.path}",
                        "wait for the other load to finish", wait=True)

    def read(self) -> dict[str, int]:
        """The recorded versions (ArtifactError naming the file when it is missing or malformed)."""
        fix = (f"restore the device's record, or create a new one with `h2t-edge versions init {self.path}` "
               "(a new record accepts any version once)")
        if not self.path.is_file():
            raise ArtifactError(f"version record {self.path} does not exist (deleted, or a dangling link); {fix}")
        data = read_json(self.path, "version record")
        if not isinstance(data, dict) or data.get("format") != VERSION_RECORD_FORMAT \
                or not isinstance(data.get("tasks"), dict):
            raise ArtifactError(f"{self.path} is not an h2t-edge version record (format {VERSION_RECORD_FORMAT!r} "
                                f"with a 'tasks' object); point {VERSION_RECORD_ENV} at the device's own record, or {fix}")
        for task, value in data["tasks"].items():
            if type(value) is not int or not 0 <= value <= VERSION_MAX:
                raise ArtifactError(f"version record {self.path}: field 'tasks.{task}' is {str(value)[:40]!r}, not an "
                                    f"integer in 0..{VERSION_MAX}; {fix}")
        return dict(data["tasks"])

    def check_and_update(self, tasks: Sequence[str], issued: Any, source: str | os.PathLike) -> None:
        if type(issued) is not int or not 0 <= issued <= VERSION_MAX:
            raise IntegrityError(f"{source}: field '{ISSUED_FIELD}' is missing or not an integer in 0..{VERSION_MAX}, "
                                 f"so this device's version record ({self.path}) cannot rule out a rollback; "
                                 "re-compile the task")
        with self._lock():
            known = self.read()
            for task in tasks:
                if known.get(task, -1) > issued:
                    raise RollbackError(f"{source} holds task {task!r} issued at {issued}, older than the version "
                                        f"this device already loaded ({known[task]}, recorded in {self.path}): a "
                                        "rollback; install the newer artifact")
            newer = {t: issued for t in tasks if known.get(t, -1) < issued}
            if newer:
                atomic_write_json(self.path, {"format": VERSION_RECORD_FORMAT, "version": 1,
                                              "tasks": {**known, **newer}})

"""What every command shares: errors and exit codes, files written atomically, prompt files and manifests, devices,
and the stop signals. The model, the reward and the trainer all build on it; it imports none of them."""

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import signal
import socket
import sys
import tempfile
import time

import torch

# ----------------------------------------------------------------------------------------------------------------
# Errors: one line on stderr and an exit code that says which (docs/faults.md, the exit-code table)

class InputError(Exception):
    """Bad user input (a missing file, a wrong key or shape, a bad flag): srpo.py prints it on one line, exit 2."""


def first_line(error):
    """The first line of an exception's message, for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


EXIT_INPUT = 2  # bad input: nothing was done
EXIT_DIVERGED = 65  # EX_DATAERR: the numbers went bad (a loss, gradient or weight not finite); nothing non-finite saved
EXIT_FAULT = 74  # EX_IOERR (sysexits.h): a write failed under the run; the last complete checkpoint is intact
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by SIGTERM / SIGINT after saving; run it again (with --resume) to continue
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it: Ctrl-C where there was nothing to save (set-up)


class Fault(Exception):
    """A write that failed under the run: disk full, quota, permissions changed, a vanished mount."""


class Diverged(Exception):
    """Training diverged: a loss, reward, gradient norm or weight is not finite. Nothing non-finite is saved."""


class Stopped(Exception):
    """SIGTERM or SIGINT: the run stopped cleanly, where it can continue."""


def written(what, write):
    """write(), with an OSError turned into a Fault naming what could not be written and why (atomic_write and
    append_line turn a library's own report of a full disk into one)."""
    try:
        return write()
    except OSError as e:
        raise Fault(f"could not write {what} ({e.strerror or e})") from None


FULL = (errno.ENOSPC, errno.EDQUOT)


def full_disk(error, folder):
    """The OSError(ENOSPC or EDQUOT) behind a library's own exception from a failed write, or None. Libraries that
    write a file themselves report a full disk in their own types: torch.save to a Python file object raises
    RuntimeError("unexpected pos ...") with the OSError as its context; safetensors raises SafetensorError with the
    OS's text ("No space left on device (os error 28)"); torch.save to a path (its C++ writer) keeps no reason at
    all. So: an OSError of these in the exception chain, else the OS's text in the message, else the folder's file
    system with no block left (os.statvfs, asked while the partial file still fills it)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL:
            return OSError(seen.errno, os.strerror(seen.errno))
        seen = seen.__cause__ or seen.__context__
    for code in FULL:
        if os.strerror(code) in str(error):
            return OSError(code, os.strerror(code))
    try:
        if os.statvfs(folder).f_bavail == 0:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        pass  # the folder itself is gone: the library's exception stands
    return None


# ----------------------------------------------------------------------------------------------------------------
# transformers models from local folders


@contextlib.contextmanager
def quiet_transformers():
    """transformers at error level and without its progress bar while a model loads: its loading report (a table on
    stderr of the keys it left unused or could not fit, such as the lm_head of Qwen3's causal-LM file, which a text
    encoder does not use) would bury the one-line errors; load_pretrained checks the load itself. Both restored
    after."""
    from transformers.utils import logging as hf_logging  # ~4 s to import: only where a model loads

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def load_pretrained(kind, folder, what, **kwargs):
    """kind.from_pretrained(folder) of a transformers model, offline and quietly, every weight of its config in the
    files with its shape (transformers would make a missing or misfitting one up at random); keys the model does not
    use are ignored, as transformers does. -> the model; else an InputError naming the folder, the first missing or
    misfitting key with both shapes (and how many more), or what transformers could not read."""
    from safetensors import SafetensorError

    with quiet_transformers():
        try:
            model, info = kind.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                               ignore_mismatched_sizes=True, **kwargs)
        except (OSError, ValueError, TypeError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
            raise InputError(f"{folder}: cannot load the {what} ({first_line(e)})") from None
    problems = [*(f"missing key '{key}'" for key in sorted(info["missing_keys"])),
                *(f"key '{key}' {tuple(theirs)} does not fit config.json's {tuple(ours)}"
                  for key, theirs, ours in sorted(info["mismatched_keys"]))]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"{folder}: {problems[0]}{more}")
    return model


# ----------------------------------------------------------------------------------------------------------------
# Files: written atomically, with the umask's mode; JSON; folders

def check_folder(path, what):
    """A folder that is there; a file given in its place is called a file (a model's .safetensors for its folder)."""
    if os.path.isdir(path):
        return
    raise InputError(f"{path}: {'a file, not a folder' if os.path.exists(path) else 'no such folder'} (expected "
                     f"{what})")


def read_json(path):
    """A JSON object (dict) from path; anything else is a one-line error."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def new_file_mode():
    """0o666 & ~umask, the mode open() gives a new file. The umask can only be read by setting it: the moment between
    the two calls sets a stricter one, never a looser."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, write):
    """write(tmp) then rename tmp to path, both flushed to disk first: after a crash or a power loss, path holds
    the old file or the whole new one, never a part. The file gets the umask's mode (safetensors writes 0600), so
    that a checkpoint can be shared like any other file."""
    tmp = path + ".tmp"
    try:
        try:
            write(tmp)
        except OSError:
            raise
        except Exception as e:  # a library's own report of a failed write: an OSError when it was a full disk
            reason = full_disk(e, os.path.dirname(os.path.abspath(tmp)))
            if reason is None:
                raise
            raise reason from None
        os.chmod(tmp, new_file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed: leave no half file behind
            os.remove(tmp)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


def write_text(path, text):
    """A UTF-8 text file, written atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def append_line(path, line):
    """Append one line (a JSONL record) whole or not at all: one os.write, and on a failure (a full disk half-way)
    the file is truncated back to its old end, so that no torn line is left for a resume to read."""
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.fstat(fd).st_size
        try:
            if os.write(fd, data) != len(data):  # a short write: the disk filled up under it
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)


def read_jsonl(path):
    """The JSON objects of a JSONL file written by append_line, [] if there is none. A torn last line (a crash or
    a full disk mid-append under an older version, or a copy cut short) is dropped with a note on stderr: the
    resumed run redoes what it recorded. A bad line before the last is a one-line error naming it."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
            if record is not None and not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                raise ValueError
        except ValueError:
            if number < len(lines):
                raise InputError(f"{path}, line {number}: not a JSON object with an integer \"step\": mend or "
                                 f"remove that line") from None
            print(f"note: {path}, line {number}: a torn last line (a write cut short), dropped", file=sys.stderr)
            continue
        if record is not None:
            records.append(record)
    return records


def check_writable(out):
    """Make the output folder and try a file in it, before anything is loaded."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise InputError(f"{out}: cannot write the output folder ({e.strerror or e})") from None


class RunLock:
    """FOLDER/.lock, held from a run's start to its end: a second run into the same folder is refused, naming the
    holder, instead of interleaving its log, evaluations and checkpoints with the first's. The lock is a flock on
    the open file, which the kernel releases when its process dies (kill -9 too): a lock file left behind, whose
    holder is gone, is free, and taking it over says whose it was. A run that ends (even by an error) removes it.
    On NFS, Linux emulates flock with byte-range locks that hold across hosts, except on a mount with
    local_lock=flock or local_lock=all: there two hosts can both take it."""

    def __init__(self, folder):
        self.path = os.path.join(folder, ".lock")

    def __enter__(self):
        try:
            self.fd = self.locked()
            if stale := self.holder(self.fd):
                print(f"note: {self.path}: taking over the lock of a run that ended without releasing it ({stale})",
                      file=sys.stderr)
            os.ftruncate(self.fd, 0)
            started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode())
        except OSError as e:
            raise InputError(f"{self.path}: cannot take the run's lock ({e.strerror or e})") from None
        return self

    def locked(self):
        """The lock file's descriptor, flocked; a file its holder removed as we waited is not the lock any more."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.holder(fd) or "a run that is starting"
                os.close(fd)
                raise InputError(f"{os.path.dirname(self.path)}: another run is writing into this folder ({holder}):"
                                 f" wait for it to end, or give another --out") from None
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    return fd
            os.close(fd)

    @staticmethod
    def holder(fd):
        """Who holds (or held) the lock, as its holder wrote it: pid, host and start time."""
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()

    def __exit__(self, *exc):
        # removed while still held: the next run creates and locks a new file (in a folder gone read-only the file
        # stays, and the next run takes it over as stale)
        with contextlib.suppress(OSError):
            os.remove(self.path)
        os.close(self.fd)


# ----------------------------------------------------------------------------------------------------------------
# Prompt files and the manifests of `sample --prompts`

MANIFEST = "images.jsonl"  # in a `sample --prompts` folder: every image with its prompt


def read_lines(path, what):
    """The lines of a UTF-8 text file (LF, CRLF or CR; a Windows editor's byte-order mark dropped). A file that
    cannot be read, or is not UTF-8 (Latin-1, an image), is a one-line error naming the file and the first bad
    byte, by offset and line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}: the {what} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}, "
                         f"line {line}): save it as UTF-8") from None
    return list(io.StringIO(text, newline=None))


def read_prompts(path):
    """One prompt per line; blank lines skipped."""
    prompts = [line.strip() for line in read_lines(path, "prompt file") if line.strip()]
    if not prompts:
        raise InputError(f"{path}: no prompts (expected one prompt per line)")
    return prompts


def write_manifest(folder, jobs, settings):
    """folder/images.jsonl: one {"image", "prompt", **settings} line per image (settings: the seed and all else the
    image depends on), what `score --manifest` reads."""
    write_text(os.path.join(folder, MANIFEST), "".join(
        json.dumps({"image": os.path.basename(path), "prompt": p, **settings}) + "\n"
        for p, paths in jobs for path in paths))


def manifest_rows(path):
    """The rows of a `sample --prompts` folder's images.jsonl, each with "image" (its path, relative to the folder
    in the file, here joined to it) and "prompt"."""
    folder, rows = os.path.dirname(os.path.abspath(path)), []
    for number, line in enumerate(read_lines(path, "manifest"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append({**row, "image": os.path.join(folder, row["image"]), "prompt": str(row["prompt"])})
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}, line {number}: expected a JSON object with \"image\" and \"prompt\"") from None
    return rows


def read_manifest(path):
    """(image paths, prompts) from a `sample --prompts` folder's images.jsonl, paths relative to its folder."""
    rows = manifest_rows(path)
    return [row["image"] for row in rows], [row["prompt"] for row in rows]


# ----------------------------------------------------------------------------------------------------------------
# Devices, seeds, stop signals

def parse_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name, device):
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def derive_seed(seed, *keys):
    """A 63-bit seed for the stream named by keys: the same numbers on every rank and after a resume."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def to_device(t, device):
    """t copied to device without stalling the host: asynchronously, from pinned memory, on CUDA."""
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


def this_process(device_name):
    """(rank, world, device): torchrun's RANK and WORLD_SIZE (0 and 1 without it), and on CUDA under torchrun the
    GPU of this process's LOCAL_RANK. A GPU with an index is made the current one: FSDP2 and nccl use the current
    GPU, not the one a tensor names (--device cuda:1 would otherwise gather and reduce on cuda:0)."""
    device = parse_device(device_name)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return rank, world, device


def attention_backend(name, device):
    """--attn, by default the Triton kernels on CUDA and torch's SDPA elsewhere."""
    return name or ("triton" if device.type == "cuda" else "sdpa")


class StopSignals:
    """While active, the first SIGTERM or SIGINT only sets `received`: the loop finishes its step (or image), saves
    and raises Stopped. A second signal stops at once. A scheduler signals the whole process group and torchrun
    then forwards the same signal to its workers, so a worker gets it twice within moments: repeats within
    REPEAT_S seconds count as one."""

    REPEAT_S = 2.0

    def __init__(self):
        self.received, self.at = None, 0.0

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.received is None:
            self.received, self.at = signal.Signals(signum).name, time.monotonic()
            print(f"\n{self.received}: stopping at the end of this step (a second signal stops at once)",
                  file=sys.stderr)
        elif time.monotonic() - self.at > self.REPEAT_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
